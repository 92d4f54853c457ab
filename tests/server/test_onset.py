"""Onset analysis of run-level events and the loss-spike rule: planted streams with known
answers, through ``detect`` and through the REST API (both backends), any batch split.

Planted departures: every layer's norm is constant (σ at its floor, 0.1 in log units), so a
series is off its baseline from the first step it is more than 3σ out, ×e^0.3 ≈ ×1.35: a
×1.3-per-step growth starting at step s (×1.3 at s) departs at s + 1. With 24 layers of norm
1, ``b`` growing from 500 and ``a`` from 503, the global norm is ×1.27 its baseline at step
504 and ×1.45 at 505: it departs at 505.
"""

from __future__ import annotations

import itertools
import math
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradwatch.server.app import create_app
from gradwatch.server.detect import (
    Detection,
    DetectorConfig,
    DetectorState,
    Rule,
    StateFormatError,
    StepColumns,
    detect,
)
from gradwatch.server.detect.onset import ONSET_LAYERS, Onset
from gradwatch.server.store.db import create_db_engine
from tests.server.wire import create_run, make_batch, post_batch

LAYERS = ("input", "a", *(f"hidden_{i:02d}" for i in range(20)), "b", "output")
STEPS = 700


def _grow(norms: np.ndarray, layer: str, start: int, rate: float = 1.3) -> None:
    column = LAYERS.index(layer)
    norms[start:, column] *= rate ** np.arange(1, len(norms) - start + 1)


def _planted() -> dict[str, np.ndarray]:
    """``b`` grows ×1.3 per step from step 500, ``a`` from 503; the global norm follows."""
    norms = np.ones((STEPS, len(LAYERS)))
    _grow(norms, "b", 500)
    _grow(norms, "a", 503)
    return _arrays(np.minimum(norms, 1e30))


def _arrays(norms: np.ndarray, **extra: np.ndarray) -> dict[str, np.ndarray]:
    with np.errstate(invalid="ignore"):
        global_norm = np.sqrt((norms**2).sum(axis=1))
    return {
        "grad_norm": norms,
        "global_norm": global_norm,
        "nonfinite": np.zeros(norms.shape, np.int64),
        "loss": np.ones(len(norms)),
        **extra,
    }


def _columns(stream: dict[str, np.ndarray], start: int, stop: int) -> StepColumns:
    n = stop - start
    return StepColumns(
        steps=np.arange(start, stop, dtype=np.int64),
        layers=LAYERS,
        global_norm=stream["global_norm"][start:stop].astype(np.float32),
        grad_norm=stream["grad_norm"][start:stop].astype(np.float32),
        nonfinite=stream["nonfinite"][start:stop],
        clip_coef=np.ones(n, np.float32),
        skipped=np.zeros(n, np.bool_),
        loss=stream["loss"][start:stop].astype(np.float32),
    )


def _detect(stream: dict[str, np.ndarray], cuts: list[int]) -> list[Detection]:
    """Every event of a stream cut at ``cuts``, continuations merged (as the store does)."""
    state: DetectorState | None = None
    events: list[Detection] = []
    open_events: dict[tuple[Rule, str], int] = {}
    for start, stop in itertools.pairwise([0, *cuts, STEPS]):
        result = detect(state, _columns(stream, start, stop), DetectorConfig())
        state = DetectorState.from_bytes(result.state.to_bytes())
        for event in result.events:
            key = (event.rule, event.layer)
            if event.continues:
                events[open_events[key]] = events[open_events[key]].merged(event)
            else:
                open_events[key] = len(events)
                events.append(event)
    return events


def _run_level(events: list[Detection], rule: Rule) -> list[Detection]:
    return [e for e in events if e.rule is rule and e.layer == ""]


# --------------------------------------------------------------------------- detect()


def test_onset_orders_layers_by_their_departure_from_baseline():
    events = _detect(_planted(), [])

    (explosion,) = _run_level(events, Rule.EXPLOSION)
    onset = explosion.onset
    assert onset is not None
    assert onset.layers == (("b", 501), ("a", 504))
    assert onset.departed == 2
    assert onset.global_step == 505
    assert explosion.first_step > 505
    assert onset.loss_step is None  # the loss stayed flat: a gradient spike, quiet loss
    assert onset.nonfinite_forward is onset.nonfinite_backward is None
    assert not _run_level(events, Rule.LOSS)
    layer_events = {e.layer: e for e in events if e.rule is Rule.EXPLOSION and e.layer}
    assert all(e.onset is None for e in layer_events.values())
    assert layer_events["b"].first_step < layer_events["a"].first_step


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sets(st.integers(1, STEPS - 1), max_size=10))
def test_onset_is_the_same_whatever_the_batch_split(cuts):
    stream = _planted()
    assert _detect(stream, sorted(cuts)) == _detect(stream, [])


