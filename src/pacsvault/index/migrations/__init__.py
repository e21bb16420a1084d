"""Alembic migrations of the index (``index.schema`` runs them; no alembic.ini)."""
