"""Delivery cost: training step time with the server up vs down, and the agent's memory
with a full in-memory queue.

1. Step time. One run, one model, one monitor streaming to a real ``gradwatch server``
   subprocess on 127.0.0.1. Phases alternate ``--repeats`` times: server up (steady
   delivery), then server stopped (the sender retries until ``--retry-deadline``, then
   spools to disk and keeps probing the server), then up again. Each phase trains
   ``--steps`` steps; before each phase the sender is flushed so phases do not leak work
   into each other. Reported: mean ms/step of each phase, the median over phases of each
   kind and their ratio down/up.

2. Memory. A sender whose transport never answers, fed batches of ``--flush-every``
   steps × L layers until ``submit`` refuses one (queue full, by count or by bytes).
   Reported: batches held and the peak of traced allocations (``tracemalloc``: Python
   objects and NumPy arrays), for the default caps (1000 batches, 64 MiB) and with the
   byte cap lifted (what 1000 batches would cost).

    python -m bench.delivery [--steps 400] [--repeats 3] [--flush-every 10]

Model: an MLP of 12 Dense(256) layers (24 variables, 0.8M parameters), batch 64, CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

from gradwatch.agent import GradientMonitor
from gradwatch.agent.sender import Sender
from gradwatch.agent.transport import RunInfo
from tests.fakes import BlockingTransport, step_batch
from tests.server_process import ServerProcess

WIDTH, DEPTH, BATCH = 256, 12, 64


class _StepTimer(keras.callbacks.Callback):  # type: ignore[misc]
    """Wall time between consecutive ``on_train_batch_end`` calls (callbacks included)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._last = None

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    layers: list[Any] = [keras.Input((WIDTH,))]
    layers += [keras.layers.Dense(WIDTH, activation="relu") for _ in range(DEPTH - 1)]
    layers.append(keras.layers.Dense(1))
    model = keras.Sequential(layers)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="mse")
    return model


def step_time(steps: int, repeats: int, flush_every: int, retry_deadline: float) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps * BATCH, WIDTH)).astype("float32")
    y = rng.normal(size=(steps * BATCH, 1)).astype("float32")
    with tempfile.TemporaryDirectory() as directory:
        server = ServerProcess(Path(directory) / "bench.db")
        server.start()
        monitor = GradientMonitor(
            run="bench-delivery",
            server=server.url,
            flush_every=flush_every,
            retry_deadline_seconds=retry_deadline,
            spool_dir=str(Path(directory) / "spool"),
        )
        model = _model()
        timer = _StepTimer()

        def phase() -> float:
            timer.times.clear()
            model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[monitor, timer])
            return statistics.fmean(timer.times) * 1e3

        try:
            phase()  # warm-up: tracing
            up: list[float] = []
            down: list[float] = []
            spooled = 0
            for _ in range(repeats):
                monitor.flush(120)
                up.append(phase())
                server.stop()
                down.append(phase())
                spooled = max(spooled, monitor.sender.spooled_batches)
                server.start()
            delivered = monitor.close(120)
        finally:
            server.stop()
    print(
        f"step time, {DEPTH} Dense({WIDTH}) layers, batch {BATCH}, flush_every={flush_every}, "
        f"{steps} steps per phase, {repeats} phases each (mean ms/step of each phase):"
    )
    print(f"  server up  : {' '.join(f'{v:.2f}' for v in up)}  -> {statistics.median(up):.2f}")
    print(
        f"  server down: {' '.join(f'{v:.2f}' for v in down)}  -> {statistics.median(down):.2f}"
        f"  (spool held up to {spooled} batches)"
    )
    print(f"  ratio down/up: {statistics.median(down) / statistics.median(up):.3f}")
    print(f"  everything delivered after the last restart: {delivered}")
    print(f"  dropped: {monitor.dropped_batches or 'none'}")


def queue_memory(flush_every: int) -> None:
    print(f"memory with a full in-memory queue (batches of {flush_every} steps):")
    for layers in (50, 500):
        layer_names = [f"model/layer_{i}" for i in range(layers)]
        for queue_max_bytes, label in ((64 * 2**20, "default caps"), (2**62, "no byte cap")):
            transport = BlockingTransport()
            run = RunInfo("00000000-0000-4000-8000-00000000be00", "bench", "bench")
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
            sender = Sender(transport, run, queue_max_bytes=queue_max_bytes)
            held = 0
            while sender.submit(
                step_batch(held * flush_every, flush_every, layer_names, loss_known=True)
            ):
                held += 1
            current, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            sender.close(0.01)
            print(
                f"  {layers:4d} layers, {label:12s}: {held:5d} batches held, "
                f"peak {(peak - base) / 2**20:7.1f} MiB "
                f"({(current - base) / max(held, 1) / 1024:.1f} KiB per batch)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="steps per phase")
    parser.add_argument("--repeats", type=int, default=3, help="up/down phase pairs")
    parser.add_argument("--flush-every", type=int, default=10, help="steps per batch")
    parser.add_argument("--retry-deadline", type=float, default=2.0, help="seconds, then spool")
    parser.add_argument("--skip-step-time", action="store_true")
    args = parser.parse_args()
    if not args.skip_step_time:
        step_time(args.steps, args.repeats, args.flush_every, args.retry_deadline)
    queue_memory(50)


if __name__ == "__main__":
    main()
