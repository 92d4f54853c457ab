"""Time to the first training step: what gradwatch adds to tracing (and XLA compiling) the step.

Every measurement runs in a fresh Python process (nothing traced or compiled before it),
which imports TensorFlow, builds the model and times ``model.fit`` of one step: the
trace of the train function, its compilation under XLA, and the step itself. Configs:

* ``plain``: ``Adam``, no monitor: the baseline;
* ``monitor``: ``Adam`` + GradientMonitor with the defaults (no policy, incident capture armed);
* ``global_norm``: the monitor with ``clip.global_norm(1)``;
* ``zclip``: the monitor with ``clip.zclip()``.

The processes of a repeat run one after the other, repeats alternate the configs, so load
that comes and goes on a shared machine hits them all; the median of the repeats is shown.

    python -m bench.first_step [--repeats 3] [--depth 50] [--jit]

Model: an MLP of ``depth`` Dense(350) layers (``bench.agent_overhead``'s at the default
depth), batch 256, CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

CONFIGS = ("plain", "monitor", "global_norm", "zclip")


def _child(config: str, depth: int, jit: bool) -> dict[str, float]:
    """In the fresh process: seconds of the first one-step ``fit`` (and of a second one)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np

    from bench.agent_overhead import BATCH, WIDTH, DiscardTransport, mlp_layers
    from gradwatch.agent import GradientMonitor, clip

    keras.utils.set_random_seed(0)
    model = keras.Sequential(mlp_layers(depth))
    callbacks: list[Any] = []
    if config != "plain":
        policies = {"monitor": None, "global_norm": clip.global_norm(1.0), "zclip": clip.zclip()}
        callbacks.append(
            GradientMonitor(run="bench", policy=policies[config], transport=DiscardTransport())
        )
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="mse", jit_compile=jit)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, WIDTH)).astype("float32")
    y = rng.normal(size=(BATCH, 1)).astype("float32")
    seconds = []
    for _ in range(2):  # the first traces (and compiles); the second is a warm step
        start = time.perf_counter()
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=callbacks)
        seconds.append(time.perf_counter() - start)
    for callback in callbacks:
        callback.close()
    return {"first": seconds[0], "warm": seconds[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per config")
    parser.add_argument("--depth", type=int, default=50, help="Dense layers of the MLP")
    parser.add_argument("--jit", action="store_true", help="jit_compile=True (XLA)")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.depth, args.jit)))
        return
    if args.repeats < 1 or args.depth < 2:
        parser.error("--repeats must be ≥ 1 and --depth ≥ 2")
    first: dict[str, list[float]] = {c: [] for c in CONFIGS}
    warm: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for _ in range(args.repeats):
        for config in CONFIGS:
            command = [sys.executable, "-m", "bench.first_step", "--child", config]
            command += ["--depth", str(args.depth)] + (["--jit"] if args.jit else [])
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            first[config].append(result["first"])
            warm[config].append(result["warm"])
    print(
        f"MLP {args.depth}×Dense(350), batch 256, {'XLA' if args.jit else 'graph'} "
        f"mode; first one-step fit in a fresh process, median of {args.repeats}"
    )
    base = statistics.median(first["plain"])
    print(f"{'config':<12} {'first fit, s':>12} {'÷ plain':>8} {'warm fit, s':>12}  all first fits")
    for config in CONFIGS:
        median = statistics.median(first[config])
        spread = " ".join(f"{s:.2f}" for s in first[config])
        print(
            f"{config:<12} {median:>12.2f} {median / base:>8.2f} "
            f"{statistics.median(warm[config]):>12.3f}  {spread}"
        )


if __name__ == "__main__":
    main()
