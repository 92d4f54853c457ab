"""The wire schema and the metric registry agree."""

from __future__ import annotations

from gradwatch.server.schemas import StepBatch
from gradwatch.server.store.metric import METRICS, Scope


def test_schemas_step_batch_carries_every_registered_metric():
    fields = StepBatch.model_fields
    for spec in METRICS.values():
        field = fields[spec.metric.value]
        assert field.is_required() == spec.required, spec.metric
        nested = str(field.annotation).count("list[")
        assert nested == (2 if spec.scope is Scope.LAYER else 1), (spec.metric, field.annotation)
