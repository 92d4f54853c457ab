"""PostgreSQL: ``series`` pages keep half their space free (``fillfactor = 50``).

Every ingested batch rewrites the running summary of each of its series (about a thousand
rows at 500 layers). With full pages PostgreSQL could not put the new row versions beside the
old ones: each update went to another page and added an entry to both of the table's indexes,
and the table grew by ~20 pages a batch until vacuum caught up. With room on the page the
updates are heap-only (HOT): in ``bench.ingest``'s 30-batch run 99 % of them instead of 2 %,
the table stays at 42 pages instead of 637, and the batch's ``UPDATE`` takes ~3 ms instead of
~10 ms on the server. The summary columns are not indexed, so every such update can be HOT.

Only pages written from now on are affected (new runs' series, and rows moved by updates);
a ``VACUUM FULL series`` rewrites the existing ones. SQLite has no such setting: nothing to do.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-20
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Set ``fillfactor = 50`` on ``series`` (PostgreSQL only)."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE series SET (fillfactor = 50)")


def downgrade() -> None:
    """Back to the default fill factor (PostgreSQL only)."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE series RESET (fillfactor)")
