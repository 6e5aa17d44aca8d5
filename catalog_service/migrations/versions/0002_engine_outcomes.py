"""Engine outcomes: what an engine did when a worker tried a model.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

One row per (model, engine, engine version, kind of device): a new report
replaces the old one. The key columns are the primary key (its leading
`model_pk` serves the per-model lookup), the full `EngineOutcome` proto is
kept as JSON in `data`. Rows go with their model (ON DELETE CASCADE).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create engine_outcomes."""
    op.create_table(
        "engine_outcomes",
        sa.Column("model_pk", sa.Integer(), nullable=False),
        sa.Column("engine", sa.String(length=256), nullable=False),
        sa.Column("engine_version", sa.String(length=256), nullable=False),
        sa.Column("device_type", sa.String(length=32), nullable=False),
        sa.Column("supported", sa.Boolean(), nullable=False),
        sa.Column("stage", sa.String(length=32), nullable=False),
        sa.Column("worker", sa.Text(), nullable=False),
        sa.Column("model_etag", sa.String(length=64), nullable=False),
        sa.Column("report_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_pk"], ["models.id"], name="fk_engine_outcomes_model_pk_models", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint(
            "model_pk", "engine", "engine_version", "device_type", name="pk_engine_outcomes"
        ),
    )


def downgrade() -> None:
    """Drop engine_outcomes (the recorded outcomes with it)."""
    op.drop_table("engine_outcomes")
