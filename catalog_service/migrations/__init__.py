"""Alembic migrations of the catalog database (see `catalog_service.db.migrate`)."""
