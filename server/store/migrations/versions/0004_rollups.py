"""Chunk rollups of the per-layer metrics (``rollups``), built from the stored blocks.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from gradwatch.server.store.rollup import rebuild_rollups

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``rollups`` and fill it from every stored run's blocks (decodes every value once:
    about a minute per 10⁸ values)."""
    op.create_table(
        "rollups",
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("metric", sa.String(length=32), nullable=False),
        sa.Column("chunk", sa.BigInteger(), nullable=False),
        sa.Column("series", sa.LargeBinary(), nullable=False),
        sa.Column("vmax", sa.LargeBinary(), nullable=False),
        sa.Column("nan_count", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_rollups_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "metric", "chunk", name=op.f("pk_rollups")),
        sqlite_with_rowid=False,
    )
    # The backfill reads blocks through today's store code: the blocks table is unchanged
    # since 0001, and a later migration that changes it must rebuild rollups itself.
    rebuild_rollups(op.get_bind())


def downgrade() -> None:
    """Drop ``rollups``."""
    op.drop_table("rollups")
