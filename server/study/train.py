"""Train one cell (or one warm-up) with ``model.fit`` and a :class:`GradientMonitor`.

The only module of the study that imports TensorFlow, Keras and the agent. Every call seeds
Keras (``keras.utils.set_random_seed``) before building the task, and op determinism is on
(:func:`make_deterministic`), so a cell gives the same numbers on a rerun on the same machine
(wall times aside).
"""

from __future__ import annotations

import contextlib
import io
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

from gradwatch.agent import GradientMonitor, clip
from gradwatch.agent.clip import ClipPolicy

from .problem import Task
from .threshold import Thresholds

__all__ = [
    "Trained",
    "make_deterministic",
    "make_optimizer",
    "make_policy",
    "train",
]

_TIMING_SKIP = 2
"""Steps left out of the step-time median (the first call traces the train function)."""


@dataclass(frozen=True, slots=True)
class Trained:
    """What one training run gave on the training side.

    Attributes:
        run_id: The run's id on the server.
        steps: Steps trained (fewer than asked when the loss became non-finite).
        final_loss: Loss on the held-out data after training (NaN when not finite).
        seconds_per_step: Wall time of a step, seconds: the 10th percentile over the steps
            after the first two (which trace), so that other processes on a shared machine,
            which only ever add time, move it as little as possible (the reason ``timeit``
            reports a minimum). NaN with too few steps.
        num_parameters: Trainable parameters of the model.
        delivered: Whether every batch reached the server.
    """

    run_id: str
    steps: int
    final_loss: float
    seconds_per_step: float
    num_parameters: int
    delivered: bool


def make_deterministic() -> None:
    """Turn on TensorFlow's op determinism (process-wide, idempotent)."""
    tf.config.experimental.enable_op_determinism()


def make_optimizer(name: str, learning_rate: float) -> Any:
    """A fresh Keras optimizer: ``sgd`` (momentum 0.9), ``adagrad``, ``rmsprop`` or ``adam``.

    Raises:
        ValueError: An unknown name.
    """
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9)
    if name == "adagrad":
        return keras.optimizers.Adagrad(learning_rate)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate)
    raise ValueError(f"unknown optimizer {name!r}")


def make_policy(remedy: str, thresholds: Thresholds) -> ClipPolicy | None:
    """The clip policy of ``remedy`` with the study's thresholds (:mod:`.threshold`).

    The adaptive policies keep their defaults except their warm-up, which is the
    thresholds' number of warm-up steps.

    Raises:
        ValueError: An unknown remedy.
    """
    warmup = max(1, thresholds.warmup_steps)
    policies: dict[str, Callable[[], ClipPolicy | None]] = {
        "none": lambda: None,
        "by_value": lambda: clip.by_value(thresholds.value),
        "by_norm": lambda: clip.by_norm(thresholds.tensor_norm),
        "global_norm": lambda: clip.global_norm(thresholds.global_norm),
        "zclip": lambda: clip.zclip(warmup_steps=warmup),
        "autoclip": lambda: clip.autoclip(warmup_steps=warmup),
    }
    if remedy not in policies:
        raise ValueError(f"unknown remedy {remedy!r}")
    return policies[remedy]()


class _StepClock(keras.callbacks.Callback):  # type: ignore[misc]
    """Wall time at the end of every batch, a hook per step (progress), and a stop at the
    first non-finite loss (what ``keras.callbacks.TerminateOnNaN`` does, without its line on
    stdout)."""

    def __init__(self, on_step: Callable[[], None]) -> None:
        super().__init__()
        self.ends: list[float] = []
        self._on_step = on_step

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.ends.append(time.perf_counter())
        self._on_step()
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.model.stop_training = True

    def step_seconds(self) -> float:
        """The 10th percentile of the steps' wall times (see :class:`Trained`)."""
        gaps = [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)][_TIMING_SKIP:]
        if len(gaps) < 2:
            return gaps[0] if gaps else math.nan
        return statistics.quantiles(gaps, n=10, method="inclusive")[0]


def _dataset(task: Task, seed: int) -> Any:
    data = tf.data.Dataset.from_tensor_slices((task.x, task.y))
    count = int(data.cardinality())
    return data.shuffle(max(count, 1), seed=seed).repeat().batch(task.batch_size)


def train(
    build: Callable[[int], Task],
    *,
    seed: int,
    run_name: str,
    server: str,
    token: str | None,
    project: str,
    optimizer: str,
    learning_rate: float,
    policy: ClipPolicy | None,
    steps: int,
    on_step: Callable[[], None] = lambda: None,
) -> Trained:
    """Train a fresh task for ``steps`` steps, streaming every step to ``server``.

    Blocks until training is done, the held-out loss is evaluated and the monitor has
    delivered its batches (or given up). Training stops early at the first non-finite
    training loss (Keras reports the running mean of the epoch, which stays non-finite from
    then on). The agent's own status lines are kept off the terminal.

    Args:
        build: The problem's task builder.
        seed: Seeds Keras, the data order and the task.
        run_name: The run's name on the server.
        server: The server's base URL.
        token: A token with the ``ingest`` scope, or None.
        project: The runs' project.
        optimizer: One of :data:`.plan.OPTIMIZERS`.
        learning_rate: Its learning rate.
        policy: The clip policy, or None for no remedy.
        steps: Training steps (≥ 1).
        on_step: Called on the training thread after every step.
    """
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    task = build(seed)
    model = task.model
    model.compile(optimizer=make_optimizer(optimizer, learning_rate), loss=task.loss)
    clock = _StepClock(on_step)
    quiet = io.StringIO()
    with contextlib.redirect_stderr(quiet):
        monitor = GradientMonitor(  # no incident bundles: the study measures, it does not debug
            run=run_name,
            server=server,
            policy=policy,
            project=project,
            token=token,
            max_incidents=0,
        )
        try:
            model.fit(
                _dataset(task, seed),
                epochs=1,
                steps_per_epoch=steps,
                verbose=0,
                callbacks=[monitor, clock],
            )
        finally:
            delivered = monitor.close(timeout_seconds=60.0)
    loss = model.evaluate(task.x_val, task.y_val, batch_size=256, verbose=0)
    final = float(loss[0] if isinstance(loss, list) else loss)
    return Trained(
        run_id=monitor.run_id,
        steps=len(clock.ends),
        final_loss=final if math.isfinite(final) else math.nan,
        seconds_per_step=clock.step_seconds(),
        num_parameters=int(sum(math.prod(v.shape) for v in model.trainable_variables)),
        delivered=delivered,
    )
