"""Generate the gradwatch Grafana dashboard, ``dashboards/gradwatch.json``, with Grafana's SDK.

Usage::

    pip install -e ".[dev]"                     # brings grafana-foundation-sdk
    python dashboards/grafana/build.py          # rewrite dashboards/gradwatch.json
    python dashboards/grafana/build.py --check  # exit 1 if the committed JSON is stale

Edit this file, never the JSON: ``tests/dashboards`` checks that regenerating the JSON changes
nothing and that every PromQL expression in it names only metrics the server exports (or the
recording rules and ``ALERTS`` series of ``dashboards/prometheus/rules``).

Every query goes to the provisioned Prometheus datasource (uid ``gradwatch-prometheus``) and
filters on the ``run_id`` variable (``label_values(gradwatch_run_info, run_id)``); the layer
panel also on ``layer``. Run-level series are labelled with the run's name by joining
``gradwatch_run_info``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models import prometheus as prometheus_model

__all__ = ["DATASOURCE_UID", "OUTPUT", "build_dashboard", "main", "render"]

DATASOURCE_UID = "gradwatch-prometheus"
"""The uid of the provisioned datasource (provisioning/datasources/prometheus.yml)."""

OUTPUT = Path(__file__).resolve().parent / "dashboards" / "gradwatch.json"
"""Where the generated dashboard is written (and provisioned from)."""

_DATASOURCE = model.DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)
_RUN = 'run_id=~"$run_id"'
_NAMES = "max by (run_id, name) (gradwatch_run_info)"


def _named(expr: str) -> str:
    """Add the run's ``name`` label to a per-run ``expr`` (for legends)."""
    return f"{expr} * on (run_id) group_left (name) {_NAMES}"


def _query(expr: str, legend: str, ref_id: str = "A") -> prometheus.Dataquery:
    return (
        prometheus.Dataquery()
        .expr(expr)
        .legend_format(legend)
        .ref_id(ref_id)
        .datasource(_DATASOURCE)
        .range()
    )


def _instant(expr: str, legend: str, *, as_table: bool = False) -> prometheus.Dataquery:
    query = (
        prometheus.Dataquery()
        .expr(expr)
        .legend_format(legend)
        .ref_id("A")
        .datasource(_DATASOURCE)
        .instant()
    )
    if as_table:
        query = query.format(prometheus_model.PromQueryFormat.TABLE)
    return query


def _log_scale() -> common_builders.ScaleDistributionConfig:
    return common_builders.ScaleDistributionConfig().type(common.ScaleDistribution.LOG).log(10)


def _legend() -> common_builders.VizLegendOptions:
    return (
        common_builders.VizLegendOptions()
        .display_mode(common.LegendDisplayMode.TABLE)
        .placement(common.LegendPlacement.BOTTOM)
        .show_legend(True)
        .calcs(["lastNotNull", "max"])
    )


def _tooltip() -> common_builders.VizTooltipOptions:
    return (
        common_builders.VizTooltipOptions()
        .mode(common.TooltipDisplayMode.MULTI)
        .sort(common.SortOrder.DESCENDING)
    )


def _thresholds(*steps: tuple[float | None, str]) -> dashboard.ThresholdsConfig:
    return (
        dashboard.ThresholdsConfig()
        .mode(model.ThresholdsMode.ABSOLUTE)
        .steps([model.Threshold(value=value, color=color) for value, color in steps])
    )


def _series(title: str, description: str, width: int = 12) -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(_DATASOURCE)
        .height(8)
        .span(width)
        .legend(_legend())
        .tooltip(_tooltip())
        .line_width(1)
        .fill_opacity(0)
        .show_points(common.VisibilityMode.NEVER)
        .span_nulls(False)
    )


def _stat(title: str, description: str, expr: str, legend: str) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(_DATASOURCE)
        .height(5)
        .span(4)
        .with_target(_instant(expr, legend))
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
        .graph_mode(common.BigValueGraphMode.NONE)
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .text_mode(common.BigValueTextMode.VALUE_AND_NAME)
    )


def _variables() -> list[Builder[model.VariableModel]]:
    run_id = (
        dashboard.QueryVariable("run_id")
        .label("Run")
        .description("gradwatch run ids (gradwatch_run_info); legends show the run's name.")
        .datasource(_DATASOURCE)
        .query("label_values(gradwatch_run_info, run_id)")
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )
    layer = (
        dashboard.QueryVariable("layer")
        .label("Layer")
        .description("Layers exported for the selected runs (the top K by gradient norm).")
        .datasource(_DATASOURCE)
        .query(f"label_values(gradwatch_layer_grad_norm{{{_RUN}}}, layer)")
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )
    return [run_id, layer]


