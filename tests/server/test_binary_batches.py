"""The binary batch body (``gradwatch.wire.binary``): stored as its JSON twin is, refused with
the same errors, and never a 500 whatever the bytes."""

from __future__ import annotations

import copy
import struct
import uuid
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradwatch.wire.binary import COLUMNS, MEDIA_TYPE
from tests.server import test_batches as json_cases
from tests.server.wire import binary_body, create_run, make_batch, post_batch, post_binary

_EVERY_METRIC: dict[str, Any] = {
    "schema": 1,
    "layers": ["dense", "dense_1"],
    "step": [100, 101, 102],
    "loss": [0.25, None, "NaN"],
    "global_norm": [1.5, 1e9, "Infinity"],
    "global_norm_clipped": [1.0, 1.0, 1.0],
    "clip_coef": [0.5, "NaN", 1.0],
    "skipped": [False, True, False],
    "grad_norm": [[0.375, 1.125], [0.5, "Infinity"], ["-Infinity", 3.4028234663852886e38]],
    "nonfinite": [[0, 0], [0, 3], [2**53, 1]],
    "weight_norm": [[2.0, 3.0], [None, None], [1.0, "NaN"]],
    "update_ratio": [[0.001953125, "-Infinity"], [None, None], [0.5, 0.25]],
    "dropped_batches": {"queue_full": 2},
}


def _stored(client, run_id: str) -> Any:
    """Everything the REST API says about a run's data (ids and timestamps left out)."""
    run = client.get(f"/api/v1/runs/{run_id}").json()
    layers = client.get(f"/api/v1/runs/{run_id}/layers").json()["layers"]
    series = {}
    for metric in ("loss", "global_norm", "global_norm_clipped", "clip_coef", "skipped"):
        series[metric] = _values(client, run_id, metric)
    for metric in ("grad_norm", "nonfinite", "weight_norm", "update_ratio"):
        for layer in layers:
            series[metric, layer["name"]] = _values(client, run_id, metric, layer=layer["name"])
    events = client.get(f"/api/v1/runs/{run_id}/events").json()
    kept = ("num_steps", "last_step", "clipped_steps", "skipped_steps", "nonfinite_steps")
    return (
        {key: run[key] for key in kept},
        [
            (item["rule"], item["severity"], item["layer"], item["count"])
            for item in events["events"]
        ],
        series,
    )


def _values(client, run_id: str, metric: str, **params: Any) -> Any:
    reply = client.get(f"/api/v1/runs/{run_id}/series", params={"metric": metric, **params})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    return body["step"], body["value"]


def test_a_binary_batch_is_stored_exactly_as_its_json_twin(client):
    by_json, by_binary = create_run(client, "json"), create_run(client, "binary")
    body = {**_EVERY_METRIC, "batch_id": str(uuid.uuid4())}

    as_json = post_batch(client, by_json, body)
    as_binary = post_binary(client, by_binary, body)

    assert as_json.status_code == as_binary.status_code == 200, as_binary.text
    assert as_binary.json()["stored_samples"] == as_json.json()["stored_samples"]
    stored = _stored(client, by_binary)
    assert stored == _stored(client, by_json)
    assert stored[1], "its non-finite values should have raised events"
    again = post_binary(client, by_binary, body)  # a resend by batch_id
    assert again.json()["duplicate"] is True


def test_a_binary_batch_without_gzip_is_stored(client):
    run_id = create_run(client)
    reply = post_binary(client, run_id, make_batch([0, 1]), compress=False)
    assert reply.status_code == 200, reply.text
    assert reply.json()["stored_samples"] > 0


_SAME_DEFECT = [
    json_cases._duplicate_layers,
    json_cases._not_increasing,
    json_cases._decreasing,
    json_cases._schema_2,
    json_cases._extra_key,
    json_cases._missing_key,
    json_cases._negative_count,
    json_cases._negative_step,
    json_cases._no_steps,
    json_cases._bad_batch_id,
    json_cases._bad_reason,
    json_cases._nul_in_layer,
    json_cases._huge_count,
]


@pytest.mark.parametrize("mutate", _SAME_DEFECT, ids=lambda mutate: mutate.__name__.strip("_"))
def test_a_binary_batch_is_refused_with_the_errors_of_its_json_twin(client, mutate):
    run_id = create_run(client)
    body = make_batch([3, 4, 5])
    mutate(body)

    as_json = post_batch(client, run_id, copy.deepcopy(body))
    as_binary = post_binary(client, run_id, body)

    assert as_json.status_code == as_binary.status_code == 422
    assert as_binary.json() == as_json.json()
    assert client.get(f"/api/v1/runs/{run_id}").json()["num_steps"] == 0


def _packed(**changes: Any) -> bytes:
    """A valid binary body (3 steps × 2 layers) with some keys replaced (None: removed)."""
    body = msgpack.unpackb(binary_body(make_batch([3, 4, 5])))
    for key, value in changes.items():
        if value is None:
            body.pop(key)
        else:
            body[key] = value
    return msgpack.packb(body)


def _with_duplicate_key() -> bytes:
    raw = _packed()
    assert raw[0] & 0xF0 == 0x80  # a fixmap: one more entry, "schema" again
    return bytes([raw[0] + 1]) + raw[1:] + msgpack.packb("schema") + msgpack.packb(1)


