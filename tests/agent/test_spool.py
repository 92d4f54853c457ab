"""Spool: batches on disk, oldest step first, capped in bytes, surviving a reopen."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from gradwatch.agent.records import StepBatch
from gradwatch.agent.spool import Spool, SpoolState, default_spool_dir
from gradwatch.agent.transport import RunInfo

RUN = RunInfo(run_id="00000000-0000-4000-8000-000000000001", name="s", project="p")


def _wire(first_step: int, steps: int = 2) -> dict:
    return StepBatch(
        layers=("a", "b"),
        step=np.arange(first_step, first_step + steps, dtype=np.int64),
        loss=np.zeros(steps, np.float32),
        loss_known=np.zeros(steps, bool),
        global_norm=np.full(steps, np.inf, np.float32),
        global_norm_clipped=np.ones(steps, np.float32),
        clip_coef=np.ones(steps, np.float32),
        skipped=np.zeros(steps, bool),
        grad_norm=np.ones((steps, 2), np.float32),
        nonfinite=np.zeros((steps, 2), np.int64),
    ).to_wire()


def _drain(spool: Spool) -> list[dict]:
    out = []
    while (found := spool.peek()) is not None:
        entry, wire = found
        assert wire is not None
        out.append(wire)
        spool.remove(entry)
    return out


def test_spool_returns_batches_oldest_step_first(tmp_path):
    spool = Spool(tmp_path, RUN.run_id, 2**30)
    for first in (40, 0, 20, 1_000_000_000_000):
        spool.put(_wire(first))
    assert len(spool) == 4
    assert [w["step"][0] for w in _drain(spool)] == [0, 20, 40, 1_000_000_000_000]
    assert len(spool) == 0
    assert spool.size_bytes == 0


def test_spool_keeps_the_wire_batch_losslessly(tmp_path):
    spool = Spool(tmp_path, RUN.run_id, 2**30)
    wire = _wire(7)
    spool.put(wire)
    assert _drain(spool) == [wire]  # "Infinity" strings and all


def test_spool_reopened_sees_the_batches_and_state_left_behind(tmp_path):
    first = Spool(tmp_path, RUN.run_id, 2**30)
    first.save_state(SpoolState(RUN, "failed", {"queue_full": 2}))
    first.put(_wire(4))
    first.put(_wire(2))
    reopened = Spool(tmp_path, RUN.run_id, 2**30)
    assert [e.first_step for e in reopened.entries()] == [2, 4]
    assert reopened.size_bytes == first.size_bytes
    assert reopened.load_state() == SpoolState(RUN, "failed", {"queue_full": 2})


def test_spool_deletes_exactly_the_oldest_batches_over_its_cap(tmp_path):
    probe = Spool(tmp_path / "probe", RUN.run_id, 2**30)
    probe.put(_wire(0))
    cap = int(3.5 * probe.size_bytes)  # three batches fit
    spool = Spool(tmp_path, RUN.run_id, cap)
    evicted = []
    for first in range(0, 20, 2):
        evicted += spool.put(_wire(first))
    assert [e.first_step for e in evicted] == [0, 2, 4, 6, 8, 10, 12]
    assert [e.first_step for e in spool.entries()] == [14, 16, 18]
    assert spool.size_bytes <= cap
    files = sorted(p.name for p in spool.directory.glob("*.json.gz"))
    assert files == [e.filename for e in spool.entries()]


def test_spool_drops_a_batch_larger_than_the_cap_at_once(tmp_path):
    spool = Spool(tmp_path, RUN.run_id, 10)
    evicted = spool.put(_wire(0))
    assert [e.first_step for e in evicted] == [0]
    assert len(spool) == 0
    assert not list(spool.directory.glob("*.json.gz"))


def test_spool_put_of_the_same_batch_replaces_it(tmp_path):
    spool = Spool(tmp_path, RUN.run_id, 2**30)
    wire = _wire(3)
    spool.put(wire)
    spool.put(wire)
    assert len(spool) == 1
    assert spool.size_bytes == spool.entries()[0].size_bytes


def test_spool_peek_returns_none_for_an_unreadable_file(tmp_path):
    spool = Spool(tmp_path, RUN.run_id, 2**30)
    spool.put(_wire(5))
    entry = spool.entries()[0]
    (spool.directory / entry.filename).write_bytes(gzip.compress(b"{not json"))
    assert spool.peek() == (entry, None)


def test_spool_skips_a_file_removed_by_another_process(tmp_path):
    spool = Spool(tmp_path, RUN.run_id, 2**30)
    spool.put(_wire(1))
    spool.put(_wire(3))
    (spool.directory / spool.entries()[0].filename).unlink()
    found = spool.peek()
    assert found is not None
    assert found[0].first_step == 3
    assert len(spool) == 1


def test_spool_ignores_temporary_and_foreign_files(tmp_path):
    directory = tmp_path / RUN.run_id
    directory.mkdir()
    (directory / ".00000000000000000001-x.json.gz.123.tmp").write_bytes(b"partial")
    (directory / "notes.txt").write_text("hello")
    (directory / "1-00000000-0000-4000-8000-000000000000.json.gz").write_bytes(b"unpadded")
    assert len(Spool(tmp_path, RUN.run_id, 2**30)) == 0


def test_spool_opening_creates_nothing_and_discard_removes_an_empty_directory(tmp_path):
    spool = Spool(tmp_path, RUN.run_id, 2**30)
    assert not spool.directory.exists()
    spool.save_state(SpoolState(RUN))
    spool.put(_wire(0))
    assert not spool.discard_if_empty()
    _drain(spool)
    assert spool.discard_if_empty()
    assert not spool.directory.exists()


def test_spool_state_round_trips_and_rejects_garbage(tmp_path):
    state = SpoolState(RUN, None, {"spool_full": 4})
    assert SpoolState.from_json(json.loads(json.dumps(state.to_json()))) == state
    with pytest.raises(ValueError, match="not a spool state"):
        SpoolState.from_json({"run": {"name": "x"}})
    spool = Spool(tmp_path, RUN.run_id, 2**30)
    spool.directory.mkdir(parents=True)
    (spool.directory / "state.json").write_text("[1, 2")
    assert spool.load_state() is None


def test_default_spool_dir_is_under_the_user_cache_dir():
    import platformdirs

    assert default_spool_dir() == Path(platformdirs.user_cache_dir("gradwatch")) / "spool"
