"""Batch ingest: round trip, idempotency, conflicts and every kind of bad input."""

from __future__ import annotations

import gzip
import json
import math
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gradwatch.server.app import create_app
from gradwatch.server.config import Settings
from gradwatch.server.errors import BatchConflictError
from gradwatch.server.ingest.batch import IngestOptions, ingest_batches
from gradwatch.server.query import run as runs
from gradwatch.server.schemas import RunCreate, StepBatch
from gradwatch.server.store.db import Database, create_db_engine
from tests.server.wire import create_run, decode_float, get_series, make_batch, post_batch


def _snapshot(client: TestClient, run_id: str) -> Any:
    run = client.get(f"/api/v1/runs/{run_id}").json()
    layers = client.get(f"/api/v1/runs/{run_id}/layers").json()
    series = [
        get_series(client, run_id, "grad_norm", layer=layer["name"]) for layer in layers["layers"]
    ]
    return run, layers, series, get_series(client, run_id, "global_norm")


def _same_floats(left: list[Any], right: list[Any]) -> bool:
    decoded = [(decode_float(a), decode_float(b)) for a, b in zip(left, right, strict=True)]
    return all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in decoded)


def test_post_batch_round_trips_every_metric(client):
    run_id = create_run(client)
    body = {
        "schema": 1,
        "batch_id": str(uuid.uuid4()),
        "layers": ["dense", "dense_1"],
        "step": [100, 101],
        "loss": [0.25, None],
        "global_norm": [1.5, 1e9],
        "global_norm_clipped": [1.0, 1.0],
        "clip_coef": [0.5, "NaN"],
        "skipped": [False, True],
        "grad_norm": [[0.375, 1.125], [0.5, "Infinity"]],
        "nonfinite": [[0, 0], [0, 3]],
        "weight_norm": [[2.0, 3.0], [None, None]],
        "update_ratio": [[0.001953125, "-Infinity"], [None, None]],
        "dropped_batches": {"queue_full": 0},
    }

    response = post_batch(client, run_id, body)

    assert response.status_code == 200, response.text
    assert response.json() == {
        "run_id": run_id,
        "batch_id": body["batch_id"],
        "steps": 2,
        "stored_samples": 1 + 4 * 2 + 2 * 2 + 2 * 2 + 2 + 2,
        "duplicate_samples": 0,
        "duplicate": False,
    }
    run_level = {
        "loss": ([100], [0.25]),
        "global_norm": ([100, 101], [1.5, 1e9]),
        "global_norm_clipped": ([100, 101], [1.0, 1.0]),
        "clip_coef": ([100, 101], [0.5, "NaN"]),
        "skipped": ([100, 101], [0, 1]),
    }
    for metric, (steps, values) in run_level.items():
        series = get_series(client, run_id, metric)
        assert series["step"] == steps, metric
        assert _same_floats(series["value"], values), (metric, series["value"])
    per_layer = {
        ("grad_norm", "dense"): ([100, 101], [0.375, 0.5]),
        ("grad_norm", "dense_1"): ([100, 101], [1.125, "Infinity"]),
        ("nonfinite", "dense_1"): ([100, 101], [0, 3]),
        ("weight_norm", "dense"): ([100], [2.0]),
        ("update_ratio", "dense_1"): ([100], ["-Infinity"]),
    }
    for (metric, layer), (steps, values) in per_layer.items():
        series = get_series(client, run_id, metric, layer=layer)
        assert series["step"] == steps, (metric, layer)
        assert series["value"] == values, (metric, layer)
    assert get_series(client, run_id, "nonfinite", layer="dense_1")["value"] == [0, 3]


def test_post_batch_accepts_identity_encoding(client):
    run_id = create_run(client)
    response = post_batch(client, run_id, make_batch([0, 1]), compress=False)
    assert response.status_code == 200
    assert get_series(client, run_id, "global_norm")["step"] == [0, 1]


def test_post_batch_stores_float32_rounding_of_values(client):
    run_id = create_run(client)
    post_batch(client, run_id, make_batch([0], global_norm=[0.1]))
    value = get_series(client, run_id, "global_norm")["value"][0]
    assert value == pytest.approx(0.1, rel=1e-7)
    assert value == float(__import__("numpy").float32(0.1))


