"""What the incident captures of one run share (:mod:`gradwatch.agent.incident`).

One :class:`SharedCapture` per monitor, handed to the capture of every optimizer group (a
GAN's discriminator and generator), so that

* the first bad step of *any* group is the run's incident, and ``max_incidents`` caps the
  run, not each group (one in-graph ``armed`` flag: a group that captures disarms the others
  within the same step, since reads and writes of one resource are ordered in the graph);
* the model's RNG states are copied once per step, at its start (in ``fit`` in-graph; in a
  custom loop eagerly, by ``monitor.on_step``, for the next step): Dropout, noise layers and
  a GAN's ``keras.random.normal(seed=self.seed_generator)`` draw from
  ``keras.random.SeedGenerator`` states that each draw advances, so the replay can draw the
  same masks and noise only from the states the step began with (a few int64 pairs a step,
  no ``tf.cond``); the other non-trainable variables (batch-norm statistics) are copied with
  the capture, after the step's forward pass.

Variables are made eagerly (``tf.init_scope``) on first use, at the first trace of the train
step. Not thread-safe: the training thread owns it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tensorflow as tf

from . import _keras_compat as compat
from .bundle import describe
from .clip.base import state_variable

__all__ = ["SharedCapture"]


class SharedCapture:
    """The arming flag, the bundles written, and the model's state shadows of one run.

    Args:
        max_incidents: Bundles the run may write (0: never armed).
    """

    def __init__(self, max_incidents: int) -> None:
        self.max_incidents = max_incidents
        self.written: list[Path] = []
        self._captures = 0
        self._armed: tf.Variable | None = None
        self._seed_sources: list[Any] | None = None  # None: no step start seen (custom loop)
        self._seed_latest: list[tf.Variable] = []
        self.seed_captured: list[tf.Variable] = []
        self._state_sources: list[Any] = []
        self.state_captured: list[tf.Variable] = []
        self._epochs: list[tuple[int, int]] = []  # (epoch, its first step), fit only
        self.batch_bytes: int | None = None  # fit's first traced batch, bytes (None: unknown)

    @property
    def armed(self) -> tf.Variable:
        """The in-graph flag (made eagerly on first use): true while a capture may happen."""
        if self._armed is None:
            with tf.init_scope():
                self._armed = state_variable(True, tf.bool, "incident_armed")
        return self._armed

    def captured(self, path: Path | None) -> None:
        """Host: a step was captured and its bundle written at ``path`` (``None``: not
        written, by a non-chief worker or after an error); arm again unless the run's cap
        is reached. Counts captures, not writes, so every worker of a job re-arms alike."""
        self._captures += 1
        if path is not None:
            self.written.append(path)
        if self._captures < self.max_incidents:
            self.armed.assign(True)

    def note_epoch(self, epoch: int, first_step: int) -> None:
        """Host, at ``on_epoch_begin``: epoch ``epoch`` starts at step ``first_step``."""
        self._epochs = [*self._epochs[-999:], (epoch, first_step)]

    def position(self, step: int) -> dict[str, int] | None:
        """Where ``step`` was in the data: its epoch and its step within it (``None`` outside
        ``fit``). With ``gradient_accumulation_steps=n``, step k of an epoch read batches
        ``k·n`` to ``k·n + n − 1``."""
        starts = [(epoch, first) for epoch, first in self._epochs if first <= step]
        if not starts:
            return None
        epoch, first = starts[-1]
        return {"epoch": epoch, "step_in_epoch": step - first}

    def at_step_start(self, model: Any, data: Any) -> None:
        """In-graph, at the start of a ``train_step`` in ``fit``: copy the model's RNG states
        (the shadows are made at the first trace) and note the size of its batch ``data``."""
        if self.batch_bytes is None:
            self.batch_bytes = _static_bytes(data)
        if not self._keeps_states():
            return
        if self._seed_sources is None:
            self._make_shadows(model)
        for latest, source in zip(self._seed_latest, self._seed_sources or [], strict=True):
            latest.assign(tf.convert_to_tensor(source))

    def prepare(self, model: Any) -> None:
        """At the first trace of a step (eagerly): make the shadows, holding the RNG states
        as they are now, the first step's start in a custom loop. Idempotent."""
        if model is None or self._seed_sources is not None or not self._keeps_states():
            return
        self._make_shadows(model)
        with tf.init_scope():
            self.between_steps()

    def between_steps(self) -> None:
        """Host, after a custom loop's step (``monitor.on_step``): copy the RNG states the
        next step begins with (a few eager assigns of int64 pairs). Exact when nothing
        draws from the model's seed generators between ``on_step`` and the next step."""
        for latest, source in zip(self._seed_latest, self._seed_sources or [], strict=True):
            latest.assign(tf.convert_to_tensor(source))

    def _keeps_states(self) -> bool:
        # Under tf.distribute every replica draws its own shard's masks from the same states
        # (mirrored, advanced alike): the replay runs the shards one by one from them.
        return self.max_incidents > 0

    def copy_model_state(self, between_steps: bool = False) -> None:
        """In-graph, inside a capture's copy: the step-start RNG states and the other
        non-trainable variables as they are now; ``between_steps``: after a step's update (a
        rolling capture's copy), where the RNG states are those the next step begins with."""
        seeds = (self._seed_sources or []) if between_steps else self._seed_latest
        for captured, latest in zip(self.seed_captured, seeds, strict=True):
            captured.assign(tf.convert_to_tensor(latest))
        for captured, source in zip(self.state_captured, self._state_sources, strict=True):
            captured.assign(tf.convert_to_tensor(source))

    def describe_model_state(self) -> dict[str, Any]:
        """The manifest's ``rng_states`` and ``model_state`` (``null`` without a step start:
        a custom loop's bundle)."""
        if self._seed_sources is None:
            return {"rng_states": None, "model_state": None}
        return {
            "rng_states": [describe(v) for v in self._seed_sources],
            "model_state": [describe(v) for v in self._state_sources],
        }

    def _make_shadows(self, model: Any) -> None:
        state = list(getattr(model, "non_trainable_variables", []))
        seeds = [v for v in state if compat.is_seed_state(v)]
        with tf.init_scope():
            self._seed_latest = [_shadow_of(v) for v in seeds]
            self.seed_captured = [_shadow_of(v) for v in seeds]
            self._state_sources = [v for v in state if not compat.is_seed_state(v)]
            self.state_captured = [_shadow_of(v) for v in self._state_sources]
        self._seed_sources = seeds


def _static_bytes(data: Any) -> int | None:
    """Bytes of a batch's numeric leaves when every shape is static, else ``None``."""
    total = 0
    for leaf in tf.nest.flatten(data):
        shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
        if shape is None or dtype is None or shape.num_elements() is None:
            return None
        total += int(shape.num_elements()) * tf.as_dtype(dtype).size
    return total


def _shadow_of(variable: Any) -> tf.Variable:
    return state_variable(tf.zeros(variable.shape, variable.dtype), variable.dtype, "shadow")
