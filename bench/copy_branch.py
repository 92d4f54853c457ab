"""What a copy of the state that is *not* due costs a step under XLA, as a plain ``tf.cond``
and as :class:`~gradwatch.agent.copy_branch.CopyBranch`.

The rolling incident capture copies the weights and optimizer state after the update once in
``incident_snapshot_every`` steps. XLA compiles a ``tf.cond`` whose branches only copy into
``select``\\ s that copy on every step; a ``CopyBranch`` stays a branch. The state here is
Adam's for the agent benchmark's MLP (weights and two moments: 3 × 6.1M float32); each call
runs an elementwise "update" of the weights and the copy, not due. Configs alternate within
each repeat; the median of ``--repeats`` timings of ``--calls`` calls, ms per call:

* ``no copy``: the update alone;
* ``tf.cond``: the update and a plain ``tf.cond`` copy;
* ``CopyBranch``: the update and the kept branch.

    python -m bench.copy_branch [--calls 40] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf

from gradwatch.agent.copy_branch import CopyBranch

VALUES = 6_100_000  # bench.agent_overhead's MLP: 50 Dense(350) layers


def _configs(size: int) -> dict[str, Callable[[Any], None]]:
    sources = [tf.Variable(tf.random.normal([size])) for _ in range(3)]
    copies = [tf.Variable(tf.zeros([size])) for _ in range(3)]
    branch = CopyBranch("bench_copies")
    branch.build()

    def update() -> None:
        sources[0].assign(sources[0] * 0.999 + 1e-3)

    def copy() -> None:
        for target, source in zip(copies, sources, strict=True):
            target.assign(source)

    def no_copy(due: Any) -> None:
        update()

    def copied() -> tf.Tensor:
        copy()
        return tf.constant(True)

    def plain(due: Any) -> None:
        update()
        tf.cond(due, copied, lambda: tf.constant(False))

    def kept(due: Any) -> None:
        update()
        branch(due, copy)

    return {
        name: tf.function(fn, jit_compile=True)
        for name, fn in (("no copy", no_copy), ("tf.cond", plain), ("CopyBranch", kept))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    configs = _configs(VALUES)
    due = tf.constant(False)
    for fn in configs.values():
        fn(due)  # compile
    timings: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, fn in configs.items():
            start = time.perf_counter()
            for _ in range(args.calls):
                fn(due)  # eager calls return when the function has run
            timings[name].append((time.perf_counter() - start) / args.calls * 1000)
    print(f"XLA, state 3 × {VALUES:,} float32, copy not due; ms per call (median, best)")
    for name, values in timings.items():
        print(f"{name:<11} {statistics.median(values):8.2f} {min(values):8.2f}")


if __name__ == "__main__":
    main()
