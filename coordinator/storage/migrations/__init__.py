"""Alembic migrations of the coordinator's ledger (run by `horde-coordinator migrate`)."""
