"""Model entries stored as serialized protos instead of JSON.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05

`models.data` (the `Model` proto as JSON text) becomes `models.entry` (the proto's
binary form, `SerializeToString`): reading an entry is then a copy of bytes and a
~1 µs parse instead of a ~200 µs JSON parse, whatever the catalog's size.

Existing rows are converted in batches of `BATCH` rows (a JSON parse each: about
4 minutes per million entries on one core). The downgrade converts back.
"""

from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from google.protobuf import json_format

from modelyard.catalog.v1 import model_pb2

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH = 1000


def _json_to_proto(data: str) -> bytes:
    return json_format.Parse(data, model_pb2.Model(), ignore_unknown_fields=True).SerializeToString()


def _proto_to_json(entry: bytes) -> str:
    return json_format.MessageToJson(model_pb2.Model.FromString(entry), indent=None)


def _convert(source: str, target: str, convert: Callable[..., object]) -> None:
    """Fill `models.target` from `models.source`, `BATCH` rows at a time (keyset on id)."""
    conn = op.get_bind()
    models = sa.table("models", sa.column("id", sa.Integer), sa.column(source), sa.column(target))
    last = 0
    while True:
        rows = conn.execute(
            sa.select(models.c.id, models.c[source])
            .where(models.c.id > last)
            .order_by(models.c.id)
            .limit(BATCH)
        ).all()
        if not rows:
            return
        conn.execute(
            models.update().where(models.c.id == sa.bindparam("pk")).values({target: sa.bindparam("value")}),
            [{"pk": pk, "value": convert(value)} for pk, value in rows],
        )
        last = rows[-1][0]


def _add_not_null(column: str, type_: sa.types.TypeEngine[Any], empty: str) -> None:
    """Add `models.column` NOT NULL: SQLite needs a default to add one (never used by
    the store, which always writes the column); PostgreSQL gets it after the fill."""
    if op.get_bind().dialect.name == "sqlite":
        op.add_column("models", sa.Column(column, type_, nullable=False, server_default=sa.text(empty)))
    else:
        op.add_column("models", sa.Column(column, type_, nullable=True))


def _set_not_null(column: str, type_: sa.types.TypeEngine[Any]) -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.alter_column("models", column, existing_type=type_, nullable=False)


def _drop(column: str) -> None:
    # SQLite >= 3.35 drops an unindexed column in place; batch mode would copy the
    # table, and dropping the old copy would cascade to tags, labels and outcomes.
    op.execute(sa.text(f"ALTER TABLE models DROP COLUMN {column}"))


def upgrade() -> None:
    """models.data (JSON) -> models.entry (serialized proto)."""
    _add_not_null("entry", sa.LargeBinary(), "x''" if op.get_bind().dialect.name == "sqlite" else "''")
    _convert("data", "entry", _json_to_proto)
    _set_not_null("entry", sa.LargeBinary())
    _drop("data")


def downgrade() -> None:
    """models.entry (serialized proto) -> models.data (JSON)."""
    _add_not_null("data", sa.Text(), "''")
    _convert("entry", "data", _proto_to_json)
    _set_not_null("data", sa.Text())
    _drop("entry")
