"""``chain``: apply policies in order, each to the previous one's output."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import tensorflow as tf

from ..config import ConfigError
from ..layers import LayerLayout
from ..stats import (
    compute_gradient_stats,
)
from .base import (
    DESCRIBE,
    ClipContext,
    ClipPolicy,
    ClipResult,
    DescribedPolicy,
    PolicyState,
    describe_policies,
)

# -- chain ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Chain(DescribedPolicy):
    policies: tuple[ClipPolicy, ...] = field(metadata={DESCRIBE: describe_policies})

    name: ClassVar[str] = "chain"

    def init(self, variables: Sequence[Any], layout: LayerLayout) -> PolicyState:
        state = PolicyState(name="chain")
        state.policies = [policy.init(variables, layout) for policy in self.policies]
        return state

    def apply(self, grads: list[Any], state: PolicyState, context: ClipContext) -> ClipResult:
        initial = context.stats.global_norm
        stats = context.stats
        skip: tf.Tensor | None = None
        seen_skip = context.skipped
        product = tf.constant(1.0)
        for policy, policy_state in zip(self.policies, state.policies, strict=True):
            result = policy.apply(
                grads,
                policy_state,
                ClipContext(stats, context.variables, context.layout, context.step, seen_skip),
            )
            grads = result.grads
            stats = (
                result.stats
                if result.stats is not None
                else compute_gradient_stats(grads, context.layout)
            )
            product = product * tf.cast(result.clip_coef, tf.float32)
            if result.skip is not None:
                skip = result.skip if skip is None else tf.logical_or(skip, result.skip)
                seen_skip = (
                    result.skip if seen_skip is None else tf.logical_or(seen_skip, result.skip)
                )
        # Final over initial norm; for a non-finite initial norm the ratio means nothing,
        # and the product of the policies' coefficients says whether anything was zeroed.
        ratio = tf.minimum(tf.math.divide_no_nan(stats.global_norm, initial), 1.0)
        coef = tf.where(
            tf.math.is_finite(initial),
            tf.where(initial > 0.0, ratio, tf.ones_like(ratio)),
            tf.minimum(product, 1.0),
        )
        if skip is not None:
            coef = tf.where(skip, 0.0, coef)
        return ClipResult(grads=grads, clip_coef=coef, skip=skip, stats=stats)


def chain(*policies: ClipPolicy) -> ClipPolicy:
    """Apply ``policies`` in order, each to the previous one's output.

    Each policy sees the gradients and statistics the previous one returned.
    ``skip`` is true when any policy skips (``None`` when none can), and after
    a policy skipped the step, the later ones leave their state unchanged. So
    put skip policies first: ``chain(skip_nonfinite(), zclip())`` keeps a NaN
    step out of ZClip's statistics, while a policy *before* a skip has already
    updated its state when the skip is decided. ``clip_coef`` is the final
    global norm over the initial one (1 for a zero gradient, 0 when zeroed or
    skipped). Nested chains are flattened.

    Args:
        *policies: The policies, each at most once (by ``name``).

    Raises:
        ConfigError: ``policies`` is empty, holds something that is not a
            policy, or holds one policy twice.
    """
    flat: list[ClipPolicy] = []
    for policy in policies:
        if isinstance(policy, _Chain):
            flat.extend(policy.policies)
        elif isinstance(policy, ClipPolicy) and not isinstance(policy, type):
            flat.append(policy)
        else:
            raise ConfigError(
                "policies: expected policies from gradwatch.agent.clip "
                f"(e.g. clip.global_norm(1.0)), got {policy!r}"
            )
    if not flat:
        raise ConfigError("policies: expected at least one policy")
    names = [p.name for p in flat]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(
            f"policies: each policy may appear once, got {', '.join(duplicates)} twice"
        )
    _warn_if_skip_after_scaling(flat)
    return _Chain(tuple(flat))


def _warn_if_skip_after_scaling(policies: Sequence[ClipPolicy]) -> None:
    """Warn (once per call site) when a skip policy follows one that rescales gradients.

    The earlier policy has already changed the gradients (a non-finite one becomes zeros
    under ``global_norm``) and updated its state when the skip is decided, so the skip may
    never fire and the earlier state learns from the step it should have ignored.
    """
    for later, policy in enumerate(policies):
        if not getattr(policy, "skips", False):
            continue
        scaling = [p.name for p in policies[:later] if not getattr(p, "skips", False)]
        if scaling:
            warnings.warn(
                f"gradwatch: chain() puts {policy.name} after {', '.join(scaling)}; a skip "
                "policy should come first (e.g. chain(skip_nonfinite(), global_norm(1.0))), "
                "or the policies before it see and rescale the step it would skip",
                UserWarning,
                stacklevel=3,
            )
            return
