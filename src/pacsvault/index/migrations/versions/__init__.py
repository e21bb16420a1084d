"""Revisions of the index schema, oldest first (``0001`` = the baseline)."""