def test_onset_nonfinite_in_one_layer_first_then_backward_versus_forward_order():
    norms = np.ones((STEPS, len(LAYERS)))
    nonfinite = np.zeros(norms.shape, np.int64)
    norms[600, LAYERS.index("hidden_05")] = np.nan  # one layer first…
    nonfinite[600, LAYERS.index("hidden_05")] = 4
    for layer in ("a", "b"):  # …then two at once, two steps later
        norms[602, LAYERS.index(layer)] = np.inf
        nonfinite[602, LAYERS.index(layer)] = 1
    stream = _arrays(norms, nonfinite=nonfinite)

    (event,) = _run_level(_detect(stream, [601]), Rule.NONFINITE)
    assert event.first_step == 600
    assert event.onset == Onset(
        global_step=600,
        loss_step=None,
        layers=(("hidden_05", 600),),
        departed=1,
        nonfinite_forward="hidden_05",
        nonfinite_backward="hidden_05",
    )

    nonfinite = nonfinite.copy()
    nonfinite[600] = 0
    both = _arrays(np.where(np.arange(STEPS)[:, None] == 600, 1.0, norms), nonfinite=nonfinite)
    (event,) = _run_level(_detect(both, []), Rule.NONFINITE)
    assert event.first_step == 602
    onset = event.onset
    assert onset is not None
    assert onset.layers == (("b", 602), ("a", 602))  # a tie: the output side first
    assert onset.nonfinite_forward == "a"
    assert onset.nonfinite_backward == "b"


def test_onset_lists_the_first_layers_and_counts_them_all():
    layers = tuple(f"layer_{i:02d}" for i in range(ONSET_LAYERS + 5))
    norms = np.ones((STEPS, len(layers)))
    for i in range(len(layers)):
        norms[500 + i :, i] *= 1.5 ** np.arange(1, STEPS - 500 - i + 1)
    norms = np.minimum(norms, 1e30)
    n = len(norms)
    columns = StepColumns(
        steps=np.arange(n, dtype=np.int64),
        layers=layers,
        global_norm=np.where(np.arange(n) >= 530, 1e6, 1.0).astype(np.float32),  # from 530
        grad_norm=norms.astype(np.float32),
        nonfinite=np.zeros(norms.shape, np.int64),
        clip_coef=np.ones(n, np.float32),
        skipped=np.zeros(n, np.bool_),
    )
    result = detect(None, columns, DetectorConfig())

    (explosion,) = [e for e in result.events if e.rule is Rule.EXPLOSION and e.layer == ""]
    onset = explosion.onset
    assert onset is not None
    assert explosion.first_step == 530
    assert onset.departed == len(layers)
    assert len(onset.layers) == ONSET_LAYERS
    assert onset.layers[0] == ("layer_00", 500)  # 1.5 > e^0.3: departs at its first step
    assert [step for _, step in onset.layers] == list(range(500, 500 + ONSET_LAYERS))
    assert onset.global_step == 530
    assert onset.loss_step is None  # the batch carries no loss


def _fields(columns: StepColumns) -> dict:
    return {name: getattr(columns, name) for name in StepColumns.__dataclass_fields__}


@given(
    st.builds(
        Onset,
        global_step=st.none() | st.integers(0, 2**63 - 1),
        loss_step=st.none() | st.integers(0, 2**63 - 1),
        layers=st.lists(st.tuples(st.text(min_size=1), st.integers(0, 2**63 - 1))).map(tuple),
        departed=st.integers(0, 10_000),
        nonfinite_forward=st.none() | st.text(min_size=1),
        nonfinite_backward=st.none() | st.text(min_size=1),
    )
)
def test_onset_round_trips_through_json(onset):
    assert Onset.from_json(onset.to_json()) == onset


