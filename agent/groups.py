"""Optimizer groups: several wrapped optimizers, one run, one row per ``train_step``.

A GAN's ``train_step`` applies a discriminator and a generator optimizer; each is wrapped
as a named *group* (``monitor.wrap(d_optimizer, group="discriminator")``) with a recorder
and a ring of its own, whose layers are named ``discriminator/...``. Every row a group
writes carries the run's step (one per ``train_step`` call, advanced at its end), and
:func:`merge_group_batches` joins what the groups recorded into the run's batches:

* a group that applied more than once in one step (a WGAN critic, say) is recorded as
  the largest of its norms, the sum of its non-finite counts, its smallest clip
  coefficient, skipped if any apply was skipped, and the weights of its last apply;
* per step, the run's global norm (before and after clipping) is the quadrature sum over
  the groups that applied, its clip coefficient their ratio, and it is skipped if any
  group skipped;
* a step where only some groups applied carries only their layers (consecutive steps
  with the same groups make one batch).

Pure NumPy on the host; no TensorFlow. Thread-safety: plain functions and a
training-thread-only :class:`GroupMerger`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .config import ConfigError
from .records import StepBatch

__all__ = ["GroupMerger", "check_group_name", "merge_group_batches"]

_GROUP_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

_Rows = dict[str, Any]
"""One group's rows as arrays, keyed like the :class:`StepBatch` fields."""


def check_group_name(group: object) -> str:
    """Validate a group name: 1-64 letters, digits, ``_``, ``.`` or ``-`` (it prefixes layers).

    Raises:
        ConfigError: It is not such a string.
    """
    if not isinstance(group, str) or not _GROUP_RE.match(group):
        raise ConfigError(
            f"group: expected 1-64 letters, digits, '_', '.' or '-' (e.g. 'generator'), "
            f"got {group!r}"
        )
    return group


def _rows_of(batches: Sequence[StepBatch]) -> _Rows:
    """One group's batches as one set of rows, steps sorted, repeats collapsed (module doc)."""
    cat = np.concatenate
    step = cat([b.step for b in batches])
    order = np.argsort(step, kind="stable")
    step = step[order]
    firsts = np.flatnonzero(np.r_[True, np.diff(step) > 0])
    lasts = np.r_[firsts[1:], len(step)] - 1

    def field(name: str) -> npt.NDArray[Any]:
        return cat([getattr(b, name) for b in batches])[order]

    loss, known = field("loss"), field("loss_known")
    loss_sum = np.add.reduceat(np.where(known, loss, 0.0).astype(np.float64), firsts)
    loss_count = np.add.reduceat(known.astype(np.int64), firsts)
    rows: _Rows = {
        "step": step[firsts],
        "loss": (loss_sum / np.maximum(loss_count, 1)).astype(np.float32),
        "loss_known": loss_count > 0,
        "global_norm": np.maximum.reduceat(field("global_norm"), firsts),
        "global_norm_clipped": np.maximum.reduceat(field("global_norm_clipped"), firsts),
        "clip_coef": np.minimum.reduceat(field("clip_coef"), firsts),
        "skipped": np.logical_or.reduceat(field("skipped"), firsts),
        "grad_norm": np.maximum.reduceat(field("grad_norm"), firsts, axis=0),
        "nonfinite": np.add.reduceat(field("nonfinite"), firsts, axis=0),
        "weights": None,
    }
    if all(b.weights_known is not None for b in batches):
        rows["weights"] = (
            field("weight_norm")[lasts],
            field("update_ratio")[lasts],
            field("weights_known")[lasts],
        )
    return rows