_BINARY_DEFECTS = [
    ("not_msgpack", b"\xc1", "body", "MessagePack decode error"),
    ("truncated", _packed()[:-5], "body", "MessagePack decode error"),
    ("too_deep", b"\x91" * 100_000 + b"\x00", "body", "nested too deeply"),
    ("trailing_bytes", _packed() + b"\x00", "body", "bytes after the MessagePack value"),
    ("not_a_map", msgpack.packb([1, 2]), "body", "valid dictionary"),
    ("duplicate_key", _with_duplicate_key(), "body", "'schema' more than once"),
    ("extension_type", msgpack.packb({"schema": msgpack.ExtType(5, b"x")}), "body", "extension"),
    ("short_column", _packed(grad_norm=b"\0" * 20), "grad_norm", "has 5 values, expected 6"),
    ("ragged_bytes", _packed(nonfinite=b"\0" * 7), "nonfinite", "whole number of int64"),
    ("list_column", _packed(clip_coef=[1.0, 1.0, 1.0]), "clip_coef", "MessagePack bin"),
    (
        "nil_column",
        msgpack.packb({**msgpack.unpackb(_packed()), "global_norm": None}),
        "global_norm",
        "MessagePack bin",
    ),
    ("skipped_not_bool", _packed(skipped=b"\0\2\0"), "skipped.1", "valid boolean"),
    (
        "mask_of_required",
        _packed(measured={"grad_norm": b"\1" * 6}),
        "measured",
        "not one of loss, weight_norm, update_ratio",
    ),
    (
        "mask_too_short",
        _packed(measured={"loss": b"\1"}),
        "measured.loss",
        "has 1 values, expected 3",
    ),
    ("mask_not_flags", _packed(measured={"loss": b"\1\3\1"}), "measured.loss.1", "boolean"),
    (
        "mask_without_column",
        _packed(loss=None, measured={"loss": b"\1\1\1"}),
        "measured.loss",
        "which is not sent",
    ),
    ("mask_not_a_map", _packed(measured=b"\1"), "measured", "valid dictionary"),
]


@pytest.mark.parametrize(
    ("raw", "where", "says"),
    [case[1:] for case in _BINARY_DEFECTS],
    ids=[case[0] for case in _BINARY_DEFECTS],
)
def test_a_malformed_binary_batch_is_422_naming_what_is_wrong(client, raw, where, says):
    run_id = create_run(client)

    reply = post_binary(client, run_id, raw)

    assert reply.status_code == 422, reply.text
    assert reply.json()["detail"].startswith(f"{where}: "), reply.json()
    assert says in reply.json()["detail"]
    assert client.get(f"/api/v1/runs/{run_id}").json()["num_steps"] == 0


def test_only_the_batch_endpoint_takes_the_binary_media_type(client):
    run_id = create_run(client)
    refused = client.post(
        "/api/v1/runs",
        content=msgpack.packb({"run_id": str(uuid.uuid4()), "name": "r"}),
        headers={"Content-Type": MEDIA_TYPE},
    )
    assert refused.status_code == 415
    assert "MessagePack" not in refused.json()["detail"]
    other = client.post(
        f"/api/v1/runs/{run_id}/batches", content=b"x", headers={"Content-Type": "text/csv"}
    )
    assert other.status_code == 415
    assert MEDIA_TYPE in other.json()["detail"]
    assert "application/json" in other.json()["detail"]


def test_openapi_describes_both_bodies_of_the_batch_endpoint(client):
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/api/v1/runs/{run_id}/batches"]["post"]["requestBody"]
    assert body["required"] is True
    assert body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/StepBatch"
    }
    assert body["content"][MEDIA_TYPE]["schema"]["format"] == "binary"
    step_batch = spec["components"]["schemas"]["StepBatch"]
    assert set(COLUMNS) <= set(step_batch["properties"])
    assert "IncidentIn" in spec["components"]["schemas"]


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=8),
    st.binary(max_size=64),
)
_messages = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    replaced=st.dictionaries(
        st.sampled_from([*COLUMNS, "measured", "schema", "batch_id", "layers", "incidents", "x"]),
        _messages,
        max_size=4,
    ),
    noise=st.binary(max_size=64),
    mode=st.sampled_from(["replace", "raw", "flip"]),
)
def test_any_binary_body_is_answered_without_a_server_error(client, replaced, noise, mode):
    """Fuzz: valid bodies with fields replaced by random MessagePack values, random bytes, and
    valid bodies with bytes flipped: a 200 or a 4xx with a message, never a 500."""
    run_id = create_run(client)
    body = make_batch([0, 1, 2])
    if mode == "replace":
        decoded = msgpack.unpackb(binary_body(body))
        decoded.update(replaced)
        raw = msgpack.packb(decoded)
    elif mode == "raw":
        raw = noise
    else:
        raw = bytearray(binary_body(body))
        for index, byte in enumerate(noise[:8]):
            raw[(index * 131 + byte) % len(raw)] ^= byte or 1
        raw = bytes(raw)

    reply = post_binary(client, run_id, raw)

    assert reply.status_code in (200, 409, 422), reply.text
    assert reply.json().get("detail") or reply.status_code == 200
    stored = client.get(f"/api/v1/runs/{run_id}").json()["num_steps"]
    assert stored == (3 if reply.status_code == 200 else 0)


def test_struct_layout_is_little_endian():
    """The columns' bytes do not depend on the machine: int64 and float32 little-endian."""
    raw = msgpack.unpackb(binary_body(make_batch([1, 2], global_norm=[0.5, 2.0])))
    assert raw["step"] == struct.pack("<2q", 1, 2)
    assert raw["global_norm"] == struct.pack("<2f", 0.5, 2.0)
