"""Concurrent writers on SQLite: each batch is stored exactly once, none fails."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tests.server.wire import create_run, get_series, make_batch, post_batch


def test_concurrency_parallel_ingest_stores_every_batch_once(client):
    runs = [create_run(client, name=f"run-{i}") for i in range(4)]
    bodies = [
        (run_id, make_batch(list(range(first, first + 20)), layers=["a", "b", "c"]))
        for run_id in runs
        for first in range(0, 200, 20)
    ]
    resends = bodies[::3]

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda item: post_batch(client, *item), bodies + resends))

    assert [r.status_code for r in responses] == [200] * len(responses)
    assert sum(r.json()["duplicate"] for r in responses) == len(resends)
    for run_id in runs:
        assert get_series(client, run_id, "global_norm")["step"] == list(range(200))
        assert client.get(f"/api/v1/runs/{run_id}").json()["num_steps"] == 200
