"""Alembic environment of the catalog database (see `server_kit.database.run_alembic_env`).

The URL comes from `catalog_service.db.migrate()`, `-x url=...`,
`MODELYARD_CATALOG_DATABASE_URL` or `sqlalchemy.url` in alembic.ini.
"""

from __future__ import annotations

from catalog_service.db import Base
from server_kit.database import run_alembic_env

run_alembic_env(Base.metadata, "MODELYARD_CATALOG_DATABASE_URL")
