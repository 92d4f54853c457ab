"""Incident bundles announced by the agent (``incidents``: one row per run and step).

The agent writes a bundle (the state just before a bad step) on the training host and
announces it with the next batch; the server keeps where it lies and what it holds, so
events, the run's health, the web UI and ``gradwatch show`` can point at it. Nothing to
backfill: bundles written before this revision were never announced.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``incidents``."""
    op.create_table(
        "incidents",
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("cause", sa.String(16), nullable=False),
        sa.Column("path", sa.String(4096), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("format", sa.String(64), nullable=False),
        sa.Column("learning_rate", sa.Double(), nullable=True),
        sa.Column("loss_scale", sa.Double(), nullable=True),
        sa.Column("recorded", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("announced_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_incidents_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "step", name=op.f("pk_incidents")),
    )


def downgrade() -> None:
    """Drop ``incidents``."""
    op.drop_table("incidents")