def _overview_panels() -> list[Builder[model.Panel]]:
    step = _stat(
        "Step",
        "Highest training step stored.",
        _named(f"max by (run_id) (gradwatch_run_step{{{_RUN}}})"),
        "{{name}}",
    ).thresholds(_thresholds((None, "blue")))
    ingest_age = (
        _stat(
            "Last ingest age",
            "Seconds since the run's last batch reached the server. Alert GradwatchRunSilent "
            "fires after 10 minutes (plus 5) for a run still marked running.",
            _named(
                f"time() - max by (run_id) (gradwatch_run_last_ingest_timestamp_seconds{{{_RUN}}})"
            ),
            "{{name}}",
        )
        .unit("s")
        .thresholds(_thresholds((None, "green"), (300, "orange"), (600, "red")))
    )
    nonfinite = (
        _stat(
            "Non-finite values (time range)",
            "NaN/Inf gradient values seen in the dashboard's time range.",
            _named(
                f"sum by (run_id) "
                f"(increase(gradwatch_nonfinite_grad_values_total{{{_RUN}}}[$__range]))"
            ),
            "{{name}}",
        )
        .decimals(0)
        .thresholds(_thresholds((None, "green"), (1, "red")))
    )
    truncated = (
        _stat(
            "Layer series",
            "Whether the server exports only the top-K layers of the run (its other layers "
            "are in the REST API: GET /api/v1/runs/{run_id}/layers).",
            _named(f"max by (run_id) (gradwatch_layer_series_truncated{{{_RUN}}})"),
            "{{name}}",
        )
        .mappings(
            [
                model.ValueMap(
                    options={
                        "0": model.ValueMappingResult(text="all layers", index=0),
                        "1": model.ValueMappingResult(text="top K only", index=1),
                    }
                )
            ]
        )
        .thresholds(_thresholds((None, "green"), (1, "orange")))
    )
    alerts = (
        table.Panel()
        .title("Firing alerts")
        .description(
            "Alerts firing now for the selected runs (Prometheus ALERTS series). Runbooks: the "
            "README's Runbook section."
        )
        .datasource(_DATASOURCE)
        .height(5)
        .span(8)
        .with_target(
            _instant(
                "max by (alertname, severity, name, project, run_id) "
                f'(ALERTS{{alertstate="firing", {_RUN}}})',
                "",
                as_table=True,
            )
        )
        .show_header(True)
        .cell_height(common.TableCellHeight.SM)
        .with_transformation(
            model.DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": {"Time": True, "Value": True},
                    "indexByName": {
                        "alertname": 0,
                        "severity": 1,
                        "name": 2,
                        "project": 3,
                        "run_id": 4,
                    },
                    "renameByName": {},
                },
            )
        )
        .no_value("No alert is firing")
    )
    return [step, ingest_age, nonfinite, truncated, alerts]


def _gradient_panels() -> list[Builder[model.Panel]]:
    norms = (
        _series(
            "Global gradient norm",
            "Global L2 norm of the gradient at the last stored step, before and after "
            "clipping, and the max over the server's recent-steps window (so a one-step spike "
            "between scrapes still shows). Log scale; NaN does not plot, +Inf shows at the top.",
            width=24,
        )
        .with_target(
            _query(
                _named(f"max by (run_id) (gradwatch_global_grad_norm{{{_RUN}}})"),
                "{{name}} before clipping",
                "A",
            )
        )
        .with_target(
            _query(
                _named(f"max by (run_id) (gradwatch_global_grad_norm_clipped{{{_RUN}}})"),
                "{{name}} after clipping",
                "B",
            )
        )
        .with_target(
            _query(
                _named(f"max by (run_id) (gradwatch_global_grad_norm_window_max{{{_RUN}}})"),
                "{{name}} window max",
                "C",
            )
        )
        .scale_distribution(_log_scale())
    )
    clip_rate = (
        _series(
            "Clip rate",
            "Fraction of steps whose gradient the clip policy scaled down. Alert "
            "GradwatchHighClipRate fires above 50% over 15 minutes.",
        )
        .with_target(
            _query(
                _named(
                    f"sum by (run_id) "
                    f"(increase(gradwatch_clipped_steps_total{{{_RUN}}}[$__rate_interval])) "
                    f"/ sum by (run_id) "
                    f"(increase(gradwatch_steps_total{{{_RUN}}}[$__rate_interval]))"
                ),
                "{{name}}",
            )
        )
        .unit("percentunit")
        .min(0)
        .max(1)
    )
    layers = (
        _series(
            "Layer gradient norms (top K)",
            "Last gradient L2 norm of each exported layer (the server exports the top K "
            "layers of each run). Log scale.",
        )
        .with_target(
            _query(
                f'max by (run_id, layer) (gradwatch_layer_grad_norm{{{_RUN}, layer=~"$layer"}})',
                "{{layer}}",
            )
        )
        .scale_distribution(_log_scale())
    )
    nonfinite = (
        _series(
            "Non-finite gradient values and skipped steps",
            "NaN/Inf gradient values, and steps whose update a policy skipped, per interval.",
        )
        .with_target(
            _query(
                _named(
                    f"sum by (run_id) (increase("
                    f"gradwatch_nonfinite_grad_values_total{{{_RUN}}}[$__rate_interval]))"
                ),
                "{{name}} non-finite values",
                "A",
            )
        )
        .with_target(
            _query(
                _named(
                    f"sum by (run_id) "
                    f"(increase(gradwatch_skipped_steps_total{{{_RUN}}}[$__rate_interval]))"
                ),
                "{{name}} skipped steps",
                "B",
            )
        )
        .draw_style(common.GraphDrawStyle.BARS)
        .fill_opacity(80)
        .decimals(0)
    )
    events = (
        _series(
            "Detector events",
            "Events of the server's detectors (explosion, nonfinite, vanishing, clip_rate, loss) "
            "since the run started, by rule and severity.",
        )
        .with_target(
            _query(
                _named(
                    f"sum by (run_id, rule, severity) (gradwatch_detector_events_total{{{_RUN}}})"
                ),
                "{{name}} {{rule}} ({{severity}})",
            )
        )
        .line_interpolation(common.LineInterpolation.STEP_AFTER)
        .decimals(0)
    )
    loss = _series("Loss", "Loss at the last stored step that reported one.").with_target(
        _query(_named(f"max by (run_id) (gradwatch_loss{{{_RUN}}})"), "{{name}}")
    )
    ingest_age = (
        _series(
            "Last ingest age",
            "Seconds since the run's last batch reached the server; it grows while a run is "
            "silent (alert GradwatchRunSilent: over 10 minutes for 5 minutes, running runs).",
        )
        .with_target(
            _query(
                _named(
                    f"time() - max by (run_id) "
                    f"(gradwatch_run_last_ingest_timestamp_seconds{{{_RUN}}})"
                ),
                "{{name}}",
            )
        )
        .unit("s")
        .min(0)
    )
    return [norms, clip_rate, layers, nonfinite, events, loss, ingest_age]


