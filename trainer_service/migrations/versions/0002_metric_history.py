"""Metric history: every logged step's metrics of a job.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05

One row per job, step and kind (training or evaluation), the metrics by name as
JSON; read in (step, kind) order by ListTrainingMetrics.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create training_metrics."""
    op.create_table(
        "training_metrics",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=63), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("kind", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Float(), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_training_metrics"),
        sa.UniqueConstraint("job_id", "step", "kind", name="uq_training_metrics_job_id_step_kind"),
    )
    op.create_index("ix_training_metrics_job_id", "training_metrics", ["job_id"])


def downgrade() -> None:
    """Drop training_metrics."""
    op.drop_index("ix_training_metrics_job_id", table_name="training_metrics")
    op.drop_table("training_metrics")
