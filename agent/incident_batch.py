"""The batch of a captured step, copied in-graph into flat buffers (for :mod:`.incident`).

XLA cannot change a variable's shape, so each numeric input keeps a flat buffer the size of
the first traced batch plus its shape; a larger batch is not copied (the bundle then has no
batch and says so). Under ``tf.distribute`` with several replicas the buffers hold the
*global* batch: the replicas' shards are gathered in replica order (their order in the
global batch; across workers, an all-gather that every worker runs, since they all take
the same branch) in cross-replica context, only on the captured step.

Variables are made eagerly (``tf.init_scope``) at the first trace, mirrored under a
distribution strategy (every replica writes the first replica's value). Not thread-safe:
the training thread owns it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from .bundle import structure
from .clip.base import state_variable

__all__ = ["BatchCopy", "many_replicas"]


def many_replicas() -> Any:
    """The replica context when there are several replicas in sync, else ``None``."""
    replica = tf.distribute.get_replica_context()
    if replica is not None and replica.num_replicas_in_sync > 1:
        return replica
    return None


class BatchCopy:
    """Flat buffers of one batch, filled at the end of a captured step.

    Attributes:
        due: In-graph flag, set by the capture: the current step's batch is to be copied.
        copied: In-graph flag: the last captured step's batch fits its buffers and is in them.
        buffers: One buffer per leaf of the batch (``None`` for a non-numeric leaf), or
            ``None`` before the first trace.
        shapes: Each leaf's shape at the captured step.
        structure: How the batch unpacks (``x,y``…); ``packed``: whether it was a tuple.
    """

    def __init__(self) -> None:
        self.due: tf.Variable | None = None
        self.copied: tf.Variable | None = None
        self.buffers: list[tf.Variable | None] | None = None
        self.shapes: list[tf.Variable] = []
        self.structure = ""
        self.packed = True

    def build(self) -> None:
        """Create the flags (eagerly; call under ``tf.init_scope``)."""
        self.due = state_variable(False, tf.bool, "incident_batch_due")
        self.copied = state_variable(False, tf.bool, "incident_batch_ok")

    def mark_due(self) -> None:
        """In-graph, inside the capture's copy: copy the batch at the end of this step."""
        assert self.due is not None
        assert self.copied is not None
        self.due.assign(True)
        self.copied.assign(False)

    def capture(self, data: Any) -> None:
        """In-graph, at the end of a train step: copy ``data`` if the step was captured."""
        leaves = tf.nest.flatten(data)
        replica = many_replicas()
        if self.buffers is None:
            self._make_buffers(leaves, data, replica.num_replicas_in_sync if replica else 1)
        if len(leaves) != len(self.buffers or []):
            return  # another structure than the first traced batch's: not copied
        if replica is None:
            self._copy_if_due(lambda: leaves)
            return
        numeric = [i for i, buffer in enumerate(self.buffers or []) if buffer is not None]

        def across(distribution: Any, *shards: Any) -> None:
            def gather() -> list[Any]:
                whole: list[Any] = list(leaves)
                for i, per_replica in zip(numeric, shards, strict=True):
                    whole[i] = distribution.gather(per_replica, axis=0)
                return whole

            self._copy_if_due(gather)

        replica.merge_call(across, args=tuple(leaves[i] for i in numeric))

    def _copy_if_due(self, gather: Callable[[], list[Any]]) -> None:
        """``tf.cond`` on :attr:`due`: copy the leaves ``gather`` returns (called only there)."""
        buffers, due = self.buffers, self.due
        assert buffers is not None
        assert due is not None

        def copy() -> tf.Tensor:
            assert due is not None
            due.assign(False)
            leaves = gather()
            fits = tf.constant(True)
            for leaf, buffer in zip(leaves, buffers, strict=True):
                if buffer is None:
                    continue
                size = leaf.shape.num_elements()
                if size is not None and size > buffer.shape[0]:
                    return tf.constant(False)  # a larger batch than the buffer (known now)
                fits = tf.logical_and(fits, tf.size(leaf, tf.int64) <= buffer.shape[0])

            def assign() -> tf.Tensor:
                assert self.copied is not None
                for index, (leaf, buffer) in enumerate(zip(leaves, buffers, strict=True)):
                    if buffer is None:
                        continue
                    flat = tf.reshape(tf.cast(leaf, buffer.dtype), [-1])
                    pad = buffer.shape[0] - tf.size(flat)
                    buffer.assign(tf.pad(flat, [[0, pad]]))
                    self.shapes[index].assign(tf.shape(leaf, out_type=tf.int64))
                self.copied.assign(True)
                return tf.constant(True)

            tf.cond(fits, assign, lambda: tf.constant(False))
            return tf.constant(True)

        tf.cond(due, copy, lambda: tf.constant(False))

    def _make_buffers(self, leaves: list[Any], data: Any, replicas: int) -> None:
        """One flat buffer per numeric leaf, ``replicas`` times the first traced (per-replica)
        batch's size (trace time)."""
        buffers: list[tf.Variable | None] = []
        with tf.init_scope():
            for leaf in leaves:
                tensor_like = hasattr(leaf, "shape") and hasattr(leaf, "dtype")
                dtype = tf.as_dtype(leaf.dtype) if tensor_like else None
                size = leaf.shape.num_elements() if tensor_like else None
                if dtype is None or not (dtype.is_floating or dtype.is_integer or dtype.is_bool):
                    size = None
                if size is None:
                    buffers.append(None)
                    self.shapes.append(state_variable(tf.zeros([0], tf.int64), tf.int64, "shape"))
                    continue
                assert dtype is not None
                buffers.append(
                    state_variable(tf.zeros([size * replicas], dtype), dtype, "incident_batch")
                )
                self.shapes.append(
                    state_variable(tf.zeros([leaf.shape.rank or 0], tf.int64), tf.int64, "shape")
                )
        self.buffers = buffers
        self.structure = structure(data)
        self.packed = isinstance(data, tuple | list)

    def written(self) -> bool:
        """Host: whether the last captured step's batch is in the buffers (one scalar read)."""
        assert self.copied is not None
        return bool(self.copied.numpy()) and any(b is not None for b in self.buffers or [])

    def describe(self) -> dict[str, Any]:
        """The manifest's ``batch``: its structure and each leaf's dtype (``null``: not kept)."""
        return {
            "structure": self.structure,
            "packed": self.packed,
            "inputs": [None if b is None else {"dtype": b.dtype.name} for b in self.buffers or []],
        }
