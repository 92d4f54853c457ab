"""The :class:`StepBatch` value object and its wire form (schema 1).

The wire form is columnar JSON (DESIGN.md §5). Non-finite floats travel as the
strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (the protobuf JSON
convention), since JSON has no literal for them; unknown values are ``null``.
Floats are the float32 values computed in the graph, written exactly. The
format's constants and float codec live in :mod:`gradwatch.wire`. The same batch
also travels as the binary body of :mod:`gradwatch.wire.binary` (:meth:`StepBatch.to_binary`:
~0.1 ms for 50 steps × 500 layers where JSON takes ~25 ms with the GIL held).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from gradwatch.wire import SCHEMA_VERSION, binary, decode_floats, encode_floats

__all__ = [
    "SCHEMA_VERSION",
    "OutgoingBatch",
    "StepBatch",
    "announced_incidents",
    "as_wire",
    "decode_floats",
    "encode_floats",
    "with_report",
]

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class StepBatch:
    """Statistics of consecutive recorded steps of one run, ``n`` steps × ``L`` layers.

    Immutable and safe to share between threads.

    Attributes:
        layers: Layer names (``L``).
        step: ``[n]`` int64 step numbers, strictly increasing.
        loss: ``[n]`` float32 training loss (meaningful where ``loss_known``).
        loss_known: ``[n]`` bool, whether the loss of that step was observed.
        global_norm: ``[n]`` float32 global gradient L2 norm before the policy.
        global_norm_clipped: ``[n]`` float32 global norm of the applied update.
        clip_coef: ``[n]`` float32 ratio after/before (1 = untouched, 0 = skipped).
        skipped: ``[n]`` bool, the optimizer update was not applied.
        grad_norm: ``[n, L]`` float32 per-layer gradient L2 norm.
        nonfinite: ``[n, L]`` int64 count of NaN/±Inf gradient values per layer.
        batch_id: UUID making resends idempotent.
        weight_norm: ``[n, L]`` float32 per-layer L2 norm of the weights after
            the step's update, or ``None`` when weight statistics are off.
        update_ratio: ``[n, L]`` float32 per-layer ‖Δw‖/‖w‖ of the step's
            update (0 for a skipped step), or ``None`` with ``weight_norm``.
        weights_known: ``[n]`` bool, whether ``weight_norm`` and
            ``update_ratio`` were measured at that step (``None`` with them).
        learning_rate: ``[n]`` float32 learning rate each update applied (NaN
            where unknown), or ``None``. The flight recorder's: kept in incident
            bundles, not sent.
        loss_scale: ``[n]`` float32 dynamic loss scale of a ``LossScaleOptimizer``
            at each step (NaN without one), or ``None``; like ``learning_rate``.
        incidents: Announcements of incident bundles written since the previous batch
            (wire ``incidents``: step, cause, path, host, bytes, format, learning_rate,
            loss_scale), usually empty.
        dropped_batches: The agent's cumulative drop counts by reason, reported with
            this batch when it is sent (wire ``dropped_batches``), or ``None``.
    """

    layers: tuple[str, ...]
    step: IntArray
    loss: FloatArray
    loss_known: BoolArray
    global_norm: FloatArray
    global_norm_clipped: FloatArray
    clip_coef: FloatArray
    skipped: BoolArray
    grad_norm: FloatArray
    nonfinite: IntArray
    batch_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    weight_norm: FloatArray | None = None
    update_ratio: FloatArray | None = None
    weights_known: BoolArray | None = None
    learning_rate: FloatArray | None = None
    loss_scale: FloatArray | None = None
    incidents: tuple[Mapping[str, Any], ...] = ()
    dropped_batches: Mapping[str, int] | None = None

    def __post_init__(self) -> None:
        n, num_layers = len(self.step), len(self.layers)
        for name in (
            "loss",
            "loss_known",
            "global_norm",
            "global_norm_clipped",
            "clip_coef",
            "skipped",
        ):
            if np.shape(getattr(self, name)) != (n,):
                raise ValueError(
                    f"{name}: expected shape ({n},), got {np.shape(getattr(self, name))}"
                )
        for name in ("learning_rate", "loss_scale"):
            value = getattr(self, name)
            if value is not None and np.shape(value) != (n,):
                raise ValueError(f"{name}: expected shape ({n},), got {np.shape(value)}")
        weights = (self.weight_norm, self.update_ratio, self.weights_known)
        if any(w is None for w in weights) and any(w is not None for w in weights):
            raise ValueError("weight_norm, update_ratio, weights_known: give all three or none")
        if self.weights_known is not None and np.shape(self.weights_known) != (n,):
            raise ValueError(
                f"weights_known: expected shape ({n},), got {np.shape(self.weights_known)}"
            )
        for name in ("grad_norm", "nonfinite", "weight_norm", "update_ratio"):
            value = getattr(self, name)
            if value is not None and np.shape(value) != (n, num_layers):
                raise ValueError(
                    f"{name}: expected shape ({n}, {num_layers}), got {np.shape(value)}"
                )
        if n and np.any(np.diff(self.step) <= 0):
            raise ValueError("step: must be strictly increasing")

    def __len__(self) -> int:
        return len(self.step)

    @property
    def nbytes(self) -> int:
        """Bytes of the batch's arrays (its memory footprint, to a few hundred bytes)."""
        arrays = (getattr(self, f.name) for f in dataclasses.fields(self))
        return sum(int(a.nbytes) for a in arrays if isinstance(a, np.ndarray))

    def to_wire(self, dropped_batches: Mapping[str, int] | None = None) -> dict[str, Any]:
        """Return the JSON-ready wire dict (schema 1).

        Args:
            dropped_batches: Cumulative counts of batches the agent dropped, by
                reason, to report with this batch (default: the batch's own).
        """
        wire = self._fields(dropped_batches)
        columns, measured = self._columns()
        for name, values in columns.items():
            if values.dtype.kind == "f":
                wire[name] = encode_floats(values, measured.get(name))
            else:
                wire[name] = values.tolist()
        return wire

    def to_binary(self) -> bytes:
        """The batch as the binary body (:mod:`gradwatch.wire.binary`), with the same fields
        as :meth:`to_wire`. ~0.1 ms for 50 steps × 500 layers."""
        return binary.pack(self._fields(None), *self._columns())

    def _fields(self, dropped_batches: Mapping[str, int] | None) -> dict[str, Any]:
        """The batch's fields that are not numeric columns."""
        if dropped_batches is None:
            dropped_batches = self.dropped_batches
        fields: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "batch_id": self.batch_id,
            "layers": list(self.layers),
        }
        if dropped_batches:
            fields["dropped_batches"] = dict(dropped_batches)
        if self.incidents:
            fields["incidents"] = [dict(incident) for incident in self.incidents]
        return fields

    def _columns(self) -> tuple[dict[str, npt.NDArray[Any]], dict[str, BoolArray]]:
        """The numeric columns the batch sends, and the measured-mask of each optional one
        that was not measured at every step (an optional column measured at no step is left
        out)."""
        columns: dict[str, npt.NDArray[Any]] = {
            "step": self.step,
            "global_norm": self.global_norm,
            "global_norm_clipped": self.global_norm_clipped,
            "clip_coef": self.clip_coef,
            "skipped": self.skipped,
            "grad_norm": self.grad_norm,
            "nonfinite": self.nonfinite,
        }
        measured: dict[str, BoolArray] = {}
        if self.loss_known.any():
            columns["loss"] = self.loss
            if not self.loss_known.all():
                measured["loss"] = self.loss_known
        known = self.weights_known
        if known is not None and known.any():
            assert self.weight_norm is not None
            assert self.update_ratio is not None
            columns["weight_norm"] = self.weight_norm
            columns["update_ratio"] = self.update_ratio
            if not known.all():
                mask = np.broadcast_to(known[:, np.newaxis], self.weight_norm.shape)
                measured["weight_norm"] = measured["update_ratio"] = mask
        return columns, measured

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> StepBatch:
        """Rebuild a batch from its wire dict (for local files and uploads).

        Raises:
            ValueError: The dict is not a valid schema-1 batch.
        """
        if wire.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"schema: expected {SCHEMA_VERSION}, got {wire.get('schema')!r}")
        n = len(wire["step"])
        if "loss" in wire:
            loss, loss_known = decode_floats(wire["loss"])
        else:
            loss, loss_known = np.full(n, np.nan, np.float32), np.zeros(n, bool)
        num_layers = len(wire["layers"])
        weights: dict[str, Any] = {}
        if "weight_norm" in wire:
            weight_norm, known = decode_floats(wire["weight_norm"])
            weights = {
                "weight_norm": weight_norm.reshape(n, num_layers),
                "update_ratio": decode_floats(wire["update_ratio"])[0].reshape(n, num_layers),
                "weights_known": known.reshape(n, num_layers).any(axis=1),
            }
        return cls(
            batch_id=str(wire["batch_id"]),
            layers=tuple(wire["layers"]),
            step=np.asarray(wire["step"], dtype=np.int64),
            loss=loss,
            loss_known=loss_known,
            global_norm=decode_floats(wire["global_norm"])[0],
            global_norm_clipped=decode_floats(wire["global_norm_clipped"])[0],
            clip_coef=decode_floats(wire["clip_coef"])[0],
            skipped=np.asarray(wire["skipped"], dtype=bool),
            grad_norm=decode_floats(wire["grad_norm"])[0].reshape(n, num_layers),
            nonfinite=np.asarray(wire["nonfinite"], dtype=np.int64).reshape(n, num_layers),
            incidents=tuple(wire.get("incidents") or ()),
            **weights,
        )


