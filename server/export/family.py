"""The run families of ``/metrics``: their names and help, and one run's samples in them.

A run's samples (:func:`run_samples`, from what the store returned for it) give both forms the
server needs: ``prometheus_client`` families (:func:`build_families`, for
:meth:`~prometheus_client.registry.Collector.collect`) and the run's exposition lines
(:class:`RunLines`, for ``/metrics``, where ``prometheus_client``'s encoder spent ~5 µs a
sample).
The lines are the same bytes as ``prometheus_client`` writes for the same samples, in the
Prometheus text format 0.0.4 and in OpenMetrics alike (the two differ only in the ``# HELP``
and ``# TYPE`` lines, which :func:`family_headers` takes from ``prometheus_client`` itself),
for metric and label names that need no escaping (all of gradwatch's).

Everything here is pure and thread-safe; nothing blocks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Literal

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.utils import floatToGoString

from ..detect import Rule, Severity
from ..schemas import decode_float
from ..store.scrape import RunScrape

__all__ = [
    "FAMILIES",
    "FamilySpec",
    "RunLines",
    "Sample",
    "build_families",
    "family_headers",
    "run_samples",
]

Sample = tuple[tuple[str, ...], float]
"""Label values (in the family's label order) and the value."""


@dataclass(frozen=True, slots=True)
class FamilySpec:
    """One run family: its name (without ``_total``), type, help text and label names."""

    name: str
    kind: Literal["gauge", "counter"]
    documentation: str
    labels: tuple[str, ...]

    @property
    def sample_name(self) -> str:
        """The name on each sample line (``_total`` appended for a counter)."""
        return f"{self.name}_total" if self.kind == "counter" else self.name

    def empty(self) -> Metric:
        """A ``prometheus_client`` family with this name, help and labels and no sample."""
        kind = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        return kind(self.name, self.documentation, labels=list(self.labels))


_RUN = ("run_id",)

FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec(
        "gradwatch_run_info",
        "gauge",
        "Run metadata; always 1.",
        (*_RUN, "project", "name", "status"),
    ),
    FamilySpec("gradwatch_run_step", "gauge", "Highest training step stored.", _RUN),
    FamilySpec(
        "gradwatch_run_last_ingest_timestamp_seconds",
        "gauge",
        "Unix time of the last stored batch, in seconds.",
        _RUN,
    ),
    FamilySpec("gradwatch_steps", "counter", "Training steps stored.", _RUN),
    FamilySpec(
        "gradwatch_global_grad_norm",
        "gauge",
        "Global gradient L2 norm (before clipping) at the last stored step.",
        _RUN,
    ),
    FamilySpec(
        "gradwatch_global_grad_norm_clipped",
        "gauge",
        "Global gradient L2 norm after clipping at the last stored step.",
        _RUN,
    ),
    FamilySpec(
        "gradwatch_global_grad_norm_window_max",
        "gauge",
        "Largest global gradient norm (before clipping) ingested in the current and "
        "previous window of norm_window_seconds; NaN ignored, +Inf kept.",
        _RUN,
    ),
    FamilySpec("gradwatch_loss", "gauge", "Loss at the last stored step that reported one.", _RUN),
    FamilySpec("gradwatch_clipped_steps", "counter", "Steps whose gradient was clipped.", _RUN),
    FamilySpec("gradwatch_skipped_steps", "counter", "Steps whose update was skipped.", _RUN),
    FamilySpec(
        "gradwatch_nonfinite_grad_values",
        "counter",
        "Non-finite gradient values seen, over all layers.",
        _RUN,
    ),
    FamilySpec(
        "gradwatch_detector_events",
        "counter",
        "Detections (a rule firing on one step of one series), by rule and severity.",
        (*_RUN, "rule", "severity"),
    ),
    FamilySpec(
        "gradwatch_layer_grad_norm",
        "gauge",
        "Gradient L2 norm of a layer at its last stored step; only the top-K layers of "
        "each run by that norm (NaN first).",
        (*_RUN, "layer"),
    ),
    FamilySpec(
        "gradwatch_layer_series_truncated",
        "gauge",
        "1 when the run has more layers than gradwatch_layer_grad_norm exports, else 0.",
        _RUN,
    ),
    FamilySpec(
        "gradwatch_agent_dropped_batches",
        "counter",
        "Batches the agent dropped before sending, by reason (as last reported).",
        (*_RUN, "reason"),
    ),
)
"""The run families, in exposition order."""