def test_post_batch_resend_by_batch_id_stores_nothing(client):
    run_id = create_run(client)
    body = make_batch([0, 1, 2])
    first = post_batch(client, run_id, body).json()
    before = _snapshot(client, run_id)

    again = post_batch(client, run_id, body)

    assert again.status_code == 200
    assert again.json() == {
        **first,
        "stored_samples": 0,
        "duplicate_samples": first["stored_samples"],
        "duplicate": True,
    }
    assert _snapshot(client, run_id) == before


def test_post_batch_resend_under_new_id_stores_nothing(client):
    run_id = create_run(client)
    post_batch(client, run_id, make_batch([0, 1, 2, 3]))
    post_batch(client, run_id, make_batch([4, 5]))
    before = _snapshot(client, run_id)

    exact = post_batch(client, run_id, make_batch([0, 1, 2, 3]))
    spanning = post_batch(client, run_id, make_batch([2, 3, 4]))

    for response in (exact, spanning):
        assert response.status_code == 200, response.text
        assert response.json()["duplicate"] is True
        assert response.json()["stored_samples"] == 0
    assert spanning.json()["duplicate_samples"] == 3 * (5 + 2 * 2)
    assert _snapshot(client, run_id) == before


def test_post_batch_of_a_resumed_run_stores_only_the_steps_after_the_stored_ones(client):
    """A run restored from a checkpoint older than its last sent step resends some steps."""
    run_id = create_run(client)
    post_batch(client, run_id, make_batch([10, 11, 12], global_norm=[1.0, 2.0, 3.0]))
    resumed = make_batch([11, 12, 13, 14], global_norm=[9.0, 9.0, 4.0, 5.0])

    first = post_batch(client, run_id, resumed)
    again = post_batch(client, run_id, resumed)
    under_new_id = post_batch(client, run_id, make_batch([12, 13, 14]))

    assert first.status_code == 200, first.text
    per_step = 5 + 2 * 2  # run-level fields, plus grad_norm and nonfinite of 2 layers
    assert first.json()["steps"] == 4
    assert first.json()["duplicate"] is False
    assert first.json()["stored_samples"] == 2 * per_step
    assert first.json()["duplicate_samples"] == 2 * per_step
    for response in (again, under_new_id):
        assert response.status_code == 200, response.text
        assert response.json()["duplicate"] is True
    series = get_series(client, run_id, "global_norm")
    assert series["step"] == [10, 11, 12, 13, 14]
    assert series["value"] == [1.0, 2.0, 3.0, 4.0, 5.0]  # first write wins


def test_post_batch_partial_overlap_is_409_and_stores_nothing(client):
    run_id = create_run(client)
    post_batch(client, run_id, make_batch([10, 11, 12]))
    before = _snapshot(client, run_id)

    missing_before = post_batch(client, run_id, make_batch([9, 12, 13]))
    interleaved = post_batch(client, run_id, make_batch([9, 11, 14]))

    for response in (missing_before, interleaved):
        assert response.status_code == 409, response.text
        assert response.json()["code"] == "batch_conflict"
        assert "10..12" in response.json()["detail"]
    assert _snapshot(client, run_id) == before


def test_post_batch_reused_batch_id_for_other_steps_is_409(client):
    run_id = create_run(client)
    body = make_batch([0, 1])
    post_batch(client, run_id, body)
    before = _snapshot(client, run_id)

    response = post_batch(client, run_id, make_batch([5, 6], batch_id=body["batch_id"]))

    assert response.status_code == 409
    assert body["batch_id"] in response.json()["detail"]
    assert _snapshot(client, run_id) == before


def test_post_batch_accepts_out_of_order_batches(client):
    run_id = create_run(client)
    post_batch(client, run_id, make_batch([10, 11], global_norm=[3.0, 4.0]))
    post_batch(client, run_id, make_batch([0, 1], global_norm=[1.0, 2.0]))

    series = get_series(client, run_id, "global_norm")
    layers = client.get(f"/api/v1/runs/{run_id}/layers").json()["layers"]

    assert series["step"] == [0, 1, 10, 11]
    assert series["value"] == [1.0, 2.0, 3.0, 4.0]
    assert client.get(f"/api/v1/runs/{run_id}").json()["last_step"] == 11
    assert all(layer["latest_grad_norm"] == layer["max_grad_norm"] for layer in layers)


def test_post_batch_unknown_run_is_404(client):
    response = post_batch(client, str(uuid.uuid4()), make_batch([0]))
    assert response.status_code == 404
    assert response.json()["code"] == "run_not_found"


