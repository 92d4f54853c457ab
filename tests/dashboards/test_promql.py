"""The metric-name extractor the dashboard and rule tests rely on."""

from __future__ import annotations

import pytest

from tests.dashboards.promql import metric_names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("gradwatch_loss", {"gradwatch_loss"}),
        ('gradwatch_loss{run_id=~"$run_id", name="a{b}"}', {"gradwatch_loss"}),
        (
            "max by (run_id) (max_over_time(gradwatch_global_grad_norm_window_max[5m]))"
            " > 10 * max by (run_id) "
            "(quantile_over_time(0.5, gradwatch_global_grad_norm[30m] offset 5m))",
            {"gradwatch_global_grad_norm_window_max", "gradwatch_global_grad_norm"},
        ),
        (
            "sum(rate(x_total[$__rate_interval])) by (le) / on (run_id) group_left (name) y",
            {"x_total", "y"},
        ),
        ("a unless a offset 10m or increase(b[1h:1m])", {"a", "b"}),
        ("time() - last_seen > 1e-6 and bool c < Inf", {"last_seen", "c"}),
        ("run_id_rule:events:increase10m > 0", {"run_id_rule:events:increase10m"}),
        (
            'label_values(gradwatch_layer_grad_norm{run_id=~"$run_id"}, layer)',
            {"gradwatch_layer_grad_norm"},
        ),
        ('ALERTS{alertstate="firing"}', {"ALERTS"}),
        ("histogram_quantile(0.99, sum by (le) (rate(h_bucket[5m])))", {"h_bucket"}),
    ],
)
def test_metric_names_finds_selected_metrics_only(expr, names):
    assert metric_names(expr) == names