def _server_panels() -> list[Builder[model.Panel]]:
    samples = (
        _series("Ingested samples", "Samples stored by the gradwatch server, per second.", 6)
        .with_target(
            _query("sum(rate(gradwatch_ingest_samples_total[$__rate_interval]))", "samples/s")
        )
        .unit("short")
    )
    rejected = (
        _series("Rejected batches", "Ingest requests the server refused, by reason.", 6)
        .with_target(
            _query(
                "sum by (reason) (increase(gradwatch_ingest_rejected_total[$__rate_interval])) > 0",
                "{{reason}}",
            )
        )
        .draw_style(common.GraphDrawStyle.BARS)
        .fill_opacity(80)
        .decimals(0)
    )
    latency = (
        _series("Ingest latency", "Time to handle one batch request (p50 and p99).", 6)
        .with_target(
            _query(
                "histogram_quantile(0.5, sum by (le) "
                "(rate(gradwatch_ingest_request_duration_seconds_bucket[$__rate_interval])))",
                "p50",
                "A",
            )
        )
        .with_target(
            _query(
                "histogram_quantile(0.99, sum by (le) "
                "(rate(gradwatch_ingest_request_duration_seconds_bucket[$__rate_interval])))",
                "p99",
                "B",
            )
        )
        .unit("s")
    )
    dropped = (
        _series(
            "Agent dropped batches",
            "Batches the training process could not deliver (queue full, spool full, ...), "
            "by reason, as reported by the agent.",
            6,
        )
        .with_target(
            _query(
                _named(
                    f"sum by (run_id, reason) (increase("
                    f"gradwatch_agent_dropped_batches_total{{{_RUN}}}[$__rate_interval]))"
                ),
                "{{name}} {{reason}}",
            )
        )
        .draw_style(common.GraphDrawStyle.BARS)
        .fill_opacity(80)
        .decimals(0)
    )
    return [samples, rejected, latency, dropped]


def build_dashboard() -> model.Dashboard:
    """Build the dashboard model (pure; no I/O)."""
    builder = (
        dashboard.Dashboard("gradwatch")
        .uid("gradwatch")
        .description("Gradient health of TensorFlow/Keras training runs monitored by gradwatch.")
        .tags(["gradwatch"])
        .timezone("browser")
        .time("now-6h", "now")
        .refresh("30s")
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .variables(_variables())
        .annotation(
            dashboard.AnnotationQuery()
            .name("Firing alerts")
            .datasource(_DATASOURCE)
            .enable(True)
            .icon_color("red")
            .expr(f'ALERTS{{alertstate="firing", {_RUN}}}')
        )
    )
    rows = (
        ("Runs", _overview_panels()),
        ("Gradients", _gradient_panels()),
        ("Server", _server_panels()),
    )
    panel_id = 0
    for title, panels in rows:
        panel_id += 1
        builder = builder.with_row(dashboard.Row(title).id(panel_id))
        for panel in panels:
            panel_id += 1
            panel.build().id_val = panel_id  # stable ids: Grafana would number them on load
            builder = builder.with_panel(panel)
    return builder.build()


def render() -> str:
    """The dashboard as the JSON text written to :data:`OUTPUT` (stable key order)."""
    return json.dumps(build_dashboard(), cls=JSONEncoder, sort_keys=True, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write :data:`OUTPUT`, or with ``--check`` report whether it is up to date."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the JSON differs from a regeneration"
    )
    parser.add_argument("--output", type=Path, default=OUTPUT, help="file to write or check")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