def _ragged(body):
    body["grad_norm"][1] = [1.0, 2.0, 3.0]


def _short_rows(body):
    body["nonfinite"] = body["nonfinite"][:-1]


def _short_run_array(body):
    body["clip_coef"] = body["clip_coef"][:-1]


def _wrong_layer_count(body):
    body["layers"] = ["a", "b", "c"]


def _duplicate_layers(body):
    body["layers"] = ["a", "a"]


def _not_increasing(body):
    body["step"] = [0, 2, 2]


def _decreasing(body):
    body["step"] = [5, 4, 3]


def _schema_2(body):
    body["schema"] = 2


def _string_nan(body):
    body["grad_norm"][0][0] = "nan"


def _string_number(body):
    body["global_norm"][1] = "1.5"


def _bool_float(body):
    body["loss"][0] = True


def _null_required(body):
    body["global_norm"][0] = None


def _extra_key(body):
    body["colour"] = "red"


def _missing_key(body):
    del body["nonfinite"]


def _negative_count(body):
    body["nonfinite"][0][1] = -1


def _float_count(body):
    body["nonfinite"][0][1] = 1.5


def _negative_step(body):
    body["step"] = [-1, 0, 1]


def _no_steps(body):
    for key in ("step", "loss", "global_norm", "global_norm_clipped", "clip_coef", "skipped"):
        body[key] = []
    body["grad_norm"] = []
    body["nonfinite"] = []


def _bad_batch_id(body):
    body["batch_id"] = "batch-1"


def _nul_in_layer(body):
    body["layers"][0] = "dense\x00"


def _huge_count(body):
    body["nonfinite"][0][0] = 2**53 + 1


def _bad_reason(body):
    body["dropped_batches"] = {"queue full!": 1}


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (_ragged, "grad_norm"),
        (_short_rows, "nonfinite"),
        (_short_run_array, "clip_coef"),
        (_wrong_layer_count, "grad_norm"),
        (_duplicate_layers, "layers"),
        (_not_increasing, "step"),
        (_decreasing, "step"),
        (_schema_2, "schema"),
        (_string_nan, "grad_norm"),
        (_string_number, "global_norm"),
        (_bool_float, "loss"),
        (_null_required, "global_norm"),
        (_extra_key, "colour"),
        (_missing_key, "nonfinite"),
        (_negative_count, "nonfinite"),
        (_float_count, "nonfinite"),
        (_negative_step, "step"),
        (_no_steps, "step"),
        (_bad_batch_id, "batch_id"),
        (_bad_reason, "dropped_batches"),
        (_nul_in_layer, "layers"),
        (_huge_count, "nonfinite"),
    ],
)
def test_post_batch_rejects_bad_input_naming_the_field(client, mutate, field):
    run_id = create_run(client)
    post_batch(client, run_id, make_batch([0, 1, 2]))
    before = _snapshot(client, run_id)
    body = make_batch([3, 4, 5])
    mutate(body)

    response = post_batch(client, run_id, body)

    assert response.status_code == 422, response.text
    assert field in response.text
    assert "Traceback" not in response.text
    assert _snapshot(client, run_id) == before


def test_post_batch_shape_error_message_is_explicit(client):
    run_id = create_run(client)
    body = make_batch([0, 1, 2, 3], layers=["a", "b", "c", "d"])
    body["grad_norm"][3] = [1.0] * 5

    reply = post_batch(client, run_id, body).json()

    assert reply["errors"][0]["loc"] == ["body", "grad_norm"]
    assert "grad_norm: row 3 has 5 values, expected 4 (one per layer)" in reply["errors"][0]["msg"]
    assert reply["detail"].startswith("grad_norm: ")


def test_post_batch_rejects_bare_nan_token(client):
    run_id = create_run(client)
    raw = json.dumps(make_batch([0, 1]), allow_nan=True).replace('"NaN"', "NaN")
    raw = raw.replace('"global_norm": [1.0', '"global_norm": [NaN')

    response = post_batch(client, run_id, raw.encode())

    assert response.status_code == 422
    assert "NaN" in response.json()["errors"][0]["msg"]


