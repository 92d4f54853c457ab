"""Gradient clipping policies, applied inside the compiled train step.

Modules: :mod:`.base` (the contract and shared helpers), :mod:`.norm`, :mod:`.adaptive`,
:mod:`.skip` and :mod:`.chain` (the factories).

A policy is a small immutable description (made by a factory such as
:func:`global_norm`) with two methods, the shape of optax's
``GradientTransformation``:

* ``init(variables, layout)`` creates the policy's state as ``tf.Variable``s
  (thresholds too, so changing one never forces a retrace) and returns it;
* ``apply(grads, state, context)`` returns a :class:`ClipResult` using only tf
  ops, so it runs under ``jit_compile=True`` and inside ``tf.function``.

======================  ===============================================================
factory                 rule (norms are L2, accumulated in float32, overflow-safe)
======================  ===============================================================
:func:`by_value`        each element into ``[-limit, limit]``; NaN/Inf elements → 0
:func:`by_norm`         each tensor's norm ≤ ``max_norm``
:func:`global_norm`     the global norm ≤ ``max_norm``
:func:`layer_norm`      each layer's norm (its variables in quadrature) ≤ its limit
:func:`agc`             each output unit: ‖G‖ ≤ clipping · max(‖W‖, eps)
:func:`autoclip`        global norm ≤ p-th percentile of the past finite global norms
:func:`zclip`           global norm clipped when its EMA z-score exceeds a threshold
:func:`skip_nonfinite`  skip the step when any gradient value is NaN/Inf
:func:`skip_spike`      skip the step when norm − mean > sigma · std of a window
:func:`chain`           apply policies in order
======================  ===============================================================

Rules every policy keeps:

* A gradient is never scaled up (every coefficient is ≤ 1).
* A non-finite gradient never reaches the weights through a clip: the scaling
  policies zero it (at their own granularity: element, tensor, unit, layer or
  all), the skip policies skip the step. TensorFlow's own
  ``tf.clip_by_global_norm`` returns all-NaN in that case, which destroys them.
* Adaptive policies (``autoclip``, ``zclip``, ``skip_spike``): a non-finite
  norm never enters their statistics; the threshold of a step is computed from
  the statistics *before* that step's norm (a spike never raises its own
  threshold); a zero spread (constant norms) neither divides by zero nor
  clips; warm-up is an explicit number of finite norms. Their state lives in
  ``tf.Variable``\\s made with :func:`state_variable`, so ``tf.train.Checkpoint``
  restores it and a resumed run continues its thresholds.
* ``clip_coef`` is the global norm after the policy divided by the norm
  before it: 1 when untouched (or when the incoming norm is 0), 0 when the
  step was skipped or the incoming gradient was non-finite.

Skipping a step outright (optimizer state frozen) needs a ``tf.cond`` around
the optimizer update, which under XLA costs a copy of every optimizer
variable (×1.2 per step, measured with ``bench/agent_overhead.py``). So only a policy
whose ``apply`` returns a ``skip`` tensor pays for it; the scaling policies
return ``skip=None`` and are branch-free.
"""

from __future__ import annotations

from .adaptive import agc, autoclip, zclip
from .base import ClipContext, ClipPolicy, ClipResult, PolicyState, state_variable
from .chain import chain
from .norm import by_norm, by_value, global_norm, layer_norm
from .skip import skip_nonfinite, skip_spike

__all__ = [
    "ClipContext",
    "ClipPolicy",
    "ClipResult",
    "PolicyState",
    "agc",
    "autoclip",
    "by_norm",
    "by_value",
    "chain",
    "global_norm",
    "layer_norm",
    "skip_nonfinite",
    "skip_spike",
    "state_variable",
    "zclip",
]
