"""Onset analysis of run-level events (``events.onset``, JSON, nullable).

Events stored before this revision keep NULL: their onset was never measured, and the
departures it needs were not kept then, so nothing can be backfilled.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-12
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the nullable ``onset`` column to ``events``."""
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("onset", sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    """Drop ``events.onset``."""
    with op.batch_alter_table("events") as batch:
        batch.drop_column("onset")