def test_post_batch_broken_gzip_is_400(client):
    run_id = create_run(client)
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    compressed = gzip.compress(json.dumps(make_batch([0])).encode())

    garbage = client.post(f"/api/v1/runs/{run_id}/batches", content=b"not gzip", headers=headers)
    truncated = client.post(
        f"/api/v1/runs/{run_id}/batches", content=compressed[:-12], headers=headers
    )

    for response in (garbage, truncated):
        assert response.status_code == 400
        assert response.json()["code"] == "malformed_body"
        assert "gzip" in response.json()["detail"]
    assert client.get(f"/api/v1/runs/{run_id}").json()["num_steps"] == 0


def test_post_batch_unsupported_encoding_is_415(client):
    run_id = create_run(client)
    response = client.post(
        f"/api/v1/runs/{run_id}/batches",
        content=json.dumps(make_batch([0])).encode(),
        headers={"Content-Type": "application/json", "Content-Encoding": "br"},
    )
    assert response.status_code == 415
    assert "Content-Encoding" in response.json()["detail"]


@pytest.fixture
def small_client(database_url):
    settings = Settings(
        database_url=database_url,
        max_body_bytes=4096,
        max_steps_per_batch=8,
        max_layers=3,
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_post_batch_oversized_body_is_413(small_client):
    run_id = create_run(small_client)
    body = make_batch([0], config_blob="x" * 5000)

    plain = post_batch(small_client, run_id, body, compress=False)
    # Compresses far below the limit but expands past it: refused while decoding.
    bomb = post_batch(small_client, run_id, body, compress=True)

    assert len(gzip.compress(json.dumps(body).encode())) < 4096
    for response in (plain, bomb):
        assert response.status_code == 413, response.text
        assert response.json()["code"] == "payload_too_large"
    assert small_client.get(f"/api/v1/runs/{run_id}").json()["num_steps"] == 0


@pytest.mark.parametrize(
    ("steps", "layers", "field"),
    [(list(range(9)), ["a"], "step"), ([0], ["a", "b", "c", "d"], "layers")],
)
def test_post_batch_over_server_limits_is_422(small_client, steps, layers, field):
    run_id = create_run(small_client)
    response = post_batch(small_client, run_id, make_batch(steps, layers))
    assert response.status_code == 422
    assert response.json()["detail"].startswith(f"{field}:")


def test_post_batch_with_new_layer_appends_it_to_layer_order(client):
    run_id = create_run(client)
    post_batch(client, run_id, make_batch([0], ["b", "a"]))
    post_batch(client, run_id, make_batch([1], ["c", "a", "b"]))

    layers = client.get(f"/api/v1/runs/{run_id}/layers").json()["layers"]

    assert [layer["name"] for layer in layers] == ["b", "a", "c"]
    assert [layer["index"] for layer in layers] == [0, 1, 2]
    assert get_series(client, run_id, "grad_norm", layer="c")["step"] == [1]


def test_post_batch_without_optional_metrics(client):
    run_id = create_run(client)
    body = make_batch([0, 1])
    del body["loss"]

    assert post_batch(client, run_id, body).status_code == 200
    assert get_series(client, run_id, "loss")["step"] == []
    assert get_series(client, run_id, "weight_norm", layer="dense")["step"] == []


def test_ingest_batches_stores_all_in_one_transaction_or_nothing(database_url):
    engine = create_db_engine(database_url)
    database = Database(engine)
    limits = IngestOptions(max_steps=100, max_layers=10)
    now = datetime.now(UTC)
    try:
        run_id = str(uuid.uuid4())
        with database.write_session() as session:
            runs.create_run(session, RunCreate(run_id=uuid.UUID(run_id), name="bulk"), now)
        first, second = make_batch([0, 1]), make_batch([2, 3])
        conflicting = make_batch([1, 4], batch_id=first["batch_id"])
        with database.write_session() as session, pytest.raises(BatchConflictError):
            ingest_batches(
                session,
                run_id,
                [StepBatch.model_validate(b) for b in (first, second, conflicting)],
                limits,
                now,
            )
        with database.read_session() as session:
            assert runs.get_run(session, run_id).num_steps == 0

        with database.write_session() as session:
            acks = ingest_batches(
                session,
                run_id,
                [StepBatch.model_validate(b) for b in (first, second, first)],
                limits,
                now,
            )
        with database.read_session() as session:
            stored = runs.get_run(session, run_id)
    finally:
        engine.dispose()

    assert [ack.duplicate for ack in acks] == [False, False, True]
    assert stored.num_steps == 4
    assert stored.last_step == 3
