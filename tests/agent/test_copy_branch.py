"""``CopyBranch``: a copy of variables made only on the steps it is due, in graph mode and
under XLA, where a plain ``tf.cond`` that only copies is compiled into a ``select`` that
copies on every step (XLA's conditional simplifier; measured with TensorFlow 2.21 by
``python -m bench.copy_branch``, 18.3M float32 values not due: 6.2 ms a call, against
1.5 ms kept a branch and 1.2 ms with no copy at all).

The control case pins the XLA behaviour the class exists for: if a TensorFlow upgrade stops
converting such branches, it fails and the counter can go.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from gradwatch.agent.copy_branch import CopyBranch


def _variables(n: int = 3, size: int = 64) -> tuple[list[tf.Variable], list[tf.Variable]]:
    sources = [tf.Variable(tf.fill([size], float(i + 1))) for i in range(n)]
    copies = [tf.Variable(tf.zeros([size])) for _ in range(n)]
    return sources, copies


def _copy(sources: list[tf.Variable], copies: list[tf.Variable]) -> None:
    for copy, source in zip(copies, sources, strict=True):
        copy.assign(source)


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_it_copies_on_due_steps_only_and_counts_them(jit_compile):
    sources, copies = _variables()
    branch = CopyBranch("copies")
    branch.build()

    @tf.function(jit_compile=jit_compile)
    def step(due):
        for source in sources:
            source.assign_add(tf.ones_like(source))  # the "update" every step
        branch(due, lambda: _copy(sources, copies))

    seen = []
    for due in (False, True, False, False, True, False):
        step(tf.constant(due))
        seen.append(float(copies[0][0].numpy()))

    # Source 0 holds 1 + steps run; the copy keeps the value of the last due step.
    assert seen == [0.0, 3.0, 3.0, 3.0, 6.0, 6.0]
    np.testing.assert_array_equal(copies[2].numpy(), np.full(64, 3.0 + 5.0))
    assert branch.taken == 2


def _conditionals(fn, *args) -> int:
    hlo = fn.experimental_get_compiler_ir(*args)(stage="optimized_hlo")
    return hlo.count(" conditional(")


def test_under_xla_a_plain_copy_cond_runs_every_step_and_a_copy_branch_stays_a_branch():
    sources, copies = _variables(size=4096)
    branch = CopyBranch("copies")
    branch.build()

    @tf.function(jit_compile=True)
    def plain(due):
        tf.cond(due, lambda: (_copy(sources, copies), tf.constant(True))[1], lambda: False)

    @tf.function(jit_compile=True)
    def kept(due):
        branch(due, lambda: _copy(sources, copies))

    due = tf.constant(False)
    # XLA turned the plain branch into selects over both branches: the copy runs always.
    assert _conditionals(plain, due) == 0
    assert _conditionals(kept, due) == 1


def test_calling_it_before_build_says_so():
    branch = CopyBranch("copies")
    with pytest.raises(AssertionError, match="build"):
        branch(tf.constant(True), lambda: None)
