"""Alembic revisions of the catalog database, oldest first by `down_revision`."""
