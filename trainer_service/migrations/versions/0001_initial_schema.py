"""Initial schema: training jobs.

Revision ID: 0001
Revises:
Create Date: 2026-11-23

One table keeps each job's `TrainingJob` proto as JSON in `data`, what the
job needs to run in `spec`, and copies the fields the queue and the filters
need into indexed columns. Timestamps are timezone-aware (UTC).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create training_jobs."""
    op.create_table(
        "training_jobs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=63), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("base_model", sa.Text(), nullable=False),
        sa.Column("method", sa.String(length=16), nullable=False),
        sa.Column("output_model_id", sa.String(length=63), nullable=False),
        sa.Column("worker_id", sa.String(length=63), nullable=True),
        sa.Column("lease_expire_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_training_jobs"),
        sa.UniqueConstraint("job_id", name="uq_training_jobs_job_id"),
    )
    for column in ("state", "base_model", "method", "output_model_id", "worker_id", "lease_expire_time"):
        op.create_index(f"ix_training_jobs_{column}", "training_jobs", [column])


def downgrade() -> None:
    """Drop training_jobs."""
    for column in ("state", "base_model", "method", "output_model_id", "worker_id", "lease_expire_time"):
        op.drop_index(f"ix_training_jobs_{column}", table_name="training_jobs")
    op.drop_table("training_jobs")