OutgoingBatch = StepBatch | Mapping[str, Any]
"""What a transport delivers: a batch made in this process, or a wire dict read back from
the spool or a local file (sent as JSON, as it was written)."""


def as_wire(batch: OutgoingBatch) -> dict[str, Any]:
    """The JSON wire dict of an outgoing batch."""
    return batch.to_wire() if isinstance(batch, StepBatch) else dict(batch)


def announced_incidents(batch: OutgoingBatch) -> Sequence[Mapping[str, Any]]:
    """The incident bundles an outgoing batch announces (usually none), without encoding it."""
    if isinstance(batch, StepBatch):
        return batch.incidents
    return batch.get("incidents") or ()


def with_report(
    batch: OutgoingBatch,
    *,
    dropped_batches: Mapping[str, int] | None = None,
    without_incidents: bool = False,
) -> OutgoingBatch:
    """``batch`` with the agent's drop counts to report, or without its incident
    announcements (for a server too old to take them)."""
    if isinstance(batch, StepBatch):
        changes: dict[str, Any] = {}
        if dropped_batches is not None:
            changes["dropped_batches"] = dict(dropped_batches)
        if without_incidents:
            changes["incidents"] = ()
        return dataclasses.replace(batch, **changes)
    wire = dict(batch)
    if dropped_batches is not None:
        wire["dropped_batches"] = dict(dropped_batches)
    if without_incidents:
        wire.pop("incidents", None)
    return wire
