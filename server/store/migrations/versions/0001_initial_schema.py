"""Initial schema: runs, series, blocks, batches, dropped_batches.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create every table and index."""
    op.create_table(
        "runs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("project", sa.String(length=100), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("config", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("last_step", sa.BigInteger(), nullable=True),
        sa.Column("last_ingest_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("num_steps", sa.BigInteger(), nullable=False),
        sa.Column("clipped_steps", sa.BigInteger(), nullable=False),
        sa.Column("skipped_steps", sa.BigInteger(), nullable=False),
        sa.Column("nonfinite_steps", sa.BigInteger(), nullable=False),
        sa.Column("nonfinite_values", sa.BigInteger(), nullable=False),
        sa.CheckConstraint(
            "status IN ('running', 'finished', 'failed')", name=op.f("ck_runs_status")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
    )
    op.create_index(op.f("ix_runs_created_at_id"), "runs", ["created_at", "id"])
    op.create_index(op.f("ix_runs_project_created_at_id"), "runs", ["project", "created_at", "id"])

    op.create_table(
        "batches",
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("batch_id", sa.String(length=36), nullable=False),
        sa.Column("first_step", sa.BigInteger(), nullable=False),
        sa.Column("last_step", sa.BigInteger(), nullable=False),
        sa.Column("n_steps", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_batches_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "batch_id", name=op.f("pk_batches")),
    )
    op.create_index(op.f("ix_batches_run_id_first_step"), "batches", ["run_id", "first_step"])

    op.create_table(
        "dropped_batches",
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("reason", sa.String(length=64), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("as_of_step", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.id"],
            name=op.f("fk_dropped_batches_run_id_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", "reason", name=op.f("pk_dropped_batches")),
    )

    op.create_table(
        "series",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("metric", sa.String(length=32), nullable=False),
        sa.Column("layer", sa.String(length=1024), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("nan_count", sa.BigInteger(), nullable=False),
        sa.Column("vmin", sa.Double(), nullable=True),
        sa.Column("vmax", sa.Double(), nullable=True),
        sa.Column("vsum", sa.Double(), nullable=True),
        sa.Column("last_step", sa.BigInteger(), nullable=True),
        sa.Column("vlast", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_series_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_series")),
        sa.UniqueConstraint(
            "run_id", "metric", "layer", name=op.f("uq_series_run_id_metric_layer")
        ),
    )

    op.create_table(
        "blocks",
        sa.Column("series_id", _ID, nullable=False),
        sa.Column("first_step", sa.BigInteger(), nullable=False),
        sa.Column("last_step", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("nan_count", sa.Integer(), nullable=False),
        sa.Column("vmin", sa.Double(), nullable=True),
        sa.Column("vmax", sa.Double(), nullable=True),
        sa.Column("vlast", sa.Double(), nullable=True),
        sa.Column("steps", sa.LargeBinary(), nullable=True),
        sa.Column("values", sa.LargeBinary(), nullable=True),
        sa.ForeignKeyConstraint(
            ["series_id"],
            ["series.id"],
            name=op.f("fk_blocks_series_id_series"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("series_id", "first_step", name=op.f("pk_blocks")),
        sqlite_with_rowid=False,
    )


def downgrade() -> None:
    """Drop every table (and with them all stored data)."""
    op.drop_table("blocks")
    op.drop_table("series")
    op.drop_table("dropped_batches")
    op.drop_index(op.f("ix_batches_run_id_first_step"), table_name="batches")
    op.drop_table("batches")
    op.drop_index(op.f("ix_runs_project_created_at_id"), table_name="runs")
    op.drop_index(op.f("ix_runs_created_at_id"), table_name="runs")
    op.drop_table("runs")
