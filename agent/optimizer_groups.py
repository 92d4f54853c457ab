"""OptimizerGroups: a monitor's named optimizers, each with its recorder, merged into one run.

The monitor hands everything to this class once ``wrap(optimizer, group=...)`` was called
(see :mod:`gradwatch.agent.groups` for what a step of a grouped run holds). Host-side
methods run between steps on the training thread; they block only on reading the groups'
rings (a few KB each) and never on the network. Not thread-safe.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import keras

from .clip import ClipPolicy
from .config import ConfigError, MonitorConfig
from .groups import GroupMerger, check_group_name
from .incident import SharedCapture
from .optimizer import MonitoredOptimizer
from .recorder import StepRecorder
from .records import StepBatch

__all__ = ["OptimizerGroups"]


@dataclass(frozen=True, slots=True)
class _Group:
    name: str
    recorder: StepRecorder
    wrapper: MonitoredOptimizer


class OptimizerGroups:
    """The named optimizers of one monitor.

    Args:
        config: The monitor's settings.
        submit: Where the merged batches go (the sender's non-blocking ``submit``).
        checkpointed: The monitor's checkpointed trackable (shared step, per-group policy).
        owners: Layer paths from the model's tree (see :class:`StepRecorder`).
        describe: Called with ``{group: its policy's description}`` whenever a group is
            added, for the run's config on the server.
        model: The monitor's model now (``fit``'s, or ``set_model``'s), or ``None``.
    """

    def __init__(
        self,
        config: MonitorConfig,
        submit: Callable[[StepBatch], object],
        checkpointed: Any,
        owners: Callable[[], Mapping[object, str] | None],
        describe: Callable[[dict[str, Any]], object] = lambda groups: None,
        model: Callable[[], Any] = lambda: None,
    ) -> None:
        self._config = config
        self._describe = describe
        self._checkpointed = checkpointed
        self._owners = owners
        self._model = model
        self._shared = SharedCapture(config.max_incidents)  # one incident cap for the run
        self._merger = GroupMerger(submit)
        self._groups: list[_Group] = []
        self._traced: tuple[Any, Any] | None = None  # (model, train function) traced with hooks

    def __bool__(self) -> bool:
        return bool(self._groups)

    @property
    def names(self) -> tuple[str, ...]:
        """Group names in the order they were wrapped."""
        return tuple(g.name for g in self._groups)

    @property
    def recorders(self) -> list[StepRecorder]:
        """Each group's recorder, in group order."""
        return [g.recorder for g in self._groups]

    @property
    def layers(self) -> tuple[str, ...]:
        """Every group's layer names (``group/...``), in group order (empty until built)."""
        return tuple(name for g in self._groups for name in g.recorder.layers)

    @property
    def optimizer_names(self) -> list[str]:
        """The wrapped optimizers' names, for messages."""
        return [f"{g.name}: {g.wrapper.inner_optimizer.name}" for g in self._groups]

    def wrap(
        self,
        optimizer: keras.optimizers.Optimizer,
        group: str,
        policy: ClipPolicy | None,
        monitor: Any,
    ) -> MonitoredOptimizer:
        """Wrap ``optimizer`` as group ``group`` (idempotent for the same pair).

        Raises:
            ConfigError: The name is invalid or taken by another optimizer, or the
                optimizer is already in another group.
        """
        name = check_group_name(group)
        for existing in self._groups:
            if existing.wrapper.inner_optimizer is optimizer:
                if existing.name == name:
                    return existing.wrapper
                raise ConfigError(
                    f"group: this optimizer is already wrapped as group {existing.name!r}"
                )
            if existing.name == name:
                raise ConfigError(f"group: {name!r} already wraps another optimizer")
        recorder = StepRecorder(
            self._config,
            policy,
            self._merger.collector(len(self._groups)),
            self._checkpointed,
            self._owners,
            group=name,
            model=self._model,
            shared=self._shared,
        )
        wrapper = MonitoredOptimizer(optimizer, monitor, recorder)
        self._groups.append(_Group(name, recorder, wrapper))
        self._describe(
            {
                g.name: (None if g.recorder.policy is None else g.recorder.policy.describe())
                for g in self._groups
            }
        )
        return wrapper

    # -- fit -------------------------------------------------------------------------------

    def begin_fit(self, model: Any, steps_per_call: int) -> None:
        """Host, at ``on_train_begin`` (after the loss/step hooks are installed on ``model``).

        Retraces the train function unless it was traced with the hooks and the current
        rings, so the step counter advances once per ``train_step``.
        """
        retrace = False
        with model.distribute_strategy.scope():
            for recorder in self.recorders:
                recorder.steps_per_call = steps_per_call
                retrace |= recorder.ensure_capacity()
                retrace |= recorder.begin_fit()
        self.collect()
        if retrace or self._traced != (model, model.train_function):
            model.train_function = None
            model.make_train_function()
            self._traced = (model, model.train_function)

    def before_step(self) -> None:
        """Host, before a step: weight snapshots that are due."""
        for recorder in self.recorders:
            recorder.before_step()

    def after_steps(self, steps: int) -> None:
        """Host, after ``steps`` steps: weight measurements and reads that are due."""
        for recorder in self.recorders:
            recorder.after_steps(steps)
        if self._merger.pending:
            self.collect()

    def collect(self) -> None:
        """Host: read every group's ring and submit the merged steps (no step is split)."""
        layers = []
        for recorder in self.recorders:
            recorder.collect()
            layers.append(recorder.layers)
        self._merger.flush(layers)

    # -- custom loops ----------------------------------------------------------------------

    def end_step(self) -> None:
        """Host, after one custom-loop step: reads, then the run's next step, then snapshots."""
        self.after_steps(1)
        recorders = self.recorders
        if recorders:
            recorders[0].advance_step()
        self.before_step()

    def record_loss(self, loss: Any) -> None:
        """In-graph: the step's loss, before the groups apply (every group's next row)."""
        for recorder in self.recorders:
            recorder.record_loss(loss)

    @property
    def recorded_steps(self) -> int:
        """Rows read from the groups' rings so far."""
        return sum(r.recorded_steps for r in self.recorders)

    @property
    def lost_steps(self) -> int:
        """Rows overwritten before they were read, over all groups."""
        return sum(r.lost_steps for r in self.recorders)
