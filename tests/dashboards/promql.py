"""The metric names that gradwatch exports, and the names the rules and the dashboard use.

:func:`metric_names` pulls the metric names out of a PromQL expression (no PromQL parser is
installed; a small tokenizer is enough for the expressions this repository writes, and its
own tests pin what it understands). Paths of the files under ``dashboards/`` live here too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DASHBOARD",
    "DASHBOARDS",
    "EXPORTED_METRICS",
    "PROMETHEUS_SERIES",
    "ROOT",
    "RULES",
    "RULE_TESTS",
    "dashboard_expressions",
    "load_rules",
    "metric_names",
    "recording_rule_names",
    "rule_expressions",
]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "dashboards"
RULES = DASHBOARDS / "prometheus" / "rules" / "gradwatch.rules.yml"
RULE_TESTS = DASHBOARDS / "prometheus" / "tests" / "gradwatch.test.yml"
DASHBOARD = DASHBOARDS / "grafana" / "dashboards" / "gradwatch.json"

EXPORTED_METRICS = frozenset(
    {
        "gradwatch_run_info",
        "gradwatch_run_step",
        "gradwatch_run_last_ingest_timestamp_seconds",
        "gradwatch_steps_total",
        "gradwatch_global_grad_norm",
        "gradwatch_global_grad_norm_clipped",
        "gradwatch_global_grad_norm_window_max",
        "gradwatch_loss",
        "gradwatch_clipped_steps_total",
        "gradwatch_skipped_steps_total",
        "gradwatch_nonfinite_grad_values_total",
        "gradwatch_detector_events_total",
        "gradwatch_layer_grad_norm",
        "gradwatch_layer_series_truncated",
        "gradwatch_agent_dropped_batches_total",
        "gradwatch_ingest_samples_total",
        "gradwatch_ingest_rejected_total",
        "gradwatch_ingest_request_duration_seconds_bucket",
        "gradwatch_ingest_request_duration_seconds_sum",
        "gradwatch_ingest_request_duration_seconds_count",
    }
)
"""Series names of the exporter (issue 7, DESIGN.md §6), as they appear in a scrape."""

PROMETHEUS_SERIES = frozenset({"ALERTS", "ALERTS_FOR_STATE"})
"""Series that Prometheus itself writes for alerting rules."""

_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"offset", "bool", "inf", "nan", "atan2"}
)
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_OFFSET = re.compile(r"\boffset\s+-?\w+", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w:.])(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)")
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.*),\s*(?P<label>\w+)\s*\)\s*$", re.S)


def metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL ``expr`` (Grafana ``$variables`` allowed).

    Function and aggregation names, keywords, label names and values, numbers and durations
    are not metric names. Grafana's ``label_values(selector, label)`` gives the selector's.
    Pure; raises nothing.
    """
    label_values = _LABEL_VALUES.match(expr)
    if label_values:
        expr = label_values.group("selector")
    text = _STRING.sub('""', expr)
    text = _GRAFANA_VARIABLE.sub(" ", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        word = match.group(0)
        if word.lower() in _KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue
        names.add(word)
    return names


def load_rules() -> list[dict[str, Any]]:
    """Every rule (recording and alerting) of ``gradwatch.rules.yml``, in file order."""
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def recording_rule_names() -> set[str]:
    """Names of the series the recording rules write."""
    return {rule["record"] for rule in load_rules() if "record" in rule}


def rule_expressions() -> Iterator[tuple[str, str]]:
    """``(rule name, expr)`` for every rule."""
    for rule in load_rules():
        yield rule.get("alert") or rule["record"], rule["expr"]


def dashboard_expressions(dashboard: dict[str, Any] | None = None) -> Iterator[tuple[str, str]]:
    """``(where, expr)`` for every PromQL expression of the dashboard JSON.

    Panel targets (rows included), template variable queries and annotation queries.
    """
    if dashboard is None:
        dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = list(dashboard.get("panels", []))
    for panel in list(panels):
        panels.extend(panel.get("panels", []))
    for panel in panels:
        for target in panel.get("targets", []):
            yield f"panel {panel.get('title')!r} {target.get('refId')}", target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if query:
            yield f"variable {variable['name']!r}", query
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            yield f"annotation {annotation['name']!r}", annotation["expr"]
