"""Alembic migrations of the artalign database (run with `artalign db upgrade`)."""
