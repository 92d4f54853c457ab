"""Training-step overhead of gradwatch, as ratios measured side by side in one run.

Compares ``Adam(global_clipnorm=1)`` alone against ``Adam`` wrapped by a
GradientMonitor with ``clip.global_norm(1)`` (same rule, plus per-layer norms,
the in-graph ring buffer, a host read every ``flush_every`` steps and the
sender thread serialising every batch), in graph mode and under XLA. Configs
are interleaved and each is timed several times; the median is reported.

    python bench/overhead.py [--steps 150] [--repeats 5]

Model: 25 Dense(500) layers = 50 variables, 6.3M parameters, batch 64.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

from gradwatch.agent import GradientMonitor, clip
from gradwatch.agent.transport import RunInfo

WIDTH, DEPTH, BATCH = 500, 25, 64


class _DiscardTransport:
    """Accepts and drops everything: isolates the agent's own cost from the network."""

    def create_run(self, run: RunInfo) -> None: ...
    def send_batch(self, run_id: str, batch: dict[str, Any]) -> None: ...
    def set_status(self, run_id: str, status: str) -> None: ...
    def close(self) -> None: ...


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    layers: list[Any] = [keras.Input((WIDTH,))]
    layers += [keras.layers.Dense(WIDTH, activation="relu") for _ in range(DEPTH - 1)]
    layers.append(keras.layers.Dense(1))
    return keras.Sequential(layers)


def _setup(monitored: bool, jit: bool) -> tuple[keras.Model, list[Any]]:
    model = _model()
    callbacks: list[Any] = []
    if monitored:
        monitor = GradientMonitor(
            run="bench", policy=clip.global_norm(1.0), flush_every=50, transport=_DiscardTransport()
        )
        model.compile(
            optimizer=monitor.wrap(keras.optimizers.Adam(1e-4)), loss="mse", jit_compile=jit
        )
        callbacks.append(monitor)
    else:
        model.compile(
            optimizer=keras.optimizers.Adam(1e-4, global_clipnorm=1.0), loss="mse", jit_compile=jit
        )
    return model, callbacks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="steps per timed fit")
    parser.add_argument("--repeats", type=int, default=5, help="timed fits per config")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * args.steps, WIDTH)).astype("float32")
    y = rng.normal(size=(BATCH * args.steps, 1)).astype("float32")

    configs = {(m, j): _setup(m, j) for j in (False, True) for m in (False, True)}
    params = configs[(False, False)][0].count_params()
    for model, callbacks in configs.values():  # trace and warm up
        model.fit(
            x[: BATCH * 10], y[: BATCH * 10], batch_size=BATCH, verbose=0, callbacks=callbacks
        )
    times: dict[tuple[bool, bool], list[float]] = {key: [] for key in configs}
    for _ in range(args.repeats):
        for key, (model, callbacks) in configs.items():
            start = time.perf_counter()
            model.fit(x, y, batch_size=BATCH, verbose=0, shuffle=False, callbacks=callbacks)
            times[key].append((time.perf_counter() - start) / args.steps)

    print(
        f"MLP {DEPTH}×Dense({WIDTH}), {params / 1e6:.1f}M parameters, "
        f"{2 * DEPTH} variables, batch {BATCH}; {args.steps} steps × {args.repeats} repeats"
    )
    print(f"{'mode':<6} {'global_clipnorm ms/step':>24} {'gradwatch ms/step':>18} {'ratio':>7}")
    for jit in (False, True):
        base = statistics.median(times[(False, jit)]) * 1e3
        ours = statistics.median(times[(True, jit)]) * 1e3
        print(f"{'XLA' if jit else 'graph':<6} {base:>24.2f} {ours:>18.2f} {ours / base:>7.3f}")
    for _, callbacks in configs.values():
        for callback in callbacks:
            callback.close()


if __name__ == "__main__":
    main()
