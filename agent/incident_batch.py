"""The batch of a captured step, copied in-graph into flat buffers (for :mod:`.incident`),
or under a rolling capture the batch of every step since its last copy of the state.

XLA cannot change a variable's shape, so each numeric input keeps a flat buffer the size of
the first traced batch plus its shape; a larger batch is not copied (the bundle then has no
batch and says so). A batch traced with a dynamic shape (``fit`` on data whose size is not a
multiple of ``batch_size``) gets a buffer whose size follows the copied batch in graph mode,
and none under XLA or in a rolling ring (said once, at the first trace).

Under ``tf.distribute`` with several replicas the buffers hold the
*global* batch: the replicas' shards are gathered in replica order (their order in the
global batch; across workers, an all-gather that every worker runs, since they all take
the same branch) in cross-replica context, only on the captured step.

Variables are made eagerly (``tf.init_scope``) at the first trace, mirrored under a
distribution strategy (every replica writes the first replica's value). Not thread-safe:
the training thread owns it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from . import _keras_compat as compat
from .bundle import nest_template, structure
from .clip.base import state_variable
from .notice import say

__all__ = ["BatchCopy", "many_replicas"]


def many_replicas() -> Any:
    """The replica context when there are several replicas in sync, else ``None``."""
    replica = tf.distribute.get_replica_context()
    if replica is not None and replica.num_replicas_in_sync > 1:
        return replica
    return None


class BatchCopy:
    """Flat buffers of batches: one slot, filled at the end of a captured step, or (a
    rolling capture, :mod:`.incident_rolling`) ``slots`` slots, one per step, slot
    ``step % slots``, filled at the end of every step while armed.

    Attributes:
        due: In-graph flag, set by the capture: the current step's batch is to be copied.
        copied: In-graph flag: the last captured step's batch fits its buffers and is in them.
        current: In-graph: the step now running (set by the capture before its update).
        buffers: One ``[slots, size]`` buffer per leaf of the batch (``None`` for a
            non-numeric leaf), or ``None`` before the first trace.
        shapes: Each leaf's ``[slots, rank]`` shapes; ``steps``: each slot's step (-1: none).
        structure: How the batch unpacks (``x,y``…); ``packed``: whether it was a tuple.
    """

    def __init__(self, slots: int = 1) -> None:
        self.slots = slots
        self.due: tf.Variable | None = None
        self.copied: tf.Variable | None = None
        self.current: tf.Variable | None = None
        self.buffers: list[tf.Variable | None] | None = None
        self.shapes: list[tf.Variable] = []
        self.steps: tf.Variable | None = None
        self.structure = ""
        self.packed = True
        self.nest: Any = None
        self._said_dynamic = False  # the user was told a dynamic shape keeps no batch

    def build(self) -> None:
        """Create the flags (eagerly; call under ``tf.init_scope``)."""
        self.due = state_variable(False, tf.bool, "incident_batch_due")
        self.copied = state_variable(False, tf.bool, "incident_batch_ok")
        self.current = state_variable(-1, tf.int64, "incident_batch_step")

    def mark_due(self) -> None:
        """In-graph, inside the capture's copy: copy the batch at the end of this step."""
        assert self.due is not None
        assert self.copied is not None
        self.due.assign(True)
        self.copied.assign(False)

    def note_step(self, step: Any) -> None:
        """In-graph, before the update: the step whose batch a copy at its end belongs to."""
        assert self.current is not None
        self.current.assign(tf.cast(step, tf.int64))

    def capture(self, data: Any, also: Any = None) -> None:
        """In-graph, at the end of a train step: copy ``data`` if the step was captured, or
        whenever ``also`` (an in-graph bool: a rolling capture's ``armed``) holds."""
        leaves = tf.nest.flatten(data)
        replica = many_replicas()
        if self.buffers is None:
            self._make_buffers(leaves, data, replica.num_replicas_in_sync if replica else 1)
        if len(leaves) != len(self.buffers or []):
            return  # another structure than the first traced batch's: not copied
        if replica is None:
            self._copy_if_due(lambda: leaves, also)
            return
        numeric = [i for i, buffer in enumerate(self.buffers or []) if buffer is not None]

        def across(distribution: Any, *shards: Any) -> None:
            def gather() -> list[Any]:
                whole: list[Any] = list(leaves)
                for i, per_replica in zip(numeric, shards, strict=True):
                    whole[i] = distribution.gather(per_replica, axis=0)
                return whole

            self._copy_if_due(gather, also)

        replica.merge_call(across, args=tuple(leaves[i] for i in numeric))

    def _copy_if_due(self, gather: Callable[[], list[Any]], also: Any) -> None:
        """``tf.cond`` on :attr:`due` (or ``also``): copy the leaves ``gather`` returns (called
        only there) into slot ``current % slots``."""
        buffers, due, steps = self.buffers, self.due, self.steps
        assert buffers is not None
        assert due is not None
        assert steps is not None
        current = self.current
        assert current is not None

        def copy_batch() -> tf.Tensor:
            assert due is not None
            due.assign(False)
            step = current.read_value()  # read only when copying: nothing more on other steps
            slot = tf.reshape(tf.cast(step % self.slots, tf.int32), [1])
            leaves = gather()
            # A buffer of unknown size (a dynamic shape, graph mode) takes any batch.
            pairs = [
                (leaf, b.shape[1])
                for leaf, b in zip(leaves, buffers, strict=True)
                if b is not None and b.shape[1] is not None
            ]
            known = [leaf.shape.num_elements() for leaf, _ in pairs]
            if any(n is not None and n > size for n, (_, size) in zip(known, pairs, strict=True)):
                self._put(steps, tf.constant(-1, tf.int64), slot)  # a larger batch (known now)
                return tf.constant(False)
            fits = tf.reduce_all(
                [tf.size(leaf, tf.int64) <= size for leaf, size in pairs] or [True]
            )

            def assign() -> tf.Tensor:
                assert self.copied is not None
                for index, (leaf, buffer) in enumerate(zip(leaves, buffers, strict=True)):
                    if buffer is None:
                        continue
                    flat = tf.reshape(tf.cast(leaf, buffer.dtype), [-1])
                    if buffer.shape[1] is not None:
                        flat = tf.pad(flat, [[0, buffer.shape[1] - tf.size(flat)]])
                    self._put(buffer, flat, slot)
                    self._put(self.shapes[index], tf.shape(leaf, out_type=tf.int64), slot)
                self._put(steps, step, slot)
                self.copied.assign(True)
                return tf.constant(True)

            def too_large() -> tf.Tensor:
                self._put(steps, tf.constant(-1, tf.int64), slot)
                return tf.constant(False)

            tf.cond(fits, assign, too_large)
            return tf.constant(True)

        when = due if also is None else tf.logical_or(due, also)
        tf.cond(when, copy_batch, lambda: tf.constant(False))

    def _put(self, variable: tf.Variable, value: Any, slot: Any) -> None:
        """In-graph: write ``value`` into ``variable``'s row ``slot`` (a ``[1]`` tensor)."""
        if self.slots == 1:  # a plain assign: mirrored variables take it in any context
            variable.assign(tf.expand_dims(value, 0))
        else:  # XLA updates one slot in place
            variable.scatter_update(tf.IndexedSlices(tf.expand_dims(value, 0), slot))

    def _make_buffers(self, leaves: list[Any], data: Any, replicas: int) -> None:
        """One ``[slots, size]`` buffer per numeric leaf, ``size`` being ``replicas`` times
        the first traced (per-replica) batch's (trace time)."""
        buffers: list[tf.Variable | None] = []
        slots = self.slots
        with tf.init_scope():
            for leaf in leaves:
                tensor_like = hasattr(leaf, "shape") and hasattr(leaf, "dtype")
                dtype = tf.as_dtype(leaf.dtype) if tensor_like else None
                numeric = dtype is not None and (
                    dtype.is_floating or dtype.is_integer or dtype.is_bool
                )
                size = leaf.shape.num_elements() if numeric else None
                # A dynamic shape (in fit: the data's size is not a multiple of batch_size):
                # a buffer that takes any size, where a variable may change its shape (one
                # slot, not XLA); elsewhere no buffer, and the user is told once.
                dynamic = numeric and size is None and leaf.shape.rank is not None
                resizable = dynamic and slots == 1 and not compat.in_xla_context()
                if dynamic and not resizable and not self._said_dynamic:
                    self._said_dynamic = True
                    say(
                        f"incident capture keeps no batch under XLA when an input's shape is "
                        f"not static as the step is traced ({leaf.shape}; in fit, the data's "
                        f"size is not a multiple of batch_size); a bundle's manifest gives the "
                        f"bad batch's position (epoch, step in epoch) in the data instead"
                    )
                rank = (leaf.shape.rank or 0) if size is not None or resizable else 0
                self.shapes.append(
                    state_variable(tf.zeros([slots, rank], tf.int64), tf.int64, "shape")
                )
                if size is None and not resizable:
                    buffers.append(None)
                    continue
                assert dtype is not None
                columns = None if size is None else size * replicas
                buffers.append(
                    state_variable(
                        tf.zeros([slots, columns or 0], dtype),
                        dtype,
                        "incident_batch",
                        shape=tf.TensorShape([slots, columns]),
                    )
                )
            self.steps = state_variable(
                tf.fill([slots], tf.constant(-1, tf.int64)), tf.int64, "steps"
            )
        self.buffers = buffers
        self.structure = structure(data)
        self.packed = isinstance(data, tuple | list)
        self.nest = nest_template(data)

    # -- host side -----------------------------------------------------------------------

    def written(self) -> bool:
        """Host: whether the last captured step's batch is in the buffers (one scalar read)."""
        assert self.copied is not None
        return bool(self.copied.numpy()) and any(b is not None for b in self.buffers or [])

    def slots_of(self, steps: Sequence[int]) -> list[int | None]:
        """Host: the slot holding each of ``steps``' batches, or ``None`` (one small read)."""
        held = [] if self.steps is None else [int(s) for s in self.steps.numpy()]
        return [held.index(step) if step in held else None for step in steps]

    def slot(self, slot: int) -> tuple[list[tf.Variable | None], list[tf.Variable]]:
        """Host: copies of one slot's flat leaves and shapes, as the bundle's checkpoint
        holds them (``batch/i``, ``batch_shape/i``; eager copies of one batch)."""
        leaves = [
            None if b is None else tf.Variable(b[slot], trainable=False) for b in self.buffers or []
        ]
        shapes = [tf.Variable(s[slot], trainable=False) for s in self.shapes]
        return leaves, shapes

    def describe(self) -> dict[str, Any]:
        """The manifest's ``batch``: its structure and each leaf's dtype (``null``: not kept)."""
        return {
            "structure": self.structure,
            "packed": self.packed,
            "nest": self.nest,
            "inputs": [None if b is None else {"dtype": b.dtype.name} for b in self.buffers or []],
        }
