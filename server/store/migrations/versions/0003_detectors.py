"""Detectors: events, detection counts, per-run detector state, per-project thresholds; the
global-norm window of ``gradwatch_global_grad_norm_window_max`` and the top layers of runs.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _run_id(table: str) -> list[sa.Column[str] | sa.ForeignKeyConstraint]:
    return [
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f(f"fk_{table}_run_id_runs"), ondelete="CASCADE"
        ),
    ]


def upgrade() -> None:
    """Create the detector tables and add the window columns to ``runs``."""
    with op.batch_alter_table("runs") as batch:
        batch.add_column(
            sa.Column("norm_window_started_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch.add_column(sa.Column("norm_window_max", sa.Double(), nullable=True))
        batch.add_column(sa.Column("norm_window_previous_max", sa.Double(), nullable=True))
        batch.add_column(sa.Column("top_layers", sa.JSON(none_as_null=True), nullable=True))

    op.create_table(
        "events",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        *_run_id("events"),
        sa.Column("rule", sa.String(length=16), nullable=False),
        sa.Column("layer", sa.String(length=1024), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("first_step", sa.BigInteger(), nullable=False),
        sa.Column("last_step", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("value", sa.Double(), nullable=False),
        sa.Column("baseline", sa.Double(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_index(
        op.f("ix_events_run_id_first_step_id"), "events", ["run_id", "first_step", "id"]
    )
    op.create_index(
        op.f("ix_events_run_id_rule_layer_last_step"),
        "events",
        ["run_id", "rule", "layer", "last_step"],
    )

    op.create_table(
        "detector_counts",
        *_run_id("detector_counts"),
        sa.Column("rule", sa.String(length=16), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "rule", "severity", name=op.f("pk_detector_counts")),
    )
    op.create_table(
        "detector_states",
        *_run_id("detector_states"),
        sa.Column("state", sa.LargeBinary(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_detector_states")),
    )
    op.create_table(
        "project_settings",
        sa.Column("project", sa.String(length=100), nullable=False),
        sa.Column("detectors", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("project", name=op.f("pk_project_settings")),
    )


def downgrade() -> None:
    """Drop the detector tables and the window columns (events and thresholds are lost)."""
    op.drop_table("project_settings")
    op.drop_table("detector_states")
    op.drop_table("detector_counts")
    op.drop_index(op.f("ix_events_run_id_rule_layer_last_step"), table_name="events")
    op.drop_index(op.f("ix_events_run_id_first_step_id"), table_name="events")
    op.drop_table("events")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("top_layers")
        batch.drop_column("norm_window_previous_max")
        batch.drop_column("norm_window_started_at")
        batch.drop_column("norm_window_max")
