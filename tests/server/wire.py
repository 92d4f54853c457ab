"""Builders for wire-format request bodies used by the server tests."""

from __future__ import annotations

import gzip
import json
import math
import uuid
from typing import Any

from fastapi.testclient import TestClient


def encode_float(value: float | None) -> float | str | None:
    """Encode a float the way the agent does: non-finite values as strings."""
    if value is None or math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def decode_float(value: float | str | None) -> float | None:
    """Decode a float from a response body."""
    if isinstance(value, str):
        return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}[value]
    return value


def make_batch(
    steps: list[int],
    layers: list[str] | tuple[str, ...] = ("dense", "dense_1"),
    *,
    grad_norm: list[list[float]] | None = None,
    global_norm: list[float] | None = None,
    clip_coef: list[float] | None = None,
    nonfinite: list[list[int]] | None = None,
    skipped: list[bool] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Return a valid ``StepBatch`` body; unspecified arrays get simple regular values."""
    n, width = len(steps), len(layers)
    body: dict[str, Any] = {
        "schema": 1,
        "batch_id": str(uuid.uuid4()),
        "layers": list(layers),
        "step": list(steps),
        "loss": [1.0 / (1 + step) for step in steps],
        "global_norm": [encode_float(v) for v in global_norm or [1.0 + step for step in steps]],
        "global_norm_clipped": [1.0] * n,
        "clip_coef": [encode_float(v) for v in clip_coef or [1.0] * n],
        "skipped": skipped if skipped is not None else [False] * n,
        "grad_norm": [
            [encode_float(v) for v in row]
            for row in grad_norm or [[0.5 + j for j in range(width)] for _ in steps]
        ],
        "nonfinite": nonfinite if nonfinite is not None else [[0] * width for _ in steps],
    }
    body.update(extra)
    return body


def post_batch(
    client: TestClient, run_id: str, body: dict[str, Any] | bytes, *, compress: bool = True
) -> Any:
    """POST a batch as the agent does: JSON, gzip-encoded unless ``compress`` is False."""
    raw = body if isinstance(body, bytes) else json.dumps(body, allow_nan=False).encode()
    headers = {"Content-Type": "application/json"}
    if compress:
        raw = gzip.compress(raw)
        headers["Content-Encoding"] = "gzip"
    return client.post(f"/api/v1/runs/{run_id}/batches", content=raw, headers=headers)


def create_run(
    client: TestClient, name: str = "run", project: str = "default", **extra: Any
) -> str:
    """Create a run and return its id."""
    run_id = str(uuid.uuid4())
    response = client.post(
        "/api/v1/runs", json={"run_id": run_id, "name": name, "project": project, **extra}
    )
    assert response.status_code == 201, response.text
    return run_id


def get_series(client: TestClient, run_id: str, metric: str, **params: Any) -> Any:
    """GET a series and return its JSON body (asserting 200)."""
    response = client.get(f"/api/v1/runs/{run_id}/series", params={"metric": metric, **params})
    assert response.status_code == 200, response.text
    return response.json()


def binary_body(body: dict[str, Any]) -> bytes:
    """The binary form (``gradwatch.wire.binary``) of a JSON batch body, valid or not:
    numeric columns become raw arrays (``null`` entries unmeasured), the rest stays."""
    import numpy as np

    from gradwatch.wire.binary import COLUMNS, pack

    fields = {key: value for key, value in body.items() if key not in COLUMNS}
    columns: dict[str, Any] = {}
    measured: dict[str, Any] = {}
    for name, values in body.items():
        if name not in COLUMNS:
            continue
        flat = (
            [v for row in values for v in row] if values and isinstance(values[0], list) else values
        )
        if COLUMNS[name].dtype.kind == "f":
            columns[name] = np.array([math.nan if v is None else decode_float(v) for v in flat])
            known = [v is not None for v in flat]
            if not all(known):
                measured[name] = np.array(known)
        else:
            columns[name] = np.array(flat, dtype=np.int64)
    return pack(fields, columns, measured)


def post_binary(
    client: TestClient, run_id: str, body: dict[str, Any] | bytes, *, compress: bool = True
) -> Any:
    """POST a batch as the binary body (a JSON body dict is converted by :func:`binary_body`)."""
    from gradwatch.wire.binary import MEDIA_TYPE

    raw = body if isinstance(body, bytes) else binary_body(body)
    headers = {"Content-Type": MEDIA_TYPE}
    if compress:
        raw = gzip.compress(raw)
        headers["Content-Encoding"] = "gzip"
    return client.post(f"/api/v1/runs/{run_id}/batches", content=raw, headers=headers)
