"""Training-step overhead of gradwatch: median step-time ratios measured side by side.

Configs, interleaved in one process (each timed ``--repeats`` times; the median and
the best of the repeats are kept, the best being robust to other load on a shared machine;
the process's CPU time per step is kept too: it counts this process's work only, so it
swings less than wall time when other processes share the cores):

(a) ``Adam(global_clipnorm=1)``: Keras' own clipping, the baseline;
(b) ``Adam`` + GradientMonitor with ``clip.global_norm(1)``, ``flush_every=50``:
    per-layer norms, non-finite counts, the in-graph ring, a host read every 50
    steps and the sender thread serialising every batch;
(c) the same with ``clip.zclip()`` (adaptive: EMA statistics in the graph);
(d) the naive way: an eager train step calling ``float(tf.norm(g))`` per variable;
(e) plain ``Adam`` and (f) ``Adam`` + monitor with no policy: the cost of monitoring alone;
(g) (b) measuring weight norms and update ratios every step (``stats_every=1``) and
(h) (b) without them (``stats_every=0``): the cost of the weight statistics;
(i) (b) with incident capture off (``max_incidents=0``): the cost of keeping the capture
    armed (one predicate per step and the shadow copies' memory; nothing is copied while
    every step is healthy);
(j) (b) with ``incident_on_explosion=False``: the cost of the in-graph explosion trigger
    (about 30 scalar operations a step);
(k) (f) with incident capture off: the capture's cost without a policy (under ``--jit`` the
    rolling capture, a copy of the state every ``incident_snapshot_every`` steps).

(b), (c) and (f) use the monitor's defaults (``stats_every``, one incident bundle).

    python -m bench.agent_overhead [--steps 30] [--repeats 5] [--jit] [--only a,b,i]

Model: an MLP of 50 Dense(350) layers (100 variables, 6.1M parameters), batch 256, CPU.
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
import tensorflow as tf

from gradwatch.agent import GradientMonitor, clip
from gradwatch.agent.records import OutgoingBatch
from gradwatch.agent.transport import RunInfo

WIDTH, DEPTH, BATCH = 350, 50, 256


class DiscardTransport:
    """Accepts and drops everything: isolates the agent's own cost from the network."""

    def create_run(self, run: RunInfo) -> None: ...
    def send_batch(self, run_id: str, batch: OutgoingBatch) -> None: ...
    def set_status(self, run_id: str, status: str) -> None: ...
    def close(self) -> None: ...


class _EagerNormModel(keras.Sequential):  # type: ignore[misc]
    """(d): what a hand-written monitor does: host-side norms of every variable, every step."""

    def train_step(self, data: Any) -> dict[str, Any]:
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
        grads = tape.gradient(loss, self.trainable_variables)
        self.norms = [float(tf.norm(g)) for g in grads]  # one host sync per variable
        grads, _ = tf.clip_by_global_norm(grads, 1.0)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables, strict=True))
        return {"loss": loss}


def mlp_layers(depth: int = DEPTH) -> list[Any]:
    """The benchmark model's layers: ``depth`` Dense(WIDTH) layers, the last one of width 1
    (shared with ``bench.first_step``)."""
    layers: list[Any] = [keras.Input((WIDTH,))]
    layers += [keras.layers.Dense(WIDTH, activation="relu") for _ in range(depth - 1)]
    layers.append(keras.layers.Dense(1))
    return layers


# Monitored configs and their extra GradientMonitor arguments.
MONITORED: dict[str, dict[str, Any]] = {
    "b": {},
    "c": {},
    "f": {},
    "g": {"stats_every": 1},
    "h": {"stats_every": 0},
    "i": {"max_incidents": 0},
    "j": {"incident_on_explosion": False},
    "k": {"max_incidents": 0},
}


def _setup(name: str, jit: bool) -> tuple[keras.Model, list[Any]]:
    keras.utils.set_random_seed(0)
    callbacks: list[Any] = []
    if name == "d":
        model = _EagerNormModel(mlp_layers())
        model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="mse", run_eagerly=True)
        return model, callbacks
    model = keras.Sequential(mlp_layers())
    if name in MONITORED:
        policy = clip.zclip() if name == "c" else None if name in "fk" else clip.global_norm(1.0)
        monitor = GradientMonitor(
            run="bench",
            policy=policy,
            flush_every=50,
            transport=DiscardTransport(),
            **MONITORED[name],
        )
        optimizer = monitor.wrap(keras.optimizers.Adam(1e-4))
        callbacks.append(monitor)
    else:
        optimizer = keras.optimizers.Adam(1e-4, global_clipnorm=1.0 if name == "a" else None)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit)
    return model, callbacks


