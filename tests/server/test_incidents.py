"""Incident bundles announced in batches: stored once per step, listed, attached to the
run-level events whose steps hold them, summarised by /health; bad announcements are refused
with the batch (nothing stored)."""

from __future__ import annotations

import math

import pytest

from tests.server.wire import create_run, make_batch, post_batch

_LAYERS = ("dense", "dense_1")


def _incident(step: int, **extra: object) -> dict[str, object]:
    return {
        "step": step,
        "cause": "nonfinite",
        "path": f"/runs/incidents/abc/step-{step}",
        "host": "trainer-1",
        "bytes": 123_456,
        "format": "gradwatch-incident/1",
        "learning_rate": 0.01,
        "loss_scale": None,
        **extra,
    }


def _nan_batch(steps: list[int], nan_step: int, **extra: object) -> dict:
    """A batch whose ``nan_step`` has NaN gradients in ``dense`` (a run-level nonfinite event)."""
    grad = [[math.nan if s == nan_step else 1.0, 1.0] for s in steps]
    nonfinite = [[3 if s == nan_step else 0, 0] for s in steps]
    global_norm = [math.nan if s == nan_step else 1.5 for s in steps]
    return make_batch(
        steps, _LAYERS, grad_norm=grad, nonfinite=nonfinite, global_norm=global_norm, **extra
    )


def test_announced_bundle_is_listed_on_its_event_and_in_health(client):
    run_id = create_run(client)
    body = _nan_batch(list(range(10)), 7, incidents=[_incident(7)])
    assert post_batch(client, run_id, body).status_code == 200

    listed = client.get(f"/api/v1/runs/{run_id}/incidents").json()
    assert listed["run_id"] == run_id
    [incident] = listed["incidents"]
    assert incident["step"] == 7
    assert incident["cause"] == "nonfinite"
    assert incident["host"] == "trainer-1"
    assert incident["bytes"] == 123_456
    assert incident["learning_rate"] == 0.01
    assert incident["loss_scale"] is None
    assert incident["replay"] == "gradwatch replay /runs/incidents/abc/step-7"

    events = client.get(f"/api/v1/runs/{run_id}/events").json()["events"]
    run_level = [e for e in events if e["layer"] is None and e["rule"] == "nonfinite"]
    assert run_level
    assert run_level[0]["incidents"] == [incident]
    assert all(e["incidents"] == [] for e in events if e["layer"] is not None)

    health = client.get(f"/api/v1/runs/{run_id}/health").json()
    assert health["incidents"] == [incident]


def test_resend_and_second_announcement_of_a_step_keep_the_first(client):
    run_id = create_run(client)
    body = _nan_batch(list(range(10)), 7, incidents=[_incident(7)])
    assert post_batch(client, run_id, body).status_code == 200
    assert post_batch(client, run_id, body).json()["duplicate"] is True
    # A restarted job resends stored steps with a new batch id and announces the step again.
    again = _nan_batch(list(range(10)), 7, incidents=[_incident(7, path="/elsewhere/step-7")])
    assert post_batch(client, run_id, again).status_code == 200
    later = make_batch([10, 11], _LAYERS, incidents=[_incident(11, cause="skipped")])
    assert post_batch(client, run_id, later).status_code == 200

    incidents = client.get(f"/api/v1/runs/{run_id}/incidents").json()["incidents"]
    assert [(i["step"], i["cause"], i["path"]) for i in incidents] == [
        (7, "nonfinite", "/runs/incidents/abc/step-7"),
        (11, "skipped", "/runs/incidents/abc/step-11"),
    ]


def test_recorded_rows_are_kept_and_summarised(client):
    run_id = create_run(client)
    recorded = {
        "step": [5, 6, 7],
        "learning_rate": [0.01, 30.0, 30.0],
        "loss_scale": [None, None, None],
        "epoch": [0, 0, 0],
        "step_in_epoch": [5, 6, 7],
    }
    body = make_batch([7], _LAYERS, incidents=[_incident(7, recorded=recorded)])
    assert post_batch(client, run_id, body).status_code == 200
    [incident] = client.get(f"/api/v1/runs/{run_id}/incidents").json()["incidents"]
    assert incident["recorded"] == recorded
    assert incident["learning_rate_history"] == (
        "learning rate: 0.01 at step 5, 30 from step 6 (×3000)"
    )
    assert incident["loss_scale_history"] is None


def _rows(steps: list[int], scale: float) -> dict[str, list]:
    return {
        "step": steps,
        "learning_rate": [0.01] * len(steps),
        "loss_scale": [scale] * len(steps),
        "epoch": [0] * len(steps),
        "step_in_epoch": steps,
    }