def _quadrature(norms: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Per row, the L2 norm of the groups' norms (float64, so no overflow before the cast)."""
    with np.errstate(over="ignore"):
        total = np.sqrt(np.sum(np.square(norms.astype(np.float64)), axis=1))
    return np.asarray(total, dtype=np.float32)


def merge_group_batches(
    groups: Sequence[tuple[tuple[str, ...], Sequence[StepBatch]]],
) -> list[StepBatch]:
    """Join the batches several groups recorded over the same steps into the run's batches.

    Args:
        groups: Per group, in group order: its layer names and the batches read from its
            ring (possibly none, possibly with a step repeated across batches).

    Returns:
        Batches in step order, each over the groups present at its steps (module doc).
    """
    present = [(layers, _rows_of(batches)) for layers, batches in groups if batches]
    if not present:
        return []
    steps = np.unique(np.concatenate([rows["step"] for _, rows in present]))
    where = np.full((len(steps), len(present)), -1, np.int64)
    for g, (_, rows) in enumerate(present):
        where[np.searchsorted(steps, rows["step"]), g] = np.arange(len(rows["step"]))
    mask = where >= 0
    cuts = np.flatnonzero(np.any(mask[1:] != mask[:-1], axis=1)) + 1
    return [
        _merge_segment(present, steps[part], where[part])
        for part in np.split(np.arange(len(steps)), cuts)
    ]


def _merge_segment(
    present: list[tuple[tuple[str, ...], _Rows]],
    steps: npt.NDArray[np.int64],
    where: npt.NDArray[np.int64],
) -> StepBatch:
    """Steps where the same groups applied: their layers side by side, run fields combined."""
    used = [g for g in range(len(present)) if where[0, g] >= 0]
    picks = [(present[g], where[:, g]) for g in used]

    def stack(name: str) -> npt.NDArray[Any]:
        return np.stack([rows[name][index] for (_, rows), index in picks], axis=1)

    def side_by_side(name: str) -> npt.NDArray[Any]:
        return np.concatenate([rows[name][index] for (_, rows), index in picks], axis=1)

    norm, clipped, coefs = stack("global_norm"), stack("global_norm_clipped"), stack("clip_coef")
    loss_known = stack("loss_known")
    first_known = np.argmax(loss_known, axis=1)
    total, total_clipped = _quadrature(norm), _quadrature(clipped)
    usable = np.isfinite(total) & (total > 0)
    ratio = np.minimum(np.divide(total_clipped, np.where(usable, total, 1.0)), 1.0)
    weights: dict[str, Any] = {}
    if all(rows["weights"] is not None for (_, rows), _ in picks):
        parts = [(rows["weights"], index) for (_, rows), index in picks]
        weights = {
            "weight_norm": np.concatenate([w[0][i] for w, i in parts], axis=1),
            "update_ratio": np.concatenate([w[1][i] for w, i in parts], axis=1),
            "weights_known": np.all(np.stack([w[2][i] for w, i in parts], axis=1), axis=1),
        }
    return StepBatch(
        layers=tuple(name for (layers, _), _ in picks for name in layers),
        step=steps,
        loss=stack("loss")[np.arange(len(steps)), first_known],
        loss_known=np.asarray(loss_known.any(axis=1), dtype=bool),
        global_norm=total,
        global_norm_clipped=total_clipped,
        clip_coef=np.where(usable, ratio, coefs.min(axis=1)).astype(np.float32),
        skipped=np.asarray(stack("skipped").any(axis=1), dtype=bool),
        grad_norm=side_by_side("grad_norm"),
        nonfinite=side_by_side("nonfinite"),
        **weights,
    )


class GroupMerger:
    """Collects what each group's recorder read, and submits the merged batches on flush.

    Training-thread object. The monitor flushes only after every group was read in the
    same host call, so no step is split between two flushes.

    Args:
        submit: Where merged batches go (the sender's non-blocking ``submit``).
    """

    def __init__(self, submit: Callable[[StepBatch], object]) -> None:
        self._submit = submit
        self._pending: dict[int, list[StepBatch]] = {}
        self._incidents: list[Mapping[str, Any]] = []  # announced, not yet sent

    @property
    def pending(self) -> bool:
        """Whether some group's rows wait for a flush."""
        return bool(self._pending)

    def collector(self, index: int) -> Callable[[StepBatch], None]:
        """The ``submit`` to give group ``index``'s recorder."""

        def add(batch: StepBatch) -> None:
            self._pending.setdefault(index, []).append(batch)

        return add

    def flush(self, layers: Sequence[tuple[str, ...]]) -> None:
        """Merge and submit what every group handed over since the last flush.

        Args:
            layers: Each group's layer names, by group index.
        """
        pending, self._pending = self._pending, {}
        groups = [(names, pending.get(i, [])) for i, names in enumerate(layers)]
        self._incidents.extend(
            n for batches in pending.values() for b in batches for n in b.incidents
        )
        merged = merge_group_batches(groups)
        if merged and self._incidents:  # announcements ride on the last merged batch
            merged[-1] = dataclasses.replace(merged[-1], incidents=tuple(self._incidents))
            self._incidents.clear()
        for batch in merged:
            self._submit(batch)
