"""``gradwatch db prune`` and ``gradwatch db backup``: retention and backups.

Both open the database directly (like ``db upgrade`` and ``token``), not the REST API.
Expected failures are one line on stderr with exit 2 (bad option, bad or unreachable
database, missing ``pg_dump``, existing backup file); see ``exits.py``.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .database import DatabaseUrlOption, database_errors, open_database
from .exits import CliError, ExitCode, report_errors

if TYPE_CHECKING:
    from ..store.retention import PruneReport, SqliteSpace

__all__ = ["db_backup", "db_prune", "parse_duration"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")


def parse_duration(text: str) -> timedelta:
    """Parse ``90d``, ``12h``, ``30m``, ``45s`` or ``2w`` (a positive number and one unit).

    Pure. Raises ValueError with the accepted forms when ``text`` is not one.
    """
    match = _DURATION.match(text.strip().lower())
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(
            f"{text!r} is not a positive duration; write a number and a unit, "
            "s, m, h, d or w (e.g. 30m, 12h, 90d)"
        )
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def db_prune(
    older_than: Annotated[
        str,
        typer.Option(
            metavar="DURATION",
            help="Delete finished or failed runs last active longer ago than this: 90d, 12h, "
            "30m (units s, m, h, d, w).",
        ),
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only say what would be deleted.")
    ] = False,
    vacuum: Annotated[
        bool,
        typer.Option(
            "--vacuum",
            help="SQLite: VACUUM afterwards to shrink the file (locks the database while it "
            "rewrites it; ingest waits).",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Delete finished or failed runs older than DURATION, with all their data.

    Deletes in small transactions, so the server keeps ingesting while it runs; running runs
    are never deleted. SQLite keeps the freed pages for new data (--vacuum shrinks the file).
    """
    from ..config import Settings
    from ..store.retention import prune_runs, sqlite_space, vacuum_sqlite

    try:
        age = parse_duration(older_than)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--older-than") from None
    if vacuum and dry_run:
        raise typer.BadParameter("--vacuum deletes nothing in a --dry-run", param_hint="--vacuum")
    url = database_url or Settings().database_url
    cutoff = datetime.now(UTC) - age
    vacuumed: SqliteSpace | None = None
    with report_errors("db prune"), open_database(url, "db prune") as database:
        if vacuum and database.engine.dialect.name != "sqlite":
            raise CliError(
                "--vacuum is for SQLite; on PostgreSQL autovacuum makes the freed space "
                "reusable (VACUUM FULL returns it to the OS but locks each table)",
                ExitCode.USAGE,
            )
        with database_errors("db prune", url):
            report = prune_runs(database, cutoff, dry_run=dry_run)
            assert report is not None  # waiting for another pass never gives up
            space = sqlite_space(database)
            if vacuum:
                vacuum_sqlite(database)
                vacuumed = sqlite_space(database)
    if as_json:
        typer.echo(json.dumps(_report_json(report, cutoff, space, vacuumed)))
        return
    _print_report(report, older_than, cutoff, space, vacuumed)


def _report_json(
    report: PruneReport, cutoff: datetime, space: SqliteSpace | None, vacuumed: SqliteSpace | None
) -> dict[str, object]:
    def sizes(value: SqliteSpace | None) -> dict[str, int] | None:
        return None if value is None else {"file": value.file_bytes, "free": value.free_bytes}

    return {
        "dry_run": report.dry_run,
        "cutoff": cutoff.isoformat(),
        "runs": list(report.run_ids),
        "rows": report.rows,
        "sample_bytes": report.sample_bytes,
        "sqlite_bytes": sizes(space),
        "sqlite_bytes_after_vacuum": sizes(vacuumed),
    }


def _print_report(
    report: PruneReport,
    older_than: str,
    cutoff: datetime,
    space: SqliteSpace | None,
    vacuumed: SqliteSpace | None,
) -> None:
    verb = "would delete" if report.dry_run else "deleted"
    when = cutoff.isoformat(timespec="seconds")
    typer.echo(
        f"{verb} {len(report.run_ids)} finished or failed runs last active before {when} "
        f"(older than {older_than})"
    )
    if report.run_ids:
        counts = ", ".join(f"{table} {count}" for table, count in report.rows.items() if count)
        typer.echo(f"  rows: {counts}")
        typer.echo(f"  packed samples: {_bytes(report.sample_bytes)}")
    if space is not None and not report.dry_run:
        if vacuumed is not None:
            typer.echo(
                f"SQLite file: {_bytes(space.file_bytes)} before VACUUM, "
                f"{_bytes(vacuumed.file_bytes)} after"
            )
        else:
            typer.echo(
                f"SQLite file: {_bytes(space.file_bytes)}, of which {_bytes(space.free_bytes)} "
                "free pages that new data reuses; SQLite shrinks the file only on VACUUM "
                "(--vacuum; it locks the database while it runs)"
            )


def _bytes(value: int) -> str:
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def db_backup(
    path: Annotated[
        Path,
        typer.Argument(
            metavar="PATH",
            help="File to write: a SQLite database file, or a pg_dump custom-format archive.",
        ),
    ],
    force: Annotated[bool, typer.Option("--force", help="Replace PATH if it exists.")] = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Back up the database to PATH while the server keeps running.

    SQLite: a copy of the database file (SQLite's online backup API). PostgreSQL: a pg_dump
    custom-format archive (pg_dump -Fc; restore it with pg_restore).
    """
    from ..config import Settings
    from ..store.backup import BackupError, backup_database

    url = database_url or Settings().database_url
    with report_errors("db backup"), database_errors("db backup", url):
        try:
            size = backup_database(url, path, overwrite=force)
        except BackupError as error:
            raise CliError(str(error), ExitCode.USAGE) from None
    typer.echo(f"backed up to {path} ({_bytes(size)})", err=True)