def test_rows_after_the_step_announced_later_are_merged_by_step(client):
    """The agent announces a bundle with the rows up to its step, then the step again with
    the rows after it as they are read: the server keeps one incident whose rows are the
    union by step (the first write of a step wins) and the first announcement's fields."""
    run_id = create_run(client)
    first = make_batch([7], _LAYERS, incidents=[_incident(7, recorded=_rows([5, 6, 7], 4.0))])
    assert post_batch(client, run_id, first).status_code == 200
    # The rows after step 7, in two later batches; the second repeats step 9 with another
    # value, and names another path (ignored: the first announcement's fields stay).
    after = [
        _incident(7, recorded=_rows([8, 9], 2.0)),
        _incident(7, recorded=_rows([9, 10], 1.0), path="/elsewhere"),
    ]
    for steps, item in zip(([8, 9], [10]), after, strict=True):
        body = make_batch(steps, _LAYERS, incidents=[item])
        assert post_batch(client, run_id, body).status_code == 200
    assert post_batch(client, run_id, body).json()["duplicate"] is True

    [incident] = client.get(f"/api/v1/runs/{run_id}/incidents").json()["incidents"]
    assert incident["path"] == "/runs/incidents/abc/step-7"
    assert incident["recorded"]["step"] == [5, 6, 7, 8, 9, 10]
    assert incident["recorded"]["loss_scale"] == [4.0, 4.0, 4.0, 2.0, 2.0, 1.0]
    assert incident["loss_scale_history"] == (
        "loss scale: 4 at steps 5–7, 2 at steps 8–9 (×0.5), 1 from step 10 (×0.5)"
    )


def test_merged_rows_stop_at_the_limit_a_reply_can_hold(client):
    run_id = create_run(client)
    for first in (0, 4000):  # 4,000 rows, then 4,000 more: 96 fit
        item = _incident(7, recorded=_rows(list(range(first, first + 4000)), 1.0))
        body = make_batch([first], _LAYERS, incidents=[item])
        assert post_batch(client, run_id, body).status_code == 200
    [incident] = client.get(f"/api/v1/runs/{run_id}/incidents").json()["incidents"]
    assert incident["recorded"]["step"] == list(range(4096))


def test_recorded_rows_of_unequal_lengths_are_refused(client):
    run_id = create_run(client)
    recorded = {"step": [1, 2], "learning_rate": [0.1], "loss_scale": [None, None],
                "epoch": [0, 0], "step_in_epoch": [1, 2]}  # fmt: skip
    body = make_batch([2], _LAYERS, incidents=[_incident(2, recorded=recorded)])
    response = post_batch(client, run_id, body)
    assert response.status_code == 422
    assert "learning_rate: has 1 values, expected 2" in response.json()["detail"]


def test_path_with_spaces_is_quoted_in_the_replay_command(client):
    run_id = create_run(client)
    body = make_batch([0], _LAYERS, incidents=[_incident(0, path="/my runs/step-0")])
    assert post_batch(client, run_id, body).status_code == 200
    [incident] = client.get(f"/api/v1/runs/{run_id}/incidents").json()["incidents"]
    assert incident["replay"] == "gradwatch replay '/my runs/step-0'"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"cause": "boom"}, "cause"),
        ({"path": ""}, "path"),
        ({"path": "/a\x00b"}, "path"),
        ({"bytes": -1}, "bytes"),
        ({"learning_rate": "NaN"}, "learning_rate"),
        ({"format": "a b"}, "format"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_announcement_refuses_the_batch_naming_the_field(client, change, field):
    run_id = create_run(client)
    body = make_batch([0, 1], _LAYERS, incidents=[_incident(1, **change)])
    response = post_batch(client, run_id, body)
    assert response.status_code == 422, response.text
    assert field in response.json()["detail"]
    assert client.get(f"/api/v1/runs/{run_id}").json()["last_step"] is None
    assert client.get(f"/api/v1/runs/{run_id}/incidents").json()["incidents"] == []


def test_at_most_sixteen_announcements_a_batch(client):
    run_id = create_run(client)
    body = make_batch([0], _LAYERS, incidents=[_incident(s) for s in range(17)])
    response = post_batch(client, run_id, body)
    assert response.status_code == 422
    assert "incidents" in response.json()["detail"]


def test_unknown_run_is_404(client):
    response = client.get("/api/v1/runs/00000000-0000-4000-8000-000000000000/incidents")
    assert response.status_code == 404
    assert response.json()["code"] == "run_not_found"
