"""Alembic migrations of the ChatStore schema (run by ``turnrelay.store.migrate``)."""
