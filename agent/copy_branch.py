"""A ``tf.cond`` that copies variables when due, kept a branch under XLA.

XLA's conditional simplifier turns a two-branch conditional whose branches hold only
instructions it deems cheap (parameters, tuples, elementwise operations: which is all a copy
of one variable into another is) into a ``select`` over both branches. A copy of the state
that is due once in ``K`` steps (or on a bad step only) would then read and write every
copied variable on *every* step, taken or not, and each copied variable would be one more
kernel for XLA to compile (measured on a two-layer model under ``jit_compile``: 124 kernels
against 23 without the monitor; the copies' selects were 15 of them).

A scatter into a small counter is not a cheap instruction to that pass, so a branch that
also counts the copies it made stays a branch: the copy runs only when due. The count
(``taken``) is the number of copies this branch has made.

Variables are made eagerly (:meth:`CopyBranch.build`). Not thread-safe: the training
thread owns it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from .clip.base import state_variable

__all__ = ["CopyBranch"]


class CopyBranch:
    """``copy()`` in a ``tf.cond`` on a predicate, counted so XLA keeps the branch.

    Args:
        name: The counter variable's name.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._count: tf.Variable | None = None

    def build(self) -> None:
        """Create the counter (eagerly or under ``tf.init_scope``; once)."""
        if self._count is None:
            # Two elements so the scatter updates part of it: a scatter over the whole of a
            # variable could be simplified into a plain (cheap) write.
            self._count = state_variable(tf.zeros([2], tf.int64), tf.int64, self._name)

    @property
    def taken(self) -> int:
        """Host: copies made so far (blocks on a scalar device read)."""
        assert self._count is not None
        return int(self._count.numpy()[0])

    def __call__(self, due: Any, copy: Callable[[], None]) -> None:
        """In-graph: run ``copy`` (variable assignments) when ``due`` (scalar bool)."""
        count = self._count
        assert count is not None, "CopyBranch.build was not called"

        def take() -> tf.Tensor:
            copy()
            count.assign(tf.tensor_scatter_nd_add(count.read_value(), [[0]], [1]))
            return tf.constant(True)

        tf.cond(due, take, lambda: tf.constant(False))
