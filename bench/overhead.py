"""Training-step overhead of gradwatch, as ratios measured side by side in one run.

Two comparisons, each in graph mode and under XLA (``jit_compile=True``):

* monitoring only: plain ``Adam`` against ``Adam`` wrapped by a GradientMonitor
  with no policy (per-layer norms, non-finite counts, the in-graph ring
  buffer, a host read every ``flush_every`` steps, the sender thread
  serialising every batch);
* clipping: ``Adam(global_clipnorm=1)`` against ``Adam`` wrapped with
  ``clip.global_norm(1)`` (the same rule, plus everything above).

Configs are interleaved, each timed ``--repeats`` times. The machines here are
shared and noise only ever adds time, so the ratio of the best times is the
headline; the ratio of medians is printed beside it.

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


CONFIGS = {
    "adam": (False, False),
    "adam+monitor": (True, False),
    "adam(global_clipnorm=1)": (False, True),
    "adam+clip.global_norm(1)": (True, True),
}
COMPARISONS = (("adam", "adam+monitor"), ("adam(global_clipnorm=1)", "adam+clip.global_norm(1)"))


def _setup(monitored: bool, clipped: bool, jit: bool) -> tuple[keras.Model, list[Any]]:
    model = _model()
    callbacks: list[Any] = []
    if monitored:
        monitor = GradientMonitor(
            run="bench",
            policy=clip.global_norm(1.0) if clipped else None,
            flush_every=50,
            transport=_DiscardTransport(),
        )
        optimizer = monitor.wrap(keras.optimizers.Adam(1e-4))
        callbacks.append(monitor)
    else:
        optimizer = keras.optimizers.Adam(1e-4, global_clipnorm=1.0 if clipped else None)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit)
    return model, callbacks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="steps per timed fit")
    parser.add_argument("--repeats", type=int, default=5, help="timed fits per config")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * args.steps, WIDTH)).astype("float32")
    y = rng.normal(size=(BATCH * args.steps, 1)).astype("float32")

    configs = {
        (name, jit): _setup(*flags, jit) for jit in (False, True) for name, flags in CONFIGS.items()
    }
    params = configs[("adam", False)][0].count_params()
    for model, callbacks in configs.values():  # trace and warm up
        model.fit(
            x[: BATCH * 10], y[: BATCH * 10], batch_size=BATCH, verbose=0, callbacks=callbacks
        )
    times: dict[tuple[str, bool], list[float]] = {key: [] for key in configs}
    for _ in range(args.repeats):
        for key, (model, callbacks) in configs.items():
            start = time.perf_counter()
            model.fit(x, y, batch_size=BATCH, verbose=0, shuffle=False, callbacks=callbacks)
            times[key].append((time.perf_counter() - start) / args.steps * 1e3)

    print(
        f"MLP {DEPTH}×Dense({WIDTH}), {params / 1e6:.1f}M parameters, {2 * DEPTH} variables, "
        f"batch {BATCH}; {args.steps} steps × {args.repeats} repeats; ms/step best (median)"
    )
    print(
        f"{'mode':<6} {'baseline':<24} {'':>15} {'gradwatch':<25} {'':>15} {'ratio best':>10} "
        f"{'(median)':>9}"
    )
    for jit in (False, True):
        for base_name, ours_name in COMPARISONS:
            base, ours = times[(base_name, jit)], times[(ours_name, jit)]
            print(
                f"{'XLA' if jit else 'graph':<6} {base_name:<24} {min(base):>6.2f} "
                f"({statistics.median(base):>6.2f}) {ours_name:<25} {min(ours):>6.2f} "
                f"({statistics.median(ours):>6.2f}) {min(ours) / min(base):>10.3f} "
                f"({statistics.median(ours) / statistics.median(base):>7.3f})"
            )
    for _, callbacks in configs.values():
        for callback in callbacks:
            callback.close()


if __name__ == "__main__":
    main()
