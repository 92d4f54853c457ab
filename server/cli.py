"""The ``gradwatch`` command: ``server`` and ``demo``."""

from __future__ import annotations

from typing import Annotated

import typer

__all__ = ["app", "main"]

app = typer.Typer(
    help="gradwatch: gradient-health monitoring for TensorFlow/Keras training.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def server(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    database_url: Annotated[
        str | None,
        typer.Option(help="SQLAlchemy URL; default $GRADWATCH_DATABASE_URL or ./gradwatch.db."),
    ] = None,
) -> None:
    """Run the gradwatch server (upgrades the database schema on start)."""
    import uvicorn

    from gradwatch.server.app import create_app
    from gradwatch.server.config import Settings

    settings = Settings() if database_url is None else Settings(database_url=database_url)
    uvicorn.run(create_app(settings), host=host, port=port)


@app.command()
def demo(
    server: Annotated[
        str | None, typer.Option(help="Stream to this server instead of an embedded one.")
    ] = None,
    database_url: Annotated[
        str | None, typer.Option(help="Database of the embedded server (default: a temp file).")
    ] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs per run.")] = 4,
    keep_serving: Annotated[
        bool, typer.Option(help="Keep the embedded server up after the runs, until Ctrl-C.")
    ] = False,
) -> None:
    """Train a stable and an exploding Keras run and stream both to a server."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is imported
    try:
        import keras  # noqa: F401
    except ImportError:
        raise typer.BadParameter(
            "the demo needs TensorFlow: pip install 'gradwatch[all]'", param_hint="demo"
        ) from None
    from gradwatch.server.demo import run_demo

    run_demo(server=server, database_url=database_url, epochs=epochs, keep_serving=keep_serving)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
