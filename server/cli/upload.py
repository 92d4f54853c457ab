"""``gradwatch upload``: send local-mode runs or a leftover spool to a server."""

from __future__ import annotations

from typing import Annotated

import typer

__all__ = ["upload"]


def upload(
    path: Annotated[
        str,
        typer.Argument(
            metavar="PATH",
            help="A local-mode run file (*.jsonl), a directory of them, or a spool directory "
            "(one run's, or the whole spool root).",
        ),
    ],
    server: Annotated[
        str,
        typer.Option(
            envvar="GRADWATCH_SERVER",
            metavar="URL",
            help="Server base URL, e.g. http://127.0.0.1:8000.",
        ),
    ],
    token: Annotated[
        str | None,
        typer.Option(
            envvar="GRADWATCH_TOKEN",
            metavar="TOKEN",
            help="API token with the ingest scope, if the server requires one.",
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option(min=0.1, metavar="SECONDS", help="Timeout of one request.")
    ] = 30.0,
    retry_deadline: Annotated[
        float,
        typer.Option(min=0.1, metavar="SECONDS", help="How long to retry one request (5xx, 429)."),
    ] = 60.0,
) -> None:
    """Send local runs or a leftover spool to a server; uploading twice stores nothing new.

    Each run is created if missing, its batches are sent in step order (batches the server
    already has are acknowledged without storing anything) and its last status is set.
    The files are only read. Exits with 1 if a batch could not be uploaded.
    """
    import os
    from pathlib import Path

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is imported
    from gradwatch.agent.config import ConfigError, check_server_url
    from gradwatch.agent.transport import HttpTransport, RetryPolicy
    from gradwatch.agent.upload import UploadResult
    from gradwatch.agent.upload import upload as upload_runs

    try:
        url = check_server_url(server)
    except ConfigError as error:
        raise typer.BadParameter(str(error), param_hint="--server") from None

    def report(result: UploadResult) -> None:
        typer.echo(
            f"{result.source}: run {result.name!r} ({result.run_id}): {result.batches} batches, "
            f"{result.stored} stored, {result.duplicates} already stored, {result.failed} failed"
            + (f"; status {result.status}" if result.status else "")
        )

    transport = HttpTransport(url, timeout_seconds=timeout, token=token)
    try:
        results = upload_runs(
            Path(path), transport, RetryPolicy(deadline_seconds=retry_deadline), on_result=report
        )
    except (OSError, ValueError) as error:
        typer.echo(f"gradwatch upload: {error}", err=True)
        raise typer.Exit(code=2) from None
    finally:
        transport.close()
    if not all(result.ok for result in results):
        raise typer.Exit(code=1)
