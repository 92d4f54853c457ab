"""``gradwatch demo``: two small Keras runs streamed to a gradwatch server.

The first run trains with a stable learning rate throughout. The second trains
just as calmly for 80% of its steps, then its learning rate jumps to one large
enough to make the gradients explode: the way a real run blows up at step
41,000, after the detectors have learnt what its healthy norms look like. Both
use ``clip.global_norm``, so the exploding run shows clipped steps, a global
norm far above the stable run's and explosion events on the server. Everything
is generated here; nothing is downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .client import ApiClient
from .exits import report_errors
from .training import (
    EmbeddedDatabaseOption,
    TrainingServerOption,
    TrainingTokenOption,
    serve_until_interrupted,
    training_server,
)

__all__ = ["DemoRun", "demo", "run_demo"]


@dataclass(frozen=True, slots=True)
class DemoRun:
    """One training run of the demo.

    Attributes:
        name: Run name.
        learning_rate: SGD learning rate.
        explosive_learning_rate: Learning rate from ``explode_at`` (a fraction of the run's
            steps) on, or None to keep ``learning_rate`` throughout.
        explode_at: Fraction of the steps after which ``explosive_learning_rate`` applies.
            With the default 5 epochs (320 steps) that is step 256, after the server's
            detectors have finished learning the run's baseline (``warmup_steps``, 200).
    """

    name: str
    learning_rate: float
    explosive_learning_rate: float | None = None
    explode_at: float = 0.8


DEMO_RUNS = (
    DemoRun("demo-stable", learning_rate=0.01),
    DemoRun("demo-exploding", learning_rate=0.01, explosive_learning_rate=2.0),
)


def _make_data(seed: int) -> tuple[Any, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2048, 32)).astype("float32")
    w = rng.normal(size=(32, 1)).astype("float32")
    y = (np.tanh(x @ w) + 0.1 * rng.normal(size=(2048, 1))).astype("float32")
    return x, y


def _train(
    run: DemoRun,
    server: str,
    epochs: int,
    progress: Progress,
    console: Console,
    token: str | None,
) -> str:
    import keras

    from gradwatch.agent import GradientMonitor, clip

    x, y = _make_data(seed=0)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((32,)),
            keras.layers.Dense(64, activation="relu", name="hidden_1"),
            keras.layers.Dense(64, activation="relu", name="hidden_2"),
            keras.layers.Dense(1, name="output"),
        ],
        name="demo_mlp",
    )
    steps = epochs * (len(x) // 32)
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule = run.learning_rate
    if run.explosive_learning_rate is not None:
        learning_rate = keras.optimizers.schedules.PiecewiseConstantDecay(
            [int(steps * run.explode_at)], [run.learning_rate, run.explosive_learning_rate]
        )
    model.compile(optimizer=keras.optimizers.SGD(learning_rate, momentum=0.9), loss="mse")
    task = progress.add_task(run.name, total=steps)

    class _Progress(keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            progress.advance(task)

    with GradientMonitor(
        run=run.name,
        server=server,
        project="demo",
        policy=clip.global_norm(5.0),
        flush_every=25,
        token=token,
    ) as monitor:
        model.fit(x, y, batch_size=32, epochs=epochs, verbose=0, callbacks=[monitor, _Progress()])
        if not monitor.flush(timeout_seconds=30.0):
            console.print(f"[yellow]{run.name}: not every batch was delivered in time")
    return monitor.run_id


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _describe_health(health: dict[str, Any]) -> str:
    """The verdict and the rules that fired, e.g. ``critical: explosion 12, nonfinite 3``."""
    fired = [
        f"{rule} {sum(by_severity.values())}"
        for rule, by_severity in health["detections"].items()
        if sum(by_severity.values())
    ]
    return f"{health['verdict']}: {', '.join(fired)}" if fired else str(health["verdict"])


def _summarise(client: ApiClient, run_ids: list[str], console: Console) -> list[dict[str, Any]]:
    table = Table(title="gradwatch demo")
    columns = ("run", "steps", "max global norm", "clipped steps", "non-finite steps", "health")
    for column in columns:
        # The run's name whole (the text below tells the user which run to open first); the
        # numeric headers wrap instead in an 80-column terminal.
        table.add_column(
            column,
            justify="left" if column in ("run", "health") else "right",
            no_wrap=column == "run",
        )
    runs = [client.run(run_id) for run_id in run_ids]
    healths = [client.health(run_id) for run_id in run_ids]
    for run, health in zip(runs, healths, strict=True):
        table.add_row(
            run["name"],
            _fmt(run["num_steps"]),
            _fmt(run["max_global_norm"]),
            _fmt(run["clipped_steps"]),
            _fmt(run["nonfinite_steps"]),
            _describe_health(health),
        )
    console.print(table)
    _print_urls(client.server, runs, console)
    return runs


def _print_urls(server: str, runs: list[dict[str, Any]], console: Console) -> None:
    """The web UI's pages of the demo (the exploding run's first), and the CLI's view."""
    by_name = sorted(runs, key=lambda run: run["name"] != "demo-exploding")
    rows = [("runs", f"{server}/")]
    rows += [(str(run["name"]), f"{server}/runs/{run['run_id']}") for run in by_name]
    rows.append(("compare", f"{server}/compare?runs={','.join(r['run_id'] for r in runs)}"))
    rows.append(("API docs", f"{server}/docs"))
    rows.append(("Prometheus metrics", f"{server}/metrics"))
    console.print(
        "Open in a browser (start with demo-exploding: its run page shows the blow-up):",
        highlight=False,
    )
    for label, url in rows:
        console.print(f"  {label:<20}{url}", soft_wrap=True, highlight=False)
    if by_name:
        console.print(
            f"In a terminal: gradwatch show {by_name[0]['run_id'][:8]} --server {server}",
            soft_wrap=True,
            highlight=False,
        )


