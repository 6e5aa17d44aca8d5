"""Initial schema: models (with tags and labels) and workers.

Revision ID: 0001
Revises:
Create Date: 2026-11-23

Each table keeps the full proto as JSON in `data` and copies the fields that
filters and lineage need into indexed columns. Timestamps are timezone-aware
(UTC). A model's parent is RESTRICTed: a parent cannot be deleted while a
child points at it; tags and labels go with their model.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create models, model_tags, model_labels and workers."""
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model_id", sa.String(length=63), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("model_type", sa.Text(), nullable=False),
        sa.Column("architecture", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("weight_format", sa.String(length=32), nullable=False),
        sa.Column("base_model", sa.Text(), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("source_key", sa.Text(), nullable=False),
        sa.Column("local_path", sa.Text(), nullable=False),
        sa.Column("hub_repo", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("etag", sa.String(length=64), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["parent_id"], ["models.id"], name="fk_models_parent_id_models", ondelete="RESTRICT"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_models"),
        sa.UniqueConstraint("model_id", name="uq_models_model_id"),
    )
    for column in (
        "kind",
        "model_type",
        "architecture",
        "state",
        "weight_format",
        "base_model",
        "parent_id",
        "source_key",
        "local_path",
        "hub_repo",
    ):
        op.create_index(f"ix_models_{column}", "models", [column])

    op.create_table(
        "model_tags",
        sa.Column("model_pk", sa.Integer(), nullable=False),
        sa.Column("tag", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_pk"], ["models.id"], name="fk_model_tags_model_pk_models", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("model_pk", "tag", name="pk_model_tags"),
    )
    op.create_index("ix_model_tags_tag", "model_tags", ["tag"])

    op.create_table(
        "model_labels",
        sa.Column("model_pk", sa.Integer(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_pk"], ["models.id"], name="fk_model_labels_model_pk_models", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("model_pk", "key", name="pk_model_labels"),
    )
    op.create_index("ix_model_labels_key_value", "model_labels", ["key", "value"])

    op.create_table(
        "workers",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("worker_id", sa.String(length=63), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("engine", sa.Text(), nullable=False),
        sa.Column("address", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("last_heartbeat_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_workers"),
        sa.UniqueConstraint("worker_id", name="uq_workers_worker_id"),
    )
    for column in ("role", "engine", "last_heartbeat_time"):
        op.create_index(f"ix_workers_{column}", "workers", [column])


def downgrade() -> None:
    """Drop everything `upgrade` created (data included)."""
    for column in ("role", "engine", "last_heartbeat_time"):
        op.drop_index(f"ix_workers_{column}", table_name="workers")
    op.drop_table("workers")
    op.drop_index("ix_model_labels_key_value", table_name="model_labels")
    op.drop_table("model_labels")
    op.drop_index("ix_model_tags_tag", table_name="model_tags")
    op.drop_table("model_tags")
    for column in (
        "kind",
        "model_type",
        "architecture",
        "state",
        "weight_format",
        "base_model",
        "parent_id",
        "source_key",
        "local_path",
        "hub_repo",
    ):
        op.drop_index(f"ix_models_{column}", table_name="models")
    op.drop_table("models")