(
    _INFO,
    _STEP,
    _LAST_INGEST,
    _STEPS,
    _GLOBAL_NORM,
    _CLIPPED_NORM,
    _WINDOW_MAX,
    _LOSS,
    _CLIPPED,
    _SKIPPED,
    _NONFINITE,
    _DETECTIONS,
    _LAYER_NORM,
    _TRUNCATED,
    _DROPPED,
) = range(len(FAMILIES))


@dataclass(frozen=True, slots=True)
class RunLines:
    """One run's exposition lines in every family (index as :data:`FAMILIES`).

    Kept between scrapes, so it holds strings (which the garbage collector does not track)
    and one dict, not the samples: ~30,000 tracked tuples a scrape of 200 changed runs made
    every tenth scrape pay a full collection (77–203 ms, measured).

    Attributes:
        lines: Per family, the run's samples as exposition lines (``name{labels} value\\n``
            each; empty when the run has none there).
        prefixes: Each line up to its value (``name{labels} ``), keyed by the sample name
            and label values joined by NUL (which no label value holds): what :meth:`of`
            reuses when the run is formatted again.
    """

    lines: tuple[str, ...]
    prefixes: dict[str, str]

    @classmethod
    def of(
        cls,
        run: RunScrape,
        detections: Mapping[tuple[str, str], int],
        drops: Sequence[tuple[str, int]],
        top_k: int,
        previous: RunLines | None = None,
    ) -> RunLines:
        """Format a run's samples (~40 µs for a run and its 10 layers, less when ``previous``
        holds the same labels).

        Args:
            run: The run's row as the store returned it.
            detections: Detection counts by (rule, severity); missing ones are 0.
            drops: (reason, count) of the agent's drop counts, in exposition order.
            top_k: Most layers exported in ``gradwatch_layer_grad_norm``.
            previous: The same run's lines from an earlier scrape, whose prefixes (escaped,
                sorted labels) are reused where the labels are the same.
        """
        known = {} if previous is None else previous.prefixes
        prefixes: dict[str, str] = {}
        lines = []
        for index, family in enumerate(run_samples(run, detections, drops, top_k)):
            name = _LINE_NAMES[index]
            parts = []
            for labels, value in family:
                key = "\0".join((name, *labels))
                prefix = known.get(key)
                if prefix is None:
                    prefix = _LINE_TEMPLATES[index].format(*map(_escape, labels))
                prefixes[key] = prefix
                parts.append(f"{prefix}{_go_float(value)}\n")
            lines.append("".join(parts))
        return cls(tuple(lines), prefixes)


def build_families(runs: Iterable[tuple[tuple[Sample, ...], ...]]) -> list[Metric]:
    """``prometheus_client`` families holding the samples of ``runs`` (each run's as
    :func:`run_samples` returns them), in order."""
    families = [spec.empty() for spec in FAMILIES]
    for run in runs:
        for family, samples in zip(families, run, strict=True):
            for labels, value in samples:
                family.add_metric(list(labels), value)  # type: ignore[attr-defined]
    return families


@cache
def family_headers(openmetrics_format: bool) -> tuple[str, ...]:
    """The ``# HELP`` / ``# TYPE`` lines of each family, as ``prometheus_client`` writes them.

    Args:
        openmetrics_format: OpenMetrics 1.0 (counters named without ``_total``, help escaped
            as a label value) instead of the Prometheus text format 0.0.4.
    """
    headers = []
    for spec in FAMILIES:
        registry = _OneFamily(spec.empty())
        if openmetrics_format:
            encoded = generate_openmetrics(registry)  # type: ignore[no-untyped-call]
            text = encoded.decode().removesuffix("# EOF\n")
        else:
            text = generate_latest(registry).decode()
        headers.append(text)
    return tuple(headers)