def run_demo(
    server: str | None,
    database_url: str | None,
    epochs: int,
    keep_serving: bool,
    token: str | None = None,
) -> list[dict[str, Any]]:
    """Train the demo runs against ``server``, or an embedded one when ``None``.

    Blocks until both runs are trained and summarised (and, with
    ``keep_serving``, until interrupted). The URLs it prints point at the embedded
    server, so they stop working when it returns unless ``keep_serving``.

    Returns:
        The runs as the server reports them (``GET /api/v1/runs/{id}``).

    Raises:
        CliError: ``server`` is not a URL (usage) or does not answer (unreachable), or
            refuses ``token``.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    console = Console()
    runs: list[dict[str, Any]] = []
    try:
        with (
            training_server(server, database_url, "demo", console) as target,
            ApiClient(target.url, token) as client,
        ):
            client.get("/healthz")
            run_ids = []
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
            ) as progress:
                for run in DEMO_RUNS:
                    run_ids.append(_train(run, client.server, epochs, progress, console, token))
            runs = _summarise(client, run_ids, console)
            if target.embedded:
                if keep_serving:
                    serve_until_interrupted(console)
                else:
                    console.print(_urls_die_note(database_url), highlight=False)
    except KeyboardInterrupt:
        pass
    return runs


def _urls_die_note(database_url: str | None) -> str:
    """Why the printed URLs are dead once the demo returns, and how to keep them."""
    keep = database_url or "sqlite:///demo.db"
    data = (
        f"serve the data later with `gradwatch server --database-url {keep}`"
        if database_url
        else f"keep the data with `--database-url {keep}` and serve it later with "
        f"`gradwatch server --database-url {keep}`"
    )
    return (
        "[bold yellow]These URLs stop working now:[/bold yellow] the embedded server stops when "
        "the demo ends. Run `gradwatch demo --keep-serving` to keep it up and open them, or "
        f"{data} (same run ids, at http://127.0.0.1:8000)."
    )


def demo(
    server: TrainingServerOption = None,
    token: TrainingTokenOption = None,
    database_url: EmbeddedDatabaseOption = None,
    epochs: Annotated[
        int,
        typer.Option(
            min=1,
            metavar="N",
            help="Epochs per run (64 steps each). The exploding run explodes after 80% of its "
            "steps; the server's detectors learn a baseline over 200 steps first, so explosion "
            "events need at least 4 epochs.",
        ),
    ] = 5,
    keep_serving: Annotated[
        bool,
        typer.Option(
            "--keep-serving",
            help="Keep the embedded server (and the printed URLs) up after the runs, until "
            "Ctrl-C. Without it the URLs stop working when the demo ends.",
        ),
    ] = False,
) -> None:
    """Train a stable and an exploding Keras run and stream both to a server.

    Ends with a table of both runs and the URLs of their pages in the web UI.
    """
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is imported
    try:
        import keras  # noqa: F401
    except ImportError:
        raise typer.BadParameter(
            "the demo needs TensorFlow: pip install 'gradwatch[all]'", param_hint="demo"
        ) from None
    with report_errors("demo"):
        run_demo(
            server=server,
            database_url=database_url,
            epochs=epochs,
            keep_serving=keep_serving,
            token=token,
        )