LABELS = {
    "a": "(a) Adam(global_clipnorm=1)",
    "b": "(b) gradwatch + global_norm(1)",
    "c": "(c) gradwatch + zclip()",
    "d": "(d) eager float(tf.norm(g))",
    "e": "(e) Adam, no clipping",
    "f": "(f) gradwatch, no policy",
    "g": "(g) (b), stats_every=1",
    "h": "(h) (b), stats_every=0",
    "i": "(i) (b), max_incidents=0",
    "j": "(j) (b), no explosion trigger",
    "k": "(k) (f), max_incidents=0",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="steps per timed fit")
    parser.add_argument("--repeats", type=int, default=5, help="timed fits per config")
    parser.add_argument("--jit", action="store_true", help="jit_compile=True (XLA) for all but d")
    parser.add_argument(
        "--only", default="", help="comma-separated configs to run (default: all); a is always run"
    )
    args = parser.parse_args()
    chosen = {"a", *args.only.split(",")} if args.only else set(LABELS)
    if not chosen <= set(LABELS):
        parser.error(f"--only: unknown configs {sorted(chosen - set(LABELS))}")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * args.steps, WIDTH)).astype("float32")
    y = rng.normal(size=(BATCH * args.steps, 1)).astype("float32")

    configs = {name: _setup(name, args.jit) for name in LABELS if name in chosen}
    params = configs["a"][0].count_params()
    for model, callbacks in configs.values():  # trace and warm up
        model.fit(x[: BATCH * 3], y[: BATCH * 3], batch_size=BATCH, verbose=0, callbacks=callbacks)
    times: dict[str, list[float]] = {name: [] for name in configs}
    cpu: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, (model, callbacks) in configs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            model.fit(x, y, batch_size=BATCH, verbose=0, shuffle=False, callbacks=callbacks)
            times[name].append((time.perf_counter() - start) / args.steps * 1e3)
            cpu[name].append((time.process_time() - start_cpu) / args.steps * 1e3)
    for _, callbacks in configs.values():
        for callback in callbacks:
            callback.close()

    median = {name: statistics.median(values) for name, values in times.items()}
    median_cpu = {name: statistics.median(values) for name, values in cpu.items()}
    best = {name: min(values) for name, values in times.items()}
    print(
        f"MLP {DEPTH}×Dense({WIDTH}): {params / 1e6:.1f}M parameters, {2 * DEPTH} variables, "
        f"batch {BATCH}, {'XLA' if args.jit else 'graph'} mode; "
        f"{args.steps} steps × {args.repeats} repeats; median and best (min) of the repeats"
    )
    print(
        f"{'config':<34} {'ms/step':>8} {'÷ (a)':>7} {'best ÷ (a)':>10} {'CPU ÷ (a)':>9}  "
        "all repeats (wall ms/step)"
    )
    for name, label in LABELS.items():
        if name not in configs:
            continue
        spread = " ".join(f"{t:.1f}" for t in times[name])
        print(
            f"{label:<34} {median[name]:>8.2f} {median[name] / median['a']:>7.3f} "
            f"{best[name] / best['a']:>10.3f} {median_cpu[name] / median_cpu['a']:>9.3f}  {spread}"
        )
    for text, num, den in (
        ("monitoring alone, (f) ÷ (e)", "f", "e"),
        ("weight statistics every step, (g) ÷ (h)", "g", "h"),
        ("weight statistics at the default stats_every, (b) ÷ (h)", "b", "h"),
        ("incident capture armed, (b) ÷ (i)", "b", "i"),
        ("in-graph explosion trigger, (b) ÷ (j)", "b", "j"),
        ("incident capture armed, no policy, (f) ÷ (k)", "f", "k"),
    ):
        if num in configs and den in configs:
            ratio, best_ratio = median[num] / median[den], best[num] / best[den]
            cpu_ratio = median_cpu[num] / median_cpu[den]
            # Paired: each repeat's two fits ran back to back, so load that comes and
            # goes over seconds hits both; the median of those ratios resists it best.
            paired = statistics.median(n / d for n, d in zip(times[num], times[den], strict=True))
            print(
                f"{text}: {ratio:.3f} (best {best_ratio:.3f}, paired {paired:.3f}, "
                f"CPU time {cpu_ratio:.3f})"
            )


if __name__ == "__main__":
    main()