class _OneFamily:
    """The smallest ``registry`` ``prometheus_client``'s encoders accept: one family."""

    def __init__(self, family: Metric) -> None:
        self._family = family

    def collect(self) -> Iterator[Metric]:
        yield self._family


_RULE_SEVERITIES = tuple((rule.value, severity.value) for rule in Rule for severity in Severity)


def run_samples(
    run: RunScrape,
    detections: Mapping[tuple[str, str], int],
    drops: Sequence[tuple[str, int]],
    top_k: int,
) -> tuple[tuple[Sample, ...], ...]:
    """One run's samples in every family (index as :data:`FAMILIES`); arguments as
    :meth:`RunLines.of`'s."""
    out: list[list[Sample]] = [[] for _ in FAMILIES]
    labels = (run.run_id,)
    out[_INFO].append(((run.run_id, run.project, run.name, run.status), 1))
    if run.last_step is not None:
        out[_STEP].append((labels, run.last_step))
    if run.last_ingest_at is not None:
        out[_LAST_INGEST].append((labels, run.last_ingest_at.timestamp()))
    out[_STEPS].append((labels, run.num_steps))
    if run.global_norm_last_step is not None:
        out[_GLOBAL_NORM].append((labels, _value(run.global_norm_last)))
    if run.clipped_norm_last_step is not None:
        out[_CLIPPED_NORM].append((labels, _value(run.clipped_norm_last)))
    window_max = _window_max(run.norm_window_max, run.norm_window_previous_max)
    if window_max is not None:
        out[_WINDOW_MAX].append((labels, window_max))
    if run.loss_last_step is not None:
        out[_LOSS].append((labels, _value(run.loss_last)))
    out[_CLIPPED].append((labels, run.clipped_steps))
    out[_SKIPPED].append((labels, run.skipped_steps))
    out[_NONFINITE].append((labels, run.nonfinite_values))
    for rule_severity in _RULE_SEVERITIES:
        # Every (rule, severity) from 0, so the first detection is an increase.
        count = detections.get(rule_severity, 0)
        out[_DETECTIONS].append(((run.run_id, *rule_severity), count))
    if run.top_layers is not None:
        top_layers = json.loads(run.top_layers)
        top = top_layers["top"][:top_k]
        for layer, value in top:
            out[_LAYER_NORM].append(((run.run_id, layer), decode_float(value)))
        out[_TRUNCATED].append((labels, int(top_layers["layers"] > len(top))))
    for reason, count in drops:
        out[_DROPPED].append(((run.run_id, reason), count))
    return tuple(tuple(family) for family in out)


def _go_float(value: float) -> str:
    """``value`` as ``prometheus_client``'s ``floatToGoString`` writes it, faster for the
    common cases: below 1e6 (where Go's format starts to differ from Python's ``repr``), a
    finite float is its ``repr`` and an integer its ``repr`` as a float."""
    if value.__class__ is int:
        if 0 <= value < 1_000_000:
            return f"{value}.0"
    elif value.__class__ is float and -math.inf < value < 1_000_000.0:  # not NaN nor ±Inf
        return repr(value)
    return floatToGoString(value)  # type: ignore[no-untyped-call,no-any-return]


def _template(spec: FamilySpec) -> str:
    """The ``str.format`` template of a sample line's prefix (``name{a="{i}",b="{j}"} ``):
    labels sorted by name, each filled from its position in the spec's labels."""
    pairs = sorted((label, i) for i, label in enumerate(spec.labels))
    labels = ",".join(f'{label}="{{{i}}}"' for label, i in pairs)
    return f"{spec.sample_name}{{{{{labels}}}}} "


_LINE_TEMPLATES = tuple(_template(spec) for spec in FAMILIES)
_LINE_NAMES = tuple(spec.sample_name for spec in FAMILIES)


def _escape(text: str) -> str:
    if "\\" in text or "\n" in text or '"' in text:
        return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return text


def _value(stored: float | None) -> float:
    """A stored float; NULL stands for NaN."""
    return math.nan if stored is None else stored


def _window_max(*maxima: float | None) -> float | None:
    present = [value for value in maxima if value is not None]
    return max(present) if present else None
