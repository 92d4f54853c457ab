"""GradientMonitor: the public class, a Keras callback and the custom-loop API.

It composes the pieces: ``optimizer.MonitoredOptimizer`` (the wrapper in the train step),
``recorder.StepRecorder`` (statistics, clipping, the in-graph ring and its host reads),
``swap.OptimizerSwap`` (the model's optimizer wrapped for one ``fit``),
``optimizer_groups.OptimizerGroups`` (several optimizers, one run), ``step_loss.LossCapture``
(the ``train_step`` hooks), ``delivery.build_delivery`` (sender, transport, spool),
``notice`` (what the user is told) and ``_keras_compat`` (private Keras API).

How a step flows:

1. ``train_step`` calls ``optimizer.scale_loss(loss)`` (the wrapper records the
   loss in a variable) and then ``optimizer.apply(grads, variables)``.
2. The wrapper computes the step's statistics and applies the clip policy with
   tf ops, hands the (clipped) gradients to the inner optimizer, or skips the
   update, and writes one row into in-graph ring buffers at ``step % capacity``.
   Nothing here syncs with the host.
3. Every ``flush_every`` steps the callback (or :meth:`GradientMonitor.on_step`
   in a custom loop) reads the buffers once and submits a
   :class:`~gradwatch.agent.records.StepBatch` to the sender thread.
4. Every ``stats_every`` steps the weight norms and update ratios of a step go
   into its row (:mod:`gradwatch.agent.weights`; every step: measured in-graph).
5. A bad step is captured before its update (:mod:`gradwatch.agent.incident`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import keras

from . import _keras_compat as compat
from .clip import ClipPolicy
from .cluster import in_cluster
from .config import ConfigError, MonitorClosedError, MonitorConfig
from .delivery import build_delivery
from .layers import layer_paths
from .lifecycle import close_at_exit
from .notice import say, say_delivery, warn_nothing_recorded
from .optimizer import MonitoredOptimizer
from .optimizer_groups import OptimizerGroups
from .recorder import StepRecorder
from .sender import Sender
from .step_loss import LossCapture
from .swap import OptimizerSwap
from .transport import Transport

__all__ = ["GradientMonitor", "MonitoredOptimizer"]

log = logging.getLogger("gradwatch.agent")


#: Settings that accept ``None`` for "the MonitorConfig default" (as they always have).
_NONE_IS_DEFAULT = frozenset({"run_id", "local_dir", "spool_dir", "incident_dir"})

#: The keyword arguments GradientMonitor passes on to MonitorConfig.
_SETTINGS = frozenset(f.name for f in dataclasses.fields(MonitorConfig)) - {"run", "server"}


class GradientMonitor(keras.callbacks.Callback, compat.Trackable):  # type: ignore[misc]
    """Records per-layer gradient statistics of every step and streams them.

    Use it as a Keras callback (``model.fit(..., callbacks=[monitor])``), which
    wraps the model's optimizer for the duration of training, or wrap the
    optimizer yourself with :meth:`wrap`. In a custom loop, call
    :meth:`on_step` after each step. Close it (or use it as a context manager)
    to flush what is left.

    Args:
        run: Display name of the run.
        server: Base URL of a gradwatch server, or ``None`` for local mode.
        policy: Clip policy from :mod:`gradwatch.agent.clip`, or ``None`` to
            monitor only.
        transport: A transport to use instead of the default one (tests).
        token: Bearer token with the ``ingest`` scope (``gradwatch token create``);
            default ``$GRADWATCH_TOKEN``. Needed once the server has tokens.
        **settings: Any other :class:`~gradwatch.agent.config.MonitorConfig`
            field, with its default and meaning there: ``flush_every`` (steps
            per host read and per batch), ``stats_every`` (steps between weight
            norm and update ratio measurements; the first step of each ``fit``
            is measured, and with ``steps_per_execution`` > 1 the first step of
            the execution where one is due; 0 turns them off, while on one copy
            of the trainable weights is kept), ``project``, ``run_id``,
            ``queue_size``, ``request_timeout_seconds``,
            ``retry_deadline_seconds``, ``local_dir``, ``spool_dir``,
            ``spool_max_bytes``, ``queue_max_bytes``, ``close_timeout_seconds``
            (also the timeout of the close run at interpreter exit).
            ``run_id``, ``local_dir`` and ``spool_dir`` may be ``None`` (default).

    Raises:
        ConfigError: An argument is invalid, or ``local_dir``/``spool_dir``
            cannot be written to (the message names it).
        TypeError: An unknown keyword argument.

    Thread-safety: training-thread object; :meth:`close` may be called from
    any thread once training has stopped. Construction starts the sender's
    daemon thread and blocks only on local disk checks.
    """

    def __init__(
        self,
        run: str,
        server: str | None = None,
        policy: ClipPolicy | None = None,
        *,
        transport: Transport | None = None,
        token: str | None = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(settings) - _SETTINGS)
        if unknown:
            raise TypeError(f"GradientMonitor() got unexpected keyword arguments: {unknown}")
        given = {k: v for k, v in settings.items() if v is not None or k not in _NONE_IS_DEFAULT}
        # Multi-worker: every worker derives the same run id; only the chief delivers.
        self.config, self.cluster = in_cluster(
            MonitorConfig(run=run, server=server, **given), bool(given.get("run_id"))
        )
        delivers = self.cluster is None or self.cluster.is_chief
        if policy is not None and not isinstance(policy, ClipPolicy):
            raise ConfigError(
                "policy: expected a policy from gradwatch.agent.clip "
                f"(e.g. clip.global_norm(1.0)), got {policy!r}"
            )
        self.policy = policy
        run_config = {
            "flush_every": self.config.flush_every,
            "stats_every": self.config.stats_every,
            "policy": policy.describe() if policy else None,
        }
        if self.cluster is not None:
            run_config["cluster"] = self.cluster.describe()
        delivery = build_delivery(self.config, run_config, transport, token, delivers=delivers)
        self._sender = delivery.sender
        self._printer = delivery.printer
        # What tf.train.Checkpoint saves: the step counter and the policy state.
        self._checkpointed = compat.AutoTrackable()
        compat.track(self, self._checkpointed, "gradwatch")
        self._recorder = StepRecorder(
            self.config,
            policy,
            self._sender.submit,
            self._checkpointed,
            self._layer_owners,
            model=lambda: self.model,
        )
        self._groups = OptimizerGroups(
            self.config,
            self._sender.submit,
            self._checkpointed,
            self._layer_owners,
            lambda groups: self._sender.add_run_config(groups=groups),
            model=lambda: self.model,
        )
        self._loss_capture = LossCapture(self._recorders, lambda: bool(self._groups))
        self._wrapper: MonitoredOptimizer | None = None
        self._swap = OptimizerSwap(
            self, self._recorder, self.wrap, lambda: self._wrapper, self.record_loss
        )
        self._closed = False
        self._delivered = True  # what close() returned
        self._train_active = False  # between on_train_begin and on_train_end
        self._fit_batches = 0  # train batches of the current fit
        self._steps_per_call = 1  # steps_per_execution of the current fit (groups)
        self._fit_first_step = 0  # recorded_steps when it began
        close_at_exit(self.close)  # weak: the monitor can still be collected
        if self.cluster is not None and not delivers:
            say(f"run {run!r} ({self.run_id}): {self.cluster.delegation}")
        elif self.config.server is not None:
            say(f"run {run!r} ({self.run_id}) streams to {self.run_url}")

    # -- public API ------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        """UUID of the run on the server."""
        return self.config.run_id

    @property
    def run_url(self) -> str | None:
        """The run's page on the server's web UI (``None`` in local mode)."""
        server = self.config.server
        return None if server is None else f"{server}/runs/{self.run_id}"

    @property
    def layers(self) -> tuple[str, ...]:
        """Layer names in reporting order (empty until the first build)."""
        return self._groups.layers if self._groups else self._recorder.layers

    @property
    def groups(self) -> tuple[str, ...]:
        """The optimizer groups, in the order they were wrapped (empty without groups)."""
        return self._groups.names

    @property
    def lost_steps(self) -> int:
        """Steps overwritten in the ring buffer before the host read them."""
        return self._groups.lost_steps if self._groups else self._recorder.lost_steps

    @property
    def dropped_batches(self) -> dict[str, int]:
        """Batches dropped by the sender, by reason."""
        return self._sender.dropped_batches

    @property
    def sender(self) -> Sender:
        """The background sender (for counters and flushing)."""
        return self._sender

    def wrap(
        self,
        optimizer: keras.optimizers.Optimizer,
        group: str | None = None,
        policy: ClipPolicy | None = None,
    ) -> MonitoredOptimizer:
        """Return ``optimizer`` wrapped so this monitor sees every step.

        With mixed precision, let ``compile`` add the ``LossScaleOptimizer``
        around the wrapper (or wrap the LSO's inner optimizer): a wrapper around
        an LSO would see scaled gradients.

        Args:
            optimizer: The optimizer the train step applies.
            group: Name of this optimizer's group, for a train step that applies several
                (a GAN: ``"discriminator"``, ``"generator"``). Its layers are reported
                as ``group/...``; one step of the run is one ``train_step`` call. Either
                every optimizer of a monitor has a group or it has only one optimizer.
            policy: This group's clip policy (default: the monitor's); only with ``group``.

        Raises:
            ConfigError: The optimizer is already wrapped, or is a
                ``LossScaleOptimizer``; a second optimizer without a group; a group
                name that is invalid or taken.
            MonitorClosedError: The monitor was closed.
        """
        self._check_open()
        if isinstance(optimizer, MonitoredOptimizer):
            raise ConfigError("optimizer: already wrapped by a GradientMonitor")
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            raise ConfigError(
                "optimizer: wrap the LossScaleOptimizer's inner optimizer instead "
                "(gradwatch must see unscaled gradients)"
            )
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise ConfigError(
                f"optimizer: expected a keras.optimizers.Optimizer, got {optimizer!r}"
            )
        if policy is not None and not isinstance(policy, ClipPolicy):
            raise ConfigError(
                f"policy: expected a policy from gradwatch.agent.clip, got {policy!r}"
            )
        if group is not None:
            if self._wrapper is not None:
                raise ConfigError(
                    f"group: this monitor already wraps {self._wrapper.inner_optimizer.name!r} "
                    "without a group; give every optimizer of a monitor a group"
                )
            chosen = self.policy if policy is None else policy
            return self._groups.wrap(optimizer, group, chosen, self)
        if policy is not None:
            raise ConfigError("policy: a per-optimizer policy needs a group (wrap(..., group=))")
        if self._groups:
            raise ConfigError(
                f"group: this monitor records the groups {list(self._groups.names)}; name "
                "this optimizer's group too: monitor.wrap(optimizer, group='...')"
            )
        if self._wrapper is not None and self._wrapper.inner_optimizer is not optimizer:
            raise ConfigError(
                "optimizer: this monitor already wraps another optimizer; to watch several, "
                "give each a group: monitor.wrap(optimizer, group='...')"
            )
        if self._wrapper is None:
            self._wrapper = MonitoredOptimizer(optimizer, self, self._recorder)
        return self._wrapper

    def apply_gradients(
        self, grads_and_vars: Iterable[tuple[Any, Any]], loss: Any | None = None
    ) -> None:
        """Custom loops: record ``loss`` (optional) and apply through the wrapped optimizer."""
        self._check_open()
        if self._groups:
            raise ConfigError(
                "optimizer: with groups, call each wrapped optimizer's apply_gradients "
                "(and monitor.record_loss(loss) before them)"
            )
        if self._wrapper is None:
            raise ConfigError("optimizer: call monitor.wrap(optimizer) before apply_gradients")
        if loss is not None:
            self.record_loss(loss)
        self._wrapper.apply_gradients(grads_and_vars)

    def record_loss(self, loss: Any) -> None:
        """Record the current step's loss (in-graph; no host sync).

        Call it before the step applies its gradients (with groups: before the first
        group applies); in a ``fit`` it may be called anywhere in ``train_step``.
        """
        if self._groups:
            self._groups.record_loss(loss)
        else:
            self._recorder.record_loss(loss)

    def capture_batch(self, data: Any) -> None:
        """Custom loops: offer the step's batch to the incident capture (in-graph, cheap).

        Call it in the step function after ``apply_gradients``, with the batch as ``fit``
        would get it (``x``, ``(x, y)`` or ``(x, y, sample_weight)``): if that step was bad,
        the batch goes into its incident bundle. A no-op on healthy steps.
        """
        for recorder in self._recorders():
            recorder.incidents.capture_batch(data)

    @property
    def incidents(self) -> tuple[str, ...]:
        """Directories of the incident bundles written so far (see ``max_incidents``)."""
        paths = (str(p) for r in self._recorders() for p in r.incidents.written)
        return tuple(dict.fromkeys(paths))  # a run's groups share one list

    def on_step(self, step: int | None = None) -> None:
        """Custom loops: call after each training step (host side, cheap).

        Reads the in-graph buffers once every ``flush_every`` calls, and
        snapshots the weights every ``stats_every`` calls (one copy of them).

        Raises:
            MonitorClosedError: The monitor was closed.
        """
        self._check_open()
        if self._groups:
            self._groups.end_step()  # also counts the run's step: one per on_step call
        else:
            self._recorder.after_steps(1)
            self._recorder.before_step()
        recorders = self._recorders()
        if recorders:  # the RNG states the next step begins with (incident replay)
            recorders[0].incidents.shared.between_steps()

    def flush(self, timeout_seconds: float = 10.0) -> bool:
        """Read pending steps and wait up to ``timeout_seconds`` for delivery."""
        self._collect()
        return self._sender.flush(timeout_seconds)

    def close(self, timeout_seconds: float | None = None, status: str | None = None) -> bool:
        """Read what is pending, mark the run's status and flush, within the timeout.

        Idempotent; never raises on delivery problems. Also runs at interpreter
        exit for a monitor that was not closed. What is not delivered in time
        stays in the spool for the next monitor with this ``run_id`` (or
        ``gradwatch upload``). Blocks up to ``timeout_seconds``.

        Args:
            timeout_seconds: Longest wait, seconds; default
                ``close_timeout_seconds``.
            status: ``finished`` or ``failed``; by default ``failed`` when a
                ``fit`` began and did not end (it raised), else ``finished``.

        Returns:
            ``True`` if everything was delivered in time and nothing was
            dropped or refused (see :attr:`dropped_batches`).
        """
        if self._closed:
            return self._delivered
        self._closed = True
        if timeout_seconds is None:
            timeout_seconds = self.config.close_timeout_seconds
        if status is None:
            status = "failed" if self._train_active else "finished"
        try:
            self._collect()
            # A fit that raised never reached on_train_end: give the model its optimizer back.
            self._loss_capture.uninstall()
            self._swap.end_fit(self.model)
        except Exception:  # e.g. TensorFlow half torn down at interpreter exit
            log.exception("gradwatch: could not read the last steps at close")
        self._sender.set_status(status)
        self._print_local_summary()
        self._delivered = self._sender.close(timeout_seconds)
        if self.config.server is not None and (self.cluster is None or self.cluster.is_chief):
            say_delivery(self.config.run, self.run_url, self._sender)
        return self._delivered

    def __enter__(self) -> GradientMonitor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(status="failed" if exc_type is not None else None)

    # -- Keras callback hooks --------------------------------------------------------------

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._check_open()
        model = self.model
        if self._groups:
            self._begin_grouped_fit(model)
            return
        self._loss_capture.install(model)  # before any trace: Keras binds train_step then
        self._swap.begin_fit(model, self._loss_capture.made_with_hooks)
        self._loss_capture.remember(model.train_function)
        self._fit_started()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        step = getattr(self._checkpointed, "step", None)  # made when the optimizer builds
        first = step if step is not None else getattr(self.model.optimizer, "iterations", None)
        start = 0 if first is None else int(first.numpy())  # numpy(): also of a MirroredVariable
        self._recorders()[0].incidents.shared.note_epoch(epoch, start)

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self._groups:
            self._groups.before_step()
        else:
            self._recorder.before_step()

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._fit_batches += 1
        if self._groups:
            self._groups.after_steps(self._steps_per_call)
        else:
            self._recorder.after_steps(self._recorder.steps_per_call)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._collect()
        if self._fit_batches and self._recorded_steps == self._fit_first_step:
            if self._groups:
                names = self._groups.optimizer_names
            else:
                names = [] if self._wrapper is None else [self._wrapper.inner_optimizer.name]
            warn_nothing_recorded(self.config.run, self._fit_batches, names)
        self._sender.set_status("finished")
        self._train_active = False
        self._print_local_summary()
        self._loss_capture.uninstall()
        self._swap.end_fit(self.model)

    # -- internals -------------------------------------------------------------------------

    def _begin_grouped_fit(self, model: Any) -> None:
        """``on_train_begin`` with groups: the model's train_step applies the wrapped optimizers.

        ``model.optimizer`` is left alone (a GAN's is unused); the train_step hook counts one
        step per call and takes the loss from a ``loss``/``total_loss`` metric.
        """
        self._loss_capture.install(model)
        self._steps_per_call = max(1, int(getattr(model, "steps_per_execution", 1) or 1))
        self._groups.begin_fit(model, self._steps_per_call)
        self._fit_started()

    def _fit_started(self) -> None:
        self._sender.set_status("running")
        self._train_active = True
        self._fit_batches = 0
        self._fit_first_step = self._recorded_steps

    def _collect(self) -> None:
        """Host: read every pending step and submit it."""
        if self._groups:
            self._groups.collect()
        else:
            self._recorder.collect()

    @property
    def _recorded_steps(self) -> int:
        return self._groups.recorded_steps if self._groups else self._recorder.recorded_steps

    def _recorders(self) -> list[StepRecorder]:
        return self._groups.recorders if self._groups else [self._recorder]

    def _check_open(self) -> None:
        if self._closed:
            raise MonitorClosedError(
                f"this GradientMonitor (run {self.config.run!r}) was closed; a closed monitor "
                "records nothing. Create a new GradientMonitor for another run, or close it "
                "only after the last fit."
            )

    def _layer_owners(self) -> dict[object, str] | None:
        """Layer paths from the model's tree (``fit`` sets the model; custom loops: set_model)."""
        model = self.model
        return None if model is None else layer_paths(model, compat.sublayers, compat.variable_key)

    def _print_local_summary(self) -> None:
        """Local mode: wait for the file writes, then print the run's totals (once per change)."""
        if self._printer is None:
            return
        self._sender.flush(self.config.close_timeout_seconds)
        self._printer.print_if_changed()
