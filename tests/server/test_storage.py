"""Storage cost (DESIGN.md §5 target: ≤ 10 bytes per sample on SQLite, indexes included)."""

from __future__ import annotations

import numpy as np
from fastapi.testclient import TestClient

from gradwatch.server.app import create_app
from gradwatch.server.config import Settings
from tests.fakes import sqlite_file_bytes
from tests.server.wire import create_run, make_batch, post_batch


def test_storage_stays_under_ten_bytes_per_sample(tmp_path):
    path = tmp_path / "size.db"
    rng = np.random.default_rng(0)
    layers = [f"model/block_{i}/dense" for i in range(50)]
    stored = 0
    with TestClient(create_app(Settings(database_url=f"sqlite:///{path}"))) as client:
        run_id = create_run(client)
        for first in range(0, 1000, 50):
            steps = list(range(first, first + 50))
            grad = rng.lognormal(0, 0.3, size=(50, len(layers))).astype(np.float32)
            body = make_batch(steps, layers, grad_norm=grad.tolist())
            stored += post_batch(client, run_id, body).json()["stored_samples"]

    float_samples = 1000 * (len(layers) + 4)
    assert stored == float_samples + 1000 * (len(layers) + 1)
    assert sqlite_file_bytes(path) / float_samples < 10
