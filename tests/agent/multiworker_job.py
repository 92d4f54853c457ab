"""One worker of a custom training loop under ``MultiWorkerMirroredStrategy``, as a script.

``tests/agent/test_multiworker.py`` starts it once per worker with ``TF_CONFIG`` naming a
cluster on 127.0.0.1 (and once without ``TF_CONFIG`` for the single-process reference). The
loop is the one the README documents: ``strategy.run`` over a step that computes the loss
with ``tf.nn.compute_average_loss`` (so the all-reduced gradient is the global batch's), a
wrapped optimizer's ``apply_gradients`` and ``monitor.on_step()`` after each step, with a
``tf.train.Checkpoint`` of the model, the optimizer and the monitor every few steps.

Every worker sees the same global batch of each step and trains on its own contiguous slice
of it, so the all-reduced gradient equals the single-process gradient of the whole batch.

    python tests/agent/multiworker_job.py --out DIR --server URL --steps 12 [--crash-after N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import tensorflow as tf

from gradwatch.agent import GradientMonitor, clip

GLOBAL_BATCH = 16
FEATURES = 6


def global_batch(step: int, nan_at: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Step ``step``'s global batch: the same on every worker and in the reference; at step
    ``nan_at`` one NaN in the last worker's half (row 13 of 16)."""
    rng = np.random.default_rng(1000 + step)
    x = rng.normal(size=(GLOBAL_BATCH, FEATURES)).astype("float32")
    y = (x.sum(axis=1, keepdims=True) * 3.0 + rng.normal(size=(GLOBAL_BATCH, 1))).astype("float32")
    if step == 5:
        y *= 40.0  # one large step, so the clip policy clips something
    if step == nan_at:
        x[13, 2] = np.nan
    return x, y


def build_model() -> keras.Model:
    """The job's model, compiled with the job's optimizer (``gradwatch replay --model-fn``)."""
    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(16, activation="tanh", name="hidden"),
            keras.layers.Dense(1, name="out"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--server", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--checkpoint-every", type=int, default=3)
    parser.add_argument("--crash-after", type=int, default=0, help="os._exit(3) after it")
    parser.add_argument("--nan-at", type=int, default=-1, help="a NaN input at this step")
    args = parser.parse_args()

    cluster = json.loads(os.environ.get("TF_CONFIG", "{}"))
    if cluster:
        strategy: tf.distribute.Strategy = tf.distribute.MultiWorkerMirroredStrategy()
        task = cluster["task"]
        workers, index = len(cluster["cluster"]["worker"]), int(task["index"])
    else:
        strategy = tf.distribute.get_strategy()
        workers, index = 1, 0
    share = GLOBAL_BATCH // workers

    monitor = GradientMonitor(
        run="multiworker",
        server=args.server,
        policy=clip.chain(clip.skip_nonfinite(), clip.zclip(warmup_steps=3)),
        flush_every=4,
        stats_every=1,
        spool_dir=str(args.out / f"spool-{index}"),
        incident_dir=str(args.out / f"incidents-{index}"),
    )
    with strategy.scope():
        model = build_model()
        optimizer = monitor.wrap(keras.optimizers.Adam(0.01))
        optimizer.build(model.trainable_variables)
    monitor.set_model(model)

    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, monitor=monitor)
    # Non-chief workers write their (identical) checkpoints apart from the chief's.
    directory = args.out / ("checkpoints" if index == 0 else f"checkpoints-worker-{index}")
    manager = tf.train.CheckpointManager(checkpoint, str(directory), max_to_keep=2)
    first = 0
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).expect_partial()
        first = int(optimizer.iterations.numpy())

    def replica_step(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            per_example = tf.square(model(x, training=True) - y)[:, 0]
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=GLOBAL_BATCH)
        grads = tape.gradient(loss, model.trainable_variables)
        monitor.apply_gradients(zip(grads, model.trainable_variables, strict=True), loss=loss)
        monitor.capture_batch((x, y))  # kept if this step is captured (incident bundle)
        return loss

    @tf.function
    def train_step(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        losses = strategy.run(replica_step, args=(x, y))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

    for step in range(first, args.steps):
        x, y = global_batch(step, args.nan_at)
        train_step(
            tf.constant(x[index * share : (index + 1) * share]),
            tf.constant(y[index * share : (index + 1) * share]),
        )
        monitor.on_step()
        if (step + 1) % args.checkpoint_every == 0:
            manager.save()
        if args.crash_after and step + 1 == args.crash_after:
            monitor.flush(10.0)
            os._exit(3)  # dies as a killed worker does: no close, no atexit
    delivered = monitor.close(30.0)
    np.savez(args.out / f"weights-{index}.npz", *model.get_weights())
    (args.out / f"result-{index}.json").write_text(
        json.dumps(
            {
                "run_id": monitor.run_id,
                "first_step": first,
                "delivered": delivered,
                "dropped": monitor.dropped_batches,
                "incidents": list(monitor.incidents),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
