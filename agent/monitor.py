"""GradientMonitor: the optimizer wrapper, the Keras callback and the custom-loop API.

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
4. Every ``stats_every`` steps it snapshots the weights before a step and
   measures them after it, each with a call of its own between steps, and
   writes the weight norms and update ratios into that step's row
   (:mod:`gradwatch.agent.weights`). With ``steps_per_execution`` > 1 there is
   no call between the steps of an execution, so the train step measures its
   first step itself, in a ``tf.cond`` (about ×1.02 per step).

The ring holds ``flush_every + steps_per_execution`` rows: the host reads as
soon as ``flush_every`` steps may be pending, and at most
``steps_per_execution`` more run before the next callback, so no row is
overwritten unread. Steps lost anyway (a custom loop that calls ``on_step``
too rarely) are counted in :attr:`GradientMonitor.lost_steps`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from gradwatch.agent.clip import ClipContext, ClipPolicy
from gradwatch.agent.config import ConfigError, MonitorConfig, check_writable_directory
from gradwatch.agent.layers import LayerLayout, layout_of
from gradwatch.agent.records import StepBatch
from gradwatch.agent.sender import RetryPolicy, Sender, close_at_exit
from gradwatch.agent.spool import Spool
from gradwatch.agent.stats import compute_gradient_stats
from gradwatch.agent.transport import HttpTransport, JsonlTransport, RunInfo, Transport
from gradwatch.agent.weights import WeightSnapshot

__all__ = ["GradientMonitor", "MonitoredOptimizer"]

log = logging.getLogger("gradwatch.agent")

# Columns of the per-step run buffer (_WEIGHED: weight statistics were measured).
_LOSS, _LOSS_KNOWN, _GLOBAL, _GLOBAL_CLIPPED, _COEF, _SKIPPED, _WEIGHED = range(7)
_RUN_COLUMNS = 7


def _variable_key(variable: Any) -> object:
    """Identity of a variable that is the same across replicas and wrappers."""
    value = getattr(variable, "value", variable)  # keras.Variable → tf.Variable
    if hasattr(value, "_distributed_container"):
        value = value._distributed_container()
    return getattr(value, "_unique_id", id(value))


def _all_reduce_sum(replica: Any, grads: list[Any]) -> list[Any]:
    """Sum gradients over replicas (one all-reduce for all of them); ``None`` stays."""
    present = [tf.convert_to_tensor(g) for g in grads if g is not None]
    reduced = iter(replica.all_reduce(tf.distribute.ReduceOp.SUM, present)) if present else iter(())
    return [None if g is None else next(reduced) for g in grads]


def _scale_gradient(grad: Any, factor: float) -> Any:
    if grad is None:
        return None
    if isinstance(grad, tf.IndexedSlices):
        return tf.IndexedSlices(grad.values * factor, grad.indices, grad.dense_shape)
    return grad * tf.cast(factor, grad.dtype)


def _check_token(token: str | None) -> str | None:
    """The token to send: the argument, else ``$GRADWATCH_TOKEN``; never logged."""
    if token is None:
        token = os.environ.get("GRADWATCH_TOKEN") or None
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise ConfigError("token: expected a non-empty string from `gradwatch token create`")
    return token


def _weight_columns(
    weights: np.ndarray[Any, Any] | None, known: np.ndarray[Any, Any], part: np.ndarray[Any, Any]
) -> dict[str, Any]:
    """The StepBatch weight fields for rows ``part`` of a ring read (none when weights are off)."""
    if weights is None:
        return {}
    return {
        "weight_norm": weights[part, 0].astype(np.float32),
        "update_ratio": weights[part, 1].astype(np.float32),
        "weights_known": known,
    }


def _write_row(buffer: tf.Variable, row: tf.Tensor, value: tf.Tensor) -> None:
    """Write one ring-buffer row (``row`` is ``[[index]]``).

    A whole-buffer assign of ``tensor_scatter_nd_update`` rather than the
    variable's own ``scatter_nd_update``, which mirrored variables lack; the
    buffer is a few KB and XLA updates it in place.
    """
    buffer.assign(tf.tensor_scatter_nd_update(buffer.read_value(), row, value))


def _variable(value: Any, dtype: tf.DType, name: str) -> tf.Variable:
    """A non-trainable monitor variable; mirrored under MirroredStrategy (same on all replicas)."""
    return tf.Variable(
        value,
        dtype=dtype,
        trainable=False,
        name=name,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
    )


class _GraphState(tf.Module):
    """The in-graph ring buffers (never checkpointed; rebuilt when the ring must grow).

    Rows are indexed by ``recorded % capacity``, a count of rows written by this
    process, so restoring the checkpointed step counter never confuses reading.
    The loss is the mean of the losses recorded since the last row (one, or the
    micro-batches of a step with gradient accumulation).
    """

    def __init__(self, layout: LayerLayout, capacity: int, weights: bool) -> None:
        super().__init__(name="gradwatch_ring")
        var = _variable
        num_layers = layout.num_layers
        self.layout = layout
        self.capacity = capacity
        self.recorded = var(0, tf.int64, "recorded")
        self.loss_sum = var(0.0, tf.float32, "loss_sum")
        self.loss_count = var(0, tf.int32, "loss_count")
        self.step_buf = var(tf.fill([capacity], tf.constant(-1, tf.int64)), tf.int64, "step_buf")
        self.run_buf = var(tf.zeros([capacity, _RUN_COLUMNS]), tf.float32, "run_buf")
        self.norm_buf = var(tf.zeros([capacity, num_layers]), tf.float32, "norm_buf")
        self.nonfinite_buf = var(
            tf.zeros([capacity, num_layers], tf.int32), tf.int32, "nonfinite_buf"
        )
        # Row i: the weight norms and the update ratios, meaningful where _WEIGHED is set.
        self.weight_buf = (
            var(tf.zeros([capacity, 2, num_layers]), tf.float32, "weight_buf") if weights else None
        )


@dataclass(frozen=True, slots=True)
class _Row:
    """One step's gradient statistics, measured before the update and written after it."""

    step: tf.Tensor
    layout: LayerLayout
    global_norm: tf.Tensor
    global_norm_clipped: tf.Tensor
    clip_coef: tf.Tensor
    skipped: tf.Tensor
    layer_norms: tf.Tensor
    layer_nonfinite: tf.Tensor


