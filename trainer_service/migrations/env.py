"""Alembic environment of the trainer database (see `server_kit.database.run_alembic_env`).

The URL comes from `trainer_service.db.migrate()`, `-x url=...`,
`MODELYARD_TRAINER_DATABASE_URL` or `sqlalchemy.url` in alembic.ini. The version table
is `trainer_alembic_version`, so the trainer and the catalog can share one database.
"""

from __future__ import annotations

from server_kit.database import run_alembic_env
from trainer_service.db import VERSION_TABLE, Base

run_alembic_env(Base.metadata, "MODELYARD_TRAINER_DATABASE_URL", version_table=VERSION_TABLE)
