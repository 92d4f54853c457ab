"""What one more pass over every gradient costs a step: per-layer max|g| against the sum of
squares gradwatch already computes, on the agent benchmark's 100 variables (6.1M float32).

Why the flight recorder keeps no per-layer max|g| every step: it is a second read of every
gradient. Prints the best of ``--repeats`` timings of ``--calls`` calls, in ms per step, in
graph mode and under XLA.

    python -m bench.gradient_passes [--calls 50] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf

from gradwatch.agent.stats import sum_of_squares


def _gradients() -> list[tf.Variable]:
    """The shapes of bench.agent_overhead's MLP: 50 Dense(350) layers' kernels and biases."""
    tf.random.set_seed(0)
    shapes = [(350, 350)] * 49 + [(350, 1)]
    kernels = [tf.Variable(tf.random.normal(shape)) for shape in shapes]
    biases = [tf.Variable(tf.random.normal((shape[1],))) for shape in shapes]
    return kernels + biases


def _best_ms(function: Callable[[], Any], calls: int, repeats: int) -> float:
    function()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            function()
        timings.append((time.perf_counter() - start) / calls * 1e3)
    return min(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    grads = _gradients()
    print(f"{len(grads)} variables, {sum(int(tf.size(g)) for g in grads):,} float32 values")
    print(f"{'mode':<6} {'sum of squares ms':>18} {'max|g| ms':>10}")
    for jit in (False, True):

        def squares() -> tf.Tensor:
            return tf.stack([sum_of_squares(g) for g in grads])

        def max_abs() -> tf.Tensor:
            return tf.stack([tf.reduce_max(tf.abs(g)) for g in grads])

        timed = [
            _best_ms(tf.function(f, jit_compile=jit), args.calls, args.repeats)
            for f in (squares, max_abs)
        ]
        print(f"{'XLA' if jit else 'graph':<6} {timed[0]:>18.2f} {timed[1]:>10.2f}")


if __name__ == "__main__":
    main()