@pytest.mark.parametrize(
    "damage",
    [{}, {"layers": [["a"]]}, {"departed": "3"}, {"global_step": 1.5}, {"nonfinite_forward": 3}],
)
def test_onset_from_json_rejects_what_it_did_not_write(damage):
    stored = Onset(1, None, (("a", 1),), 1, None, None).to_json()
    broken = {**stored, **damage} if damage else {"layers": []}
    with pytest.raises(ValueError, match="not a stored onset"):
        Onset.from_json(broken)


# --------------------------------------------------------------------------- loss rule


def _quiet(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    norms = np.exp(0.1 * rng.standard_normal((STEPS, len(LAYERS))))
    return _arrays(norms, loss=np.exp(0.05 * rng.standard_normal(STEPS)) * 0.7)


def test_loss_rule_fires_on_a_loss_spike_with_quiet_gradients():
    stream = _quiet()
    stream["loss"][600] *= 8.0

    events = _detect(stream, [590, 650])

    assert [e.rule for e in events] == [Rule.LOSS]
    (spike,) = events
    assert (spike.layer, spike.first_step, spike.last_step) == ("", 600, 600)
    assert spike.value == pytest.approx(stream["loss"][600], rel=1e-6)
    assert spike.onset is not None
    assert spike.onset.global_step is None  # the gradients were quiet
    assert spike.onset.layers == ()
    assert spike.onset.loss_step == 600


def test_loss_rule_stays_quiet_on_a_gradient_spike_with_a_quiet_loss():
    stream = _quiet()
    stream["grad_norm"][600] *= 50.0
    stream["global_norm"][600] *= 50.0

    events = _detect(stream, [])

    assert {e.rule for e in events} == {Rule.EXPLOSION}
    (explosion,) = _run_level(events, Rule.EXPLOSION)
    assert explosion.onset is not None
    assert explosion.onset.loss_step is None
    assert explosion.onset.global_step == 600
    assert explosion.onset.departed == len(LAYERS)


def test_loss_rule_thresholds_and_no_loss_at_all():
    stream = _quiet()
    stream["loss"][600] *= 8.0
    off = DetectorConfig.model_validate({"thresholds": {"loss": {"enabled": False}}})
    result = detect(None, _columns(stream, 0, STEPS), off)
    assert result.events == []

    no_loss = StepColumns(**{**_fields(_columns(stream, 0, STEPS)), "loss": None})
    assert detect(None, no_loss, DetectorConfig()).events == []
    nan_loss = StepColumns(**{**_fields(no_loss), "loss": np.full(STEPS, np.nan, np.float32)})
    state = detect(None, nan_loss, DetectorConfig()).state
    assert state.series == ("", *LAYERS)  # an all-NaN loss creates no loss series


def test_step_columns_reserve_the_loss_series_name_and_check_the_loss_shape():
    columns = _fields(_columns(_quiet(), 0, 3))
    with pytest.raises(ValueError, match="reserved"):
        StepColumns(**{**columns, "layers": ("\x00loss", *LAYERS[1:])})
    with pytest.raises(ValueError, match="loss"):
        StepColumns(**{**columns, "loss": np.ones(4)})


def test_detector_state_reads_version_1():
    """A state written before the loss rule: no departures, four rule columns."""
    result = detect(None, _columns(_planted(), 0, 400), DetectorConfig())
    state = result.state
    blob = state.to_bytes()
    body = zlib.decompress(blob[5:])
    size = len(state.series)
    names = sum(len(name.encode()) for name in state.series)
    head = 1 + 8 + 4 + 4
    arrays = head + 1 + 4 * size + names
    trigger = arrays + 6 * 8 * size
    rules = len(Rule)
    old_triggers = np.frombuffer(body, "<i8", size * rules, trigger).reshape(size, rules)[:, :4]
    v1 = (
        body[:head]
        + body[head + 1 : trigger]
        + old_triggers.tobytes()
        + body[trigger + 8 * size * rules + 8 * size :]
    )

    again = DetectorState.from_bytes(blob[:4] + bytes([1]) + zlib.compress(v1))

    assert again == state  # nothing had departed, and the loss rule had never fired
    assert again.to_bytes() == blob
    more = body[:head] + bytes([rules + 1]) + body[head + 1 :]
    with pytest.raises(StateFormatError, match="rules"):
        DetectorState.from_bytes(blob[:5] + zlib.compress(more))


# --------------------------------------------------------------------------- REST


def _post(client: TestClient, run_id: str, stream: dict, start: int, stop: int):
    body = make_batch(
        list(range(start, stop)),
        LAYERS,
        grad_norm=stream["grad_norm"][start:stop].tolist(),
        global_norm=stream["global_norm"][start:stop].tolist(),
        nonfinite=stream["nonfinite"][start:stop].tolist(),
        loss=stream["loss"][start:stop].tolist(),
    )
    response = post_batch(client, run_id, body)
    assert response.status_code == 200, response.text
    return body


def _events(client: TestClient, run_id: str, **params) -> list[dict]:
    response = client.get(f"/api/v1/runs/{run_id}/events", params={"limit": 1000, **params})
    assert response.status_code == 200, response.text
    return response.json()["events"]


@pytest.mark.parametrize("batch", [50, 7])
def test_onset_through_the_api_events_and_health(client, batch):
    run_id = create_run(client)
    stream = _planted()
    bodies = [
        _post(client, run_id, stream, start, min(start + batch, STEPS))
        for start in range(0, STEPS, batch)
    ]

    (event,) = _events(client, run_id, rule="explosion", layer="")
    onset = event["onset"]
    global_step = onset["global_step"]
    assert [(x["layer"], x["step"]) for x in onset["layers"]] == [("b", 501), ("a", 504)]
    assert [x["steps_before_global"] for x in onset["layers"]] == [
        global_step - 501,
        global_step - 504,
    ]
    assert onset["departed_layers"] == 2
    assert onset["loss_step"] is None
    assert onset["first_nonfinite_forward"] is None
    assert global_step == 505
    assert onset["summary"] == (
        "first: `b` at step 501, 4 steps before the global norm (2 layers off their "
        "baselines); loss at its baseline"
    )
    assert all(e["onset"] is None for e in _events(client, run_id) if e["layer"])

    health = client.get(f"/api/v1/runs/{run_id}/health").json()
    assert health["onset"] == f"explosion from step {event['first_step']:,}: {onset['summary']}"

    resent = post_batch(client, run_id, bodies[len(bodies) // 2 + 1])
    assert resent.json()["duplicate"] is True
    assert _events(client, run_id, rule="explosion", layer="") == [event]


def test_loss_spike_through_the_api(client):
    run_id = create_run(client)
    stream = _quiet()
    stream["loss"][600] *= 8.0
    for start in range(0, STEPS, 50):
        _post(client, run_id, stream, start, start + 50)

    (event,) = _events(client, run_id)
    assert (event["rule"], event["layer"], event["first_step"]) == ("loss", None, 600)
    assert event["onset"]["summary"] == "gradients quiet (global norm at its baseline)"
    health = client.get(f"/api/v1/runs/{run_id}/health").json()
    assert health["detections"]["loss"] == {"warning": 1, "critical": 0}
    assert health["onset"] == ("loss from step 600: gradients quiet (global norm at its baseline)")
    assert client.get(f"/api/v1/runs/{run_id}/events", params={"rule": "loss"}).status_code == 200


def test_onset_migration_keeps_existing_events(settings):
    """Events stored before revision 0005 stay valid, with no onset."""
    from importlib.resources import as_file, files

    from alembic import command
    from alembic.config import Config
    from sqlalchemy import inspect

    with TestClient(create_app(settings)) as client:
        run_id = create_run(client)
        stream = _planted()
        for start in range(0, STEPS, 50):
            _post(client, run_id, stream, start, start + 50)
        before = _events(client, run_id)
    engine = create_db_engine(settings.database_url)
    try:
        with (
            engine.begin() as connection,
            as_file(files("gradwatch.server.store") / "alembic.ini") as ini,
        ):
            config = Config(str(ini))
            config.attributes["connection"] = connection
            command.downgrade(config, "0004")
            columns = {c["name"] for c in inspect(connection).get_columns("events")}
            assert "onset" not in columns
            command.upgrade(config, "head")
    finally:
        engine.dispose()
    with TestClient(create_app(settings)) as client:
        after = _events(client, run_id)
        health = client.get(f"/api/v1/runs/{run_id}/health")

    assert [e["onset"] for e in after] == [None] * len(before)
    assert [{**e, "onset": None} for e in before] == after
    assert health.status_code == 200
    assert health.json()["onset"] is None
    assert any(e["onset"] for e in before)
    assert not math.isnan(after[0]["value"])