@dataclass(frozen=True, slots=True)
class _Installed:
    """An optimizer swap made by the callback, undone at the end of training."""

    owner: Any  # the model, or the LossScaleOptimizer whose inner optimizer was swapped
    attribute: str
    original: Any
    plain_train_function: Any  # the model's train function before the swap (may be None)


@dataclass(frozen=True, slots=True)
class _Traced:
    """A train function traced with the wrapper, reused by the next ``fit`` of the model."""

    model: Any
    train_function: Any
    state: _GraphState
    weights_in_step: bool


@keras.saving.register_keras_serializable(package="gradwatch")
class MonitoredOptimizer(keras.optimizers.Optimizer):  # type: ignore[misc]
    """Wraps an optimizer so every ``apply`` is measured and clipped in-graph.

    Made by :meth:`GradientMonitor.wrap`; follows the pattern of Keras' own
    ``LossScaleOptimizer``. It exposes only the inner optimizer's variables, so
    a checkpoint of the model looks exactly as without gradwatch.
    """

    def __init__(
        self, inner_optimizer: keras.optimizers.Optimizer, monitor: GradientMonitor
    ) -> None:
        super().__init__(learning_rate=0.0, name=f"gradwatch_{inner_optimizer.name}")
        self.inner_optimizer = inner_optimizer
        object.__setattr__(self, "_gradwatch_monitor", monitor)

    @property
    def monitor(self) -> GradientMonitor:
        """The monitor that records this optimizer's steps."""
        return self._gradwatch_monitor  # type: ignore[no-any-return]

    def build(self, var_list: Sequence[Any]) -> None:
        """Build the inner optimizer and the monitor's in-graph state (eagerly)."""
        if not self.inner_optimizer.built:
            self.inner_optimizer.build(var_list)
        self.monitor._build_state(var_list, self.inner_optimizer)
        self.built = True

    @property
    def variables(self) -> list[Any]:
        return list(self.inner_optimizer.variables)

    @property
    def iterations(self) -> Any:
        return self.inner_optimizer.iterations

    @property
    def learning_rate(self) -> Any:
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate: Any) -> None:
        self.inner_optimizer.learning_rate = learning_rate

    def scale_loss(self, loss: Any) -> Any:
        """Record the step's loss, then let the inner optimizer scale it."""
        self.monitor.record_loss(loss)
        return self.inner_optimizer.scale_loss(loss)

    def apply(self, grads: Sequence[Any], trainable_variables: Sequence[Any] | None = None) -> None:
        """Measure, clip and apply one step's gradients (runs inside the compiled step).

        Under ``tf.distribute`` the gradients are all-reduced first, so the
        statistics, the policy and the skip decision see the summed gradient and
        N replicas give the single-device result; the inner optimizer then gets
        ``g / N`` per replica, which its own all-reduce sums back to ``g``.

        Raises:
            ConfigError: The inner optimizer accumulates gradients under
                ``tf.distribute`` (Keras itself cannot: its accumulation
                ``tf.cond`` would contain a ``merge_call``).
        """
        if trainable_variables is None:
            trainable_variables = self.inner_optimizer._trainable_variables
        variables = list(trainable_variables)
        if not self.built:
            self.build(variables)
        grads = list(grads)
        replica = tf.distribute.get_replica_context()
        replicas = replica.num_replicas_in_sync if replica is not None else 1
        if self.inner_optimizer.gradient_accumulation_steps:
            if replicas > 1:
                raise ConfigError(
                    "optimizer: gradient_accumulation_steps does not work under tf.distribute"
                )
            self._apply_accumulating(grads, variables)
            return
        if replicas > 1:
            grads = _all_reduce_sum(replica, grads)
        new_grads, skip, row = self.monitor._process(grads, variables)
        if replicas > 1:
            new_grads = [_scale_gradient(g, 1.0 / replicas) for g in new_grads]
        if skip is None:
            self.inner_optimizer.apply(new_grads, variables)
        elif replicas > 1:
            # A tf.cond inside the replica function cannot wrap the inner optimizer's own
            # merge_call; decide in cross-replica context, as Keras' LossScaleOptimizer does.
            replica.merge_call(self._apply_unless_skipped, args=(new_grads, variables, skip))
        else:

            def update() -> tf.Tensor:
                self.inner_optimizer.apply(new_grads, variables)
                return tf.constant(True)

            tf.cond(skip, lambda: tf.constant(False), update)
        self.monitor._record_row(row, variables)

    def _apply_unless_skipped(
        self, distribution: Any, grads: list[Any], variables: list[Any], skip: Any
    ) -> None:
        """Cross-replica: apply the per-replica gradients on every replica, or on none."""
        skip_any = distribution.experimental_local_results(skip)[0]  # same on every replica

        def update() -> tf.Tensor:
            distribution.extended.call_for_each_replica(
                self.inner_optimizer.apply, args=(grads, variables)
            )
            return tf.constant(True)

        tf.cond(skip_any, lambda: tf.constant(False), update)

    def _apply_accumulating(self, grads: list[Any], variables: list[Any]) -> None:
        """``gradient_accumulation_steps``: work on the averaged gradient of each real update.

        Keras adds each micro-batch's gradient to its accumulators and, on every
        n-th call, averages them and clips the average inside its own
        ``tf.cond``. gradwatch measures, clips and records at that same point,
        once per real update, by shadowing three of the inner optimizer's
        methods while this call traces it: the Keras clipping
        (``_clip_gradients``) and the decoupled weight decay
        (``_apply_weight_decay``) are deferred to the update
        (``_backend_update_step``), which runs the policy first and skips all
        three together when the policy skips the step (the accumulators are
        reset and ``iterations`` advances either way, as Keras does).
        """
        inner = self.inner_optimizer
        monitor = self.monitor
        clip_gradients = inner._clip_gradients
        apply_weight_decay = inner._apply_weight_decay
        update_step = inner._backend_update_step
        decayed: list[Any] = []

        def update_averaged(averaged: Any, trainable: Any, learning_rate: Any) -> None:
            trainable = list(trainable)
            new_grads, skip, row = monitor._process(list(averaged), trainable)
            new_grads = clip_gradients(new_grads)

            def update() -> tf.Tensor:
                for decay_variables in decayed:
                    apply_weight_decay(decay_variables)
                update_step(new_grads, trainable, learning_rate)
                return tf.constant(True)

            if skip is None:
                update()
            else:
                tf.cond(skip, lambda: tf.constant(False), update)
            monitor._record_row(row, trainable)

        hooks: dict[str, Callable[..., Any]] = {
            "_clip_gradients": lambda averaged: averaged,
            "_apply_weight_decay": decayed.append,
            "_backend_update_step": update_averaged,
        }
        # Straight into the instance dict, for this trace only.
        vars(inner).update(hooks)
        try:
            inner.apply(grads, variables)
        finally:
            for name in hooks:
                vars(inner).pop(name, None)

    def finalize_variable_values(self, var_list: Sequence[Any]) -> None:
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self) -> dict[str, Any]:
        return {"inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer)}

    @classmethod
    def from_config(
        cls, config: dict[str, Any], custom_objects: dict[str, Any] | None = None
    ) -> keras.optimizers.Optimizer:
        """Load as the plain inner optimizer: a saved model does not carry its monitor."""
        return keras.saving.deserialize_keras_object(
            config["inner_optimizer"], custom_objects=custom_objects
        )


class GradientMonitor(keras.callbacks.Callback, tf.__internal__.tracking.Trackable):  # type: ignore[misc]
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
        flush_every: Steps per host read and per batch sent.
        stats_every: Steps between measurements of the per-layer weight norm
            and update ratio ‖Δw‖/‖w‖ (the first step of each ``fit`` is
            measured; with ``steps_per_execution`` > 1, the first step of the
            execution where one is due). 0 turns them off; while on, one copy
            of the trainable weights is kept.
        project: Project the run belongs to.
        run_id: UUID of an existing run to continue; new one if omitted.
        queue_size: Batches held in memory while the sender is busy.
        request_timeout_seconds: Timeout of one HTTP request.
        retry_deadline_seconds: How long to retry a request before giving up.
        local_dir: Where local mode writes its files.
        transport: A transport to use instead of the default one (tests).
        spool_dir: Root of the on-disk spool for batches the server has not
            acknowledged; default ``<user cache dir>/gradwatch/spool``.
        spool_max_bytes: Cap on the run's spool, bytes; over it the oldest
            batches are dropped (``spool_full``). 0 turns the spool off.
        queue_max_bytes: Cap on the batches held in memory, bytes.
        close_timeout_seconds: Default timeout of :meth:`close`, which also
            runs at interpreter exit.
        token: Bearer token with the ``ingest`` scope (``gradwatch token create``);
            default ``$GRADWATCH_TOKEN``. Needed once the server has tokens.

    Raises:
        ConfigError: An argument is invalid, or ``local_dir``/``spool_dir``
            cannot be written to (the message names it).

    Thread-safety: training-thread object; :meth:`close` may be called from
    any thread once training has stopped.
    """

    def __init__(
        self,
        run: str,
        server: str | None = None,
        policy: ClipPolicy | None = None,
        flush_every: int = 50,
        stats_every: int = 50,
        project: str = "default",
        run_id: str | None = None,
        queue_size: int = 1000,
        request_timeout_seconds: float = 10.0,
        retry_deadline_seconds: float = 60.0,
        local_dir: str | None = None,
        transport: Transport | None = None,
        spool_dir: str | None = None,
        spool_max_bytes: int = 256 * 2**20,
        queue_max_bytes: int = 64 * 2**20,
        close_timeout_seconds: float = 10.0,
        token: str | None = None,
    ) -> None:
        super().__init__()
        kwargs: dict[str, Any] = {}
        if local_dir is not None:
            kwargs["local_dir"] = local_dir
        if spool_dir is not None:
            kwargs["spool_dir"] = spool_dir
        self.config = MonitorConfig(
            run=run,
            server=server,
            project=project,
            run_id=run_id or "",
            flush_every=flush_every,
            stats_every=stats_every,
            queue_size=queue_size,
            request_timeout_seconds=request_timeout_seconds,
            retry_deadline_seconds=retry_deadline_seconds,
            spool_max_bytes=spool_max_bytes,
            queue_max_bytes=queue_max_bytes,
            close_timeout_seconds=close_timeout_seconds,
            **kwargs,
        )
        if policy is not None and not isinstance(policy, ClipPolicy):
            raise ConfigError(
                "policy: expected a policy from gradwatch.agent.clip "
                f"(e.g. clip.global_norm(1.0)), got {policy!r}"
            )
        self.policy = policy
        spool = None
        if self.config.server is not None and self.config.spool_max_bytes > 0:
            check_writable_directory("spool_dir", self.config.spool_dir)
            spool = Spool(self.config.spool_dir, self.config.run_id, self.config.spool_max_bytes)
        self._local: JsonlTransport | None = None
        if transport is None:
            if self.config.server is None:
                check_writable_directory("local_dir", self.config.local_dir)
                transport = self._local = JsonlTransport(self.config.local_dir)
            else:
                transport = HttpTransport(
                    self.config.server,
                    self.config.request_timeout_seconds,
                    token=_check_token(token),
                )
        run_info = RunInfo(
            run_id=self.config.run_id,
            name=self.config.run,
            project=self.config.project,
            config={
                "flush_every": self.config.flush_every,
                "stats_every": self.config.stats_every,
                "policy": policy.describe() if policy else None,
            },
        )
        self._sender = Sender(
            transport,
            run_info,
            queue_size=self.config.queue_size,
            retry=RetryPolicy(deadline_seconds=self.config.retry_deadline_seconds),
            spool=spool,
            queue_max_bytes=self.config.queue_max_bytes,
            exit_timeout_seconds=self.config.close_timeout_seconds,
        )
        self._state: _GraphState | None = None
        # What tf.train.Checkpoint saves: the step counter and the policy state.
        self._checkpointed = tf.__internal__.tracking.AutoTrackable()
        self._track_trackable(self._checkpointed, name="gradwatch")
        self._var_segments: dict[object, int] = {}
        self._variables: list[Any] = []  # as built: what an overflow step measures
        self._snapshot: WeightSnapshot | None = None  # None: weight statistics off
        self._until_snapshot = 0  # micro-batches until the next weight snapshot
        self._measure_tries = 0  # host calls left to measure the step after the snapshot
        self._measure_fn: Any = None  # the host-called measurement, for the current ring
        self._weights_in_step = False  # trace time: the step measures itself (see module doc)
        self._accumulation = 1  # micro-batches per recorded step
        self._wrapper: MonitoredOptimizer | None = None
        self._installed: _Installed | None = None
        self._traced: _Traced | None = None
        self._hooked_lso: Any = None
        self._steps_per_call = 1
        self._unread_estimate = 0
        self._read_count: int | None = None
        self._lost_steps = 0
        self._closed = False
        self._train_active = False  # between on_train_begin and on_train_end
        self._summarised_steps = 0  # local mode: steps in the last printed summary
        close_at_exit(self._close_at_exit)  # weak: the monitor can still be collected

    # -- public API ------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        """UUID of the run on the server."""
        return self.config.run_id

    @property
    def layers(self) -> tuple[str, ...]:
        """Layer names in reporting order (empty until the first build)."""
        return self._state.layout.names if self._state is not None else ()

    @property
    def lost_steps(self) -> int:
        """Steps overwritten in the ring buffer before the host read them."""
        return self._lost_steps

    @property
    def dropped_batches(self) -> dict[str, int]:
        """Batches dropped by the sender, by reason."""
        return self._sender.dropped_batches

    @property
    def sender(self) -> Sender:
        """The background sender (for counters and flushing)."""
        return self._sender

    def wrap(self, optimizer: keras.optimizers.Optimizer) -> MonitoredOptimizer:
        """Return ``optimizer`` wrapped so this monitor sees every step.

        With mixed precision, let ``compile`` add the ``LossScaleOptimizer``
        around the wrapper (or wrap the LSO's inner optimizer): a wrapper around
        an LSO would see scaled gradients.

        Raises:
            ConfigError: The optimizer is already wrapped, or is a
                ``LossScaleOptimizer``.
        """
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
        if self._wrapper is not None and self._wrapper.inner_optimizer is not optimizer:
            raise ConfigError("optimizer: this monitor already wraps another optimizer")
        if self._wrapper is None:
            self._wrapper = MonitoredOptimizer(optimizer, self)
        return self._wrapper

    def apply_gradients(
        self, grads_and_vars: Iterable[tuple[Any, Any]], loss: Any | None = None
    ) -> None:
        """Custom loops: record ``loss`` (optional) and apply through the wrapped optimizer."""
        if self._wrapper is None:
            raise ConfigError("optimizer: call monitor.wrap(optimizer) before apply_gradients")
        if loss is not None:
            self.record_loss(loss)
        self._wrapper.apply_gradients(grads_and_vars)

    def record_loss(self, loss: Any) -> None:
        """Record the current step's loss (in-graph; no host sync)."""
        if self._state is None:
            return
        value = tf.cast(tf.reduce_mean(loss), tf.float32)
        replica = tf.distribute.get_replica_context()
        if replica is not None and replica.num_replicas_in_sync > 1:
            # Keras scales each replica's loss by 1/N; their sum is the global mean.
            value = replica.all_reduce(tf.distribute.ReduceOp.SUM, value)
        self._state.loss_sum.assign_add(value)
        self._state.loss_count.assign_add(1)

    def on_step(self, step: int | None = None) -> None:
        """Custom loops: call after each training step (host side, cheap).

        Reads the in-graph buffers once every ``flush_every`` calls, and
        snapshots the weights every ``stats_every`` calls (one copy of them).
        """
        self._measure_weights()
        self._unread_estimate += 1
        self._collect_if_due()
        self._until_snapshot -= 1
        if self._until_snapshot <= 0:
            self._snapshot_weights()

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
            ``True`` if everything was delivered in time.
        """
        if self._closed:
            return True
        self._closed = True
        if timeout_seconds is None:
            timeout_seconds = self.config.close_timeout_seconds
        if status is None:
            status = "failed" if self._train_active else "finished"
        try:
            self._collect()
            # A fit that raised never reached on_train_end: give the model its optimizer back.
            self._unhook_loss_scale()
            self._uninstall()
        except Exception:  # e.g. TensorFlow half torn down at interpreter exit
            log.exception("gradwatch: could not read the last steps at close")
        self._sender.set_status(status)
        self._print_local_summary()
        return self._sender.close(timeout_seconds)

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
        model = self.model
        swapped = self._install(model)
        self._hook_loss_scale(model.optimizer)
        self._steps_per_call = max(1, int(getattr(model, "steps_per_execution", 1) or 1))
        wrapper = self._wrapper
        assert wrapper is not None
        with model.distribute_strategy.scope():
            if not wrapper.built:
                wrapper.build(model.trainable_variables)
            grown = self._ensure_capacity()
        traced = self._traced
        in_step = self._snapshot is not None and self._steps_per_call > 1
        retrace = in_step != self._weights_in_step
        self._weights_in_step = in_step
        self._snapshot_weights()  # the weights may have changed since the last fit
        if (
            swapped
            and traced is not None
            and traced.model is model
            and traced.state is self._state
            and traced.weights_in_step == in_step
        ):
            # Same wrapper and buffers as the last fit: reuse its trace instead of retracing.
            model.train_function = traced.train_function
        elif swapped or grown or retrace:
            # Trace again so the train function calls the wrapper and the current buffers.
            model.train_function = None
            model.make_train_function()
        self._sender.set_status("running")
        self._train_active = True

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self._until_snapshot <= 0:
            self._snapshot_weights()

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._measure_weights()
        self._unread_estimate += self._steps_per_call
        self._until_snapshot -= self._steps_per_call
        self._collect_if_due()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._collect()
        self._sender.set_status("finished")
        self._train_active = False
        self._print_local_summary()
        self._unhook_loss_scale()
        self._uninstall()

    # -- internals -------------------------------------------------------------------------

    def _collect_if_due(self) -> None:
        """Read once ``flush_every`` steps may be pending (micro-batches counted by the caller)."""
        if self._unread_estimate >= self.config.flush_every * self._accumulation:
            self._collect()

    def _snapshot_weights(self) -> None:
        """Host side: copy the weights before the next step, to measure that step.

        With ``steps_per_execution`` > 1 this happens between executions, so the
        step measured is the first of the next one. No-op when stats are off.
        """
        if self._snapshot is None:
            return
        self._snapshot.take(self._checkpointed.step)
        self._until_snapshot = self.config.stats_every * self._accumulation
        # The step after the snapshot is recorded within one gradient accumulation cycle.
        self._measure_tries = 0 if self._weights_in_step else self._accumulation

    def _measure_weights(self) -> None:
        """Host side, after a step: measure it if it is the step after the snapshot.

        One call of a compiled function that reads the weights and writes the
        last ring row; a no-op there while that step has not been recorded yet.
        """
        snapshot = self._snapshot
        if snapshot is None or self._measure_tries <= 0:
            return
        self._measure_tries -= 1
        if self._measure_fn is None:
            self._measure_fn = tf.function(self._measure_last_step, autograph=False)
        with snapshot.strategy.scope():
            self._measure_fn()

    def _install(self, model: Any) -> bool:
        """Swap the wrapper into ``model`` unless it is there already; True if swapped."""
        optimizer = model.optimizer
        if optimizer is None:
            raise ConfigError("model: compile the model with an optimizer before fit")
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            inner = optimizer.inner_optimizer
            if isinstance(inner, MonitoredOptimizer):
                self._check_own(inner)
                return False
            optimizer.inner_optimizer = self.wrap(inner)
            self._installed = _Installed(optimizer, "inner_optimizer", inner, model.train_function)
            return True
        if isinstance(optimizer, MonitoredOptimizer):
            self._check_own(optimizer)
            return False
        model.optimizer = self.wrap(optimizer)
        self._installed = _Installed(model, "optimizer", optimizer, model.train_function)
        return True

    def _hook_loss_scale(self, optimizer: Any) -> None:
        """Let the monitor see what a LossScaleOptimizer keeps from the wrapper.

        The LSO skips an overflow step without calling the wrapper, and scales
        the loss without calling the inner optimizer's ``scale_loss``. Its two
        methods are shadowed on the instance for the duration of training (the
        functions traced meanwhile keep the hooks), so such steps are recorded
        as skipped and the unscaled loss is recorded every step.
        """
        if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            return
        if self._hooked_lso is optimizer:
            return
        self._unhook_loss_scale()
        handle_non_finite = optimizer._stateful_handle_non_finite_grads
        scale_loss = optimizer.scale_loss

        def hooked_handle_non_finite() -> Any:
            self._record_overflow_step()
            return handle_non_finite()

        def hooked_scale_loss(loss: Any) -> Any:
            self.record_loss(loss)
            return scale_loss(loss)

        # Straight into the instance dict: Keras' tracking __setattr__ has no business here.
        vars(optimizer)["_stateful_handle_non_finite_grads"] = hooked_handle_non_finite
        vars(optimizer)["scale_loss"] = hooked_scale_loss
        self._hooked_lso = optimizer

    def _unhook_loss_scale(self) -> None:
        optimizer, self._hooked_lso = self._hooked_lso, None
        if optimizer is not None:
            vars(optimizer).pop("_stateful_handle_non_finite_grads", None)
            vars(optimizer).pop("scale_loss", None)

    def _check_own(self, wrapper: MonitoredOptimizer) -> None:
        if wrapper.monitor is not self:
            raise ConfigError("optimizer: wrapped by a different GradientMonitor")

    def _uninstall(self) -> None:
        installed, self._installed = self._installed, None
        if installed is None:
            return
        setattr(installed.owner, installed.attribute, installed.original)
        model = self.model
        if model is not None and self._state is not None:
            self._traced = _Traced(model, model.train_function, self._state, self._weights_in_step)
            model.train_function = installed.plain_train_function

    def _capacity(self) -> int:
        return self.config.flush_every + self._steps_per_call

    def _build_state(self, variables: Sequence[Any], inner: keras.optimizers.Optimizer) -> None:
        """Create the in-graph state for ``variables`` (once per monitor).

        Runs eagerly even when Keras builds the optimizer during tracing (as it
        may under a distribution strategy): variables are lifted out of the graph.
        """
        if self._state is not None:
            return
        with tf.init_scope():
            layout = layout_of(variables)
            self._state = _GraphState(layout, self._capacity(), self._weights_on)
            self._var_segments = {
                _variable_key(v): seg for v, seg in zip(variables, layout.segment_ids, strict=True)
            }
            self._variables = list(variables)
            self._accumulation = inner.gradient_accumulation_steps or 1
            # Tracked attributes: a checkpoint restored before this point is applied now.
            first_step = int(inner.iterations.numpy()) if inner.built else 0
            self._checkpointed.step = _variable(first_step, tf.int64, "step")
            if self.policy is not None:
                self._checkpointed.policy = self.policy.init(variables, layout)
            self._read_count = 0
            if self._weights_on:
                step = int(self._checkpointed.step.numpy())
                keys = [_variable_key(v) for v in variables]
                self._snapshot = WeightSnapshot(variables, keys, step)
                self._until_snapshot = self.config.stats_every * self._accumulation
                self._measure_tries = self._accumulation  # custom loops: measure the first step

    def _ensure_capacity(self) -> bool:
        """Grow the ring if ``steps_per_execution`` needs more rows; True if it grew."""
        state = self._state
        if state is None or state.capacity >= self._capacity():
            return False
        self._collect()
        self._state = _GraphState(state.layout, self._capacity(), self._weights_on)
        self._measure_fn = None  # traced with the old ring
        self._read_count = 0
        return True

    @property
    def _weights_on(self) -> bool:
        return self.config.stats_every > 0

    def _layout_for(self, variables: Sequence[Any]) -> LayerLayout:
        """The layer groups of ``variables``, in the order given."""
        state = self._state
        assert state is not None, "the wrapped optimizer was not built"
        try:
            segments = tuple(self._var_segments[_variable_key(v)] for v in variables)
        except KeyError:
            raise ConfigError(
                "variables: apply() got a variable the optimizer was not built with"
            ) from None
        return LayerLayout(state.layout.names, segments)

    def _process(
        self, grads: list[Any], variables: list[Any]
    ) -> tuple[list[Any], tf.Tensor | None, _Row]:
        """In-graph: measure and clip one step. Returns (grads, skip or None, row to record)."""
        layout = self._layout_for(variables)
        stats = compute_gradient_stats(grads, layout)
        skip: tf.Tensor | None = None
        coef = tf.constant(1.0)
        norm_after = stats.global_norm
        step = self._checkpointed.step.read_value()
        if self.policy is not None:
            result = self.policy.apply(
                grads, self._checkpointed.policy, ClipContext(stats, variables, layout, step)
            )
            grads, coef, skip = result.grads, result.clip_coef, result.skip
            after = (
                result.stats if result.stats is not None else compute_gradient_stats(grads, layout)
            )
            norm_after = after.global_norm
        row = _Row(
            step=step,
            layout=layout,
            global_norm=stats.global_norm,
            global_norm_clipped=norm_after,
            clip_coef=coef,
            skipped=tf.constant(False) if skip is None else skip,
            layer_norms=stats.layer_norms,
            layer_nonfinite=stats.layer_nonfinite,
        )
        return grads, skip, row

    def _record_row(self, row: _Row, variables: Sequence[Any]) -> None:
        """In-graph, after the update: write ``row`` into the ring and advance the step counter.

        With ``steps_per_execution`` > 1 and weight statistics on, also measures
        the weights of ``variables`` on the step after a snapshot.
        """
        state = self._state
        assert state is not None, "the wrapped optimizer was not built"
        snapshot = self._snapshot if self._weights_in_step else None
        weigh = tf.constant(False) if snapshot is None else tf.equal(row.step, snapshot.step)
        index = tf.reshape(tf.math.floormod(state.recorded.read_value(), state.capacity), [1, 1])
        count = state.loss_count.read_value()
        loss = tf.where(
            count > 0,
            state.loss_sum.read_value() / tf.cast(tf.maximum(count, 1), tf.float32),
            float("nan"),
        )
        run_row = tf.stack(
            [
                loss,
                tf.cast(count > 0, tf.float32),
                tf.cast(row.global_norm, tf.float32),
                tf.cast(row.global_norm_clipped, tf.float32),
                tf.cast(row.clip_coef, tf.float32),
                tf.cast(row.skipped, tf.float32),
                tf.cast(weigh, tf.float32),
            ]
        )
        _write_row(state.step_buf, index, tf.reshape(row.step, [1]))
        _write_row(state.run_buf, index, run_row[tf.newaxis])
        _write_row(state.norm_buf, index, tf.cast(row.layer_norms, tf.float32)[tf.newaxis])
        _write_row(state.nonfinite_buf, index, tf.cast(row.layer_nonfinite, tf.int32)[tf.newaxis])
        if snapshot is not None and state.weight_buf is not None:
            keys = [_variable_key(v) for v in variables]
            values = tf.cond(
                weigh,
                lambda: snapshot.measure(variables, keys, row.layout),
                lambda: tf.zeros([2, row.layout.num_layers]),
            )
            _write_row(state.weight_buf, index, values[tf.newaxis])
        state.loss_sum.assign(0.0)
        state.loss_count.assign(0)
        state.recorded.assign_add(1)
        self._checkpointed.step.assign_add(1)

    def _measure_last_step(self) -> None:
        """Traced into :attr:`_measure_fn`: measure the last recorded step if it is due.

        Due: it is the step after the snapshot and was not measured yet.
        """
        state, snapshot = self._state, self._snapshot
        assert state is not None
        assert state.weight_buf is not None
        assert snapshot is not None
        weight_buf = state.weight_buf
        recorded = state.recorded.read_value()
        index = tf.math.floormod(recorded - 1, state.capacity)
        due = tf.logical_and(
            recorded > 0,
            tf.logical_and(
                tf.equal(tf.gather(state.step_buf.read_value(), index), snapshot.step),
                tf.equal(state.run_buf.read_value()[index, _WEIGHED], 0.0),
            ),
        )
        keys = [_variable_key(v) for v in self._variables]

        def measure() -> tf.Tensor:
            values = snapshot.measure(self._variables, keys, state.layout)
            _write_row(weight_buf, tf.reshape(index, [1, 1]), values[tf.newaxis])
            flag = tf.stack([index, tf.constant(_WEIGHED, tf.int64)])[tf.newaxis]
            state.run_buf.assign(tf.tensor_scatter_nd_update(state.run_buf, flag, [1.0]))
            return tf.constant(True)

        tf.cond(due, measure, lambda: tf.constant(False))

    def _record_overflow_step(self) -> None:
        """In-graph: record a step the LossScaleOptimizer skipped because of overflow.

        The scaled gradient overflowed, so no norm of the unscaled gradient can be
        measured: the step is reported skipped, with NaN norms, clip coefficient 0
        and no non-finite values (the model's own gradient was not at fault); its
        weights are measured as on any step (unchanged: update ratio 0).
        """
        state = self._state
        if state is None:
            return
        layout = state.layout
        nan = tf.constant(float("nan"), tf.float32)
        step = self._checkpointed.step.read_value()
        row = _Row(
            step=step,
            layout=layout,
            global_norm=nan,
            global_norm_clipped=tf.constant(0.0),
            clip_coef=tf.constant(0.0),
            skipped=tf.constant(True),
            layer_norms=tf.fill([layout.num_layers], nan),
            layer_nonfinite=tf.zeros([layout.num_layers], tf.int32),
        )
        self._record_row(row, self._variables)

    def _collect(self) -> None:
        """Host side: read the steps recorded since the last read and submit them."""
        self._unread_estimate = 0
        state = self._state
        if state is None or self._read_count is None:
            return
        count = int(state.recorded.numpy())
        pending = count - self._read_count
        if pending <= 0:
            return
        if pending > state.capacity:
            self._lost_steps += pending - state.capacity
            log.warning(
                "gradwatch: %d steps were overwritten before they were read; "
                "call on_step() after every step",
                pending - state.capacity,
            )
            pending = state.capacity
        rows = np.arange(count - pending, count) % state.capacity
        steps = state.step_buf.numpy()[rows].astype(np.int64)
        run = state.run_buf.numpy()[rows]
        norms = state.norm_buf.numpy()[rows]
        nonfinite = state.nonfinite_buf.numpy()[rows].astype(np.int64)
        weights = None if state.weight_buf is None else state.weight_buf.numpy()[rows]
        self._read_count = count
        # Steps only go backwards if a checkpoint was restored mid-run: send each
        # increasing stretch as its own batch (the server refuses steps it already has).
        breaks = np.flatnonzero(np.diff(steps) <= 0) + 1
        for part in np.split(np.arange(len(steps)), breaks):
            self._sender.submit(
                StepBatch(
                    layers=state.layout.names,
                    step=steps[part],
                    loss=run[part, _LOSS].astype(np.float32),
                    loss_known=run[part, _LOSS_KNOWN] > 0.5,
                    global_norm=run[part, _GLOBAL].astype(np.float32),
                    global_norm_clipped=run[part, _GLOBAL_CLIPPED].astype(np.float32),
                    clip_coef=run[part, _COEF].astype(np.float32),
                    skipped=run[part, _SKIPPED] > 0.5,
                    grad_norm=norms[part],
                    nonfinite=nonfinite[part],
                    **_weight_columns(weights, run[part, _WEIGHED] > 0.5, part),
                )
            )

    def _close_at_exit(self) -> None:
        """Interpreter exit: close with the default timeout and status."""
        self.close()

    def _print_local_summary(self) -> None:
        """Local mode: wait for the file writes, then print the run's totals (once per change)."""
        local = self._local
        if local is None:
            return
        self._sender.flush(self.config.close_timeout_seconds)
        summary = local.summary(self.config.run_id)
        if summary.steps != self._summarised_steps:
            self._summarised_steps = summary.steps
            print(summary.describe(self.config.run), flush=True)
