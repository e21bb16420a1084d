"""Encrypted object files on disk: written atomically and durably, named by random ids."""
