"""A batch that arrives after later steps were stored (a gap filled late) is stored in full,
once, and changes no other event; its own events do not depend on when it arrives.

Agents deliver one run's new steps in order (one thread; the next batch only after the
previous one is acknowledged; the spool replays oldest first), so a late batch comes from a
spool or a local file uploaded after the run went on. Three deliveries of the same eight
batches: the late one after batch 4, after every other batch, and never.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from gradwatch.server.detect import DetectorConfig, detect
from gradwatch.server.detect.event import StepColumns
from tests.server.wire import create_run, get_series, make_batch, post_batch

_STEPS = 25
_BATCHES = 8
_LATE = 3  # steps 75..99
_LAYERS = ("a", "b", "c")
_PROJECT = "late"
_DETECTORS = {
    "thresholds": {"explosion": {"warmup_steps": 20, "ceiling": 1e4}, "cooldown_steps": 60}
}
_NONFINITE = {
    "a": (76, 110, 165),  # late 76: 34 steps after 110's event began... before it, in fact
    "b": (72, 80, 126),  # late 80 lies between the stream's 72 and 126, within the cooldown
}
_CEILING_STEP = 90  # a late step above the explosion ceiling on layer "c"


def _bodies() -> list[dict]:
    rng = np.random.default_rng(7)
    total = _STEPS * _BATCHES
    grad = rng.lognormal(0.0, 0.2, size=(total, len(_LAYERS)))
    nonfinite = np.zeros((total, len(_LAYERS)), np.int64)
    for column, layer in enumerate(_LAYERS):
        for step in _NONFINITE.get(layer, ()):
            grad[step, column] = math.nan
            nonfinite[step, column] = 3
    grad[_CEILING_STEP, 2] = 5e4
    glob = np.sqrt(np.nansum(grad**2, axis=1))
    glob[np.isnan(grad).any(axis=1)] = math.nan
    return [
        make_batch(
            list(range(b * _STEPS, (b + 1) * _STEPS)),
            _LAYERS,
            grad_norm=grad[b * _STEPS : (b + 1) * _STEPS].tolist(),
            global_norm=glob[b * _STEPS : (b + 1) * _STEPS].tolist(),
            nonfinite=nonfinite[b * _STEPS : (b + 1) * _STEPS].tolist(),
        )
        for b in range(_BATCHES)
    ]


def _events(client, run_id):
    response = client.get(f"/api/v1/runs/{run_id}/events", params={"limit": 1000})
    assert response.status_code == 200, response.text
    assert response.json()["next_cursor"] is None
    return Counter(
        (
            e["rule"],
            e["layer"],
            e["first_step"],
            e["last_step"],
            e["count"],
            e["baseline"],
            str(e["onset"]),
        )
        for e in response.json()["events"]
    )


def _deliver(client, order):
    run_id = create_run(client, project=_PROJECT)
    bodies = _bodies()
    for index in order:
        response = post_batch(client, run_id, bodies[index])
        assert response.status_code == 200, response.text
        assert response.json()["duplicate"] is False
    return run_id


def test_late_batch_is_stored_once_and_its_events_do_not_depend_on_when_it_arrives(client):
    assert client.put(f"/api/v1/projects/{_PROJECT}/detectors", json=_DETECTORS).status_code == 200
    others = [b for b in range(_BATCHES) if b != _LATE]
    early = _deliver(client, [*others[:4], _LATE, *others[4:]])  # after batch 4
    last = _deliver(client, [*others, _LATE])
    never = _deliver(client, others)

    for run_id in (early, last):
        assert get_series(client, run_id, "global_norm", raw="true")["step"] == list(
            range(_STEPS * _BATCHES)
        )
        assert client.get(f"/api/v1/runs/{run_id}").json()["num_steps"] == _STEPS * _BATCHES
    assert _events(client, early) == _events(client, last)
    late_only = _events(client, early) - _events(client, never)
    assert _events(client, never) - _events(client, early) == Counter()  # nothing else changed
    lo, hi = _LATE * _STEPS, (_LATE + 1) * _STEPS - 1
    assert all(lo <= first <= last_step <= hi for _, _, first, last_step, *_ in late_only)
    assert {(rule, layer, first, last_step) for rule, layer, first, last_step, *_ in late_only} == {
        ("nonfinite", "a", 76, 76),
        ("nonfinite", "b", 80, 80),
        ("nonfinite", None, 76, 80),  # run level: 76 and 80 merge within the batch
        ("explosion", "c", _CEILING_STEP, _CEILING_STEP),
        ("explosion", None, _CEILING_STEP, _CEILING_STEP),
    }
    assert all(onset == "None" for *_, onset in late_only)  # no onset judged from today's state
    stream = {(r, layer, f, la, n) for r, layer, f, la, n, *_ in _events(client, never)}
    assert ("nonfinite", "a", 110, 165, 2) in stream  # continued across the late batch
    assert ("nonfinite", "b", 72, 126, 2) in stream
    health = [client.get(f"/api/v1/runs/{r}/health").json()["detections"] for r in (early, last)]
    assert health[0] == health[1]


def _columns(first: int, norms: np.ndarray, nonfinite: np.ndarray) -> StepColumns:
    n = len(norms)
    return StepColumns(
        steps=np.arange(first, first + n, dtype=np.int64),
        layers=("a",),
        global_norm=norms[:, 0].copy(),
        grad_norm=norms,
        nonfinite=nonfinite,
        clip_coef=np.ones(n),
        skipped=np.zeros(n, np.bool_),
    )


def test_detect_late_triggers_neither_continue_nor_move_the_cooldown_clock():
    config = DetectorConfig.model_validate({"thresholds": {"cooldown_steps": 50}})

    def batch(first: int, hit: int | None = None) -> StepColumns:
        counts = np.zeros((10, 1), np.int64)
        if hit is not None:
            counts[hit - first, 0] = 1
        return _columns(first, np.ones((10, 1)), counts)

    state = None
    for columns in (batch(0), batch(100, hit=105), batch(160)):
        state = detect(state, columns, config).state
    assert state is not None

    late = detect(state, batch(150, hit=159), config)  # a gap filled after step 169
    after = detect(late.state, batch(170, hit=175), config)
    without = detect(state, batch(170, hit=175), config)

    assert {(e.layer, e.first_step, e.continues) for e in late.events} == {
        ("a", 159, False),
        ("", 159, False),
    }
    assert late.state.to_bytes() == state.to_bytes()
    assert after.events == without.events
    assert {e.continues for e in after.events} == {False}  # 175 is 70 steps after 105
