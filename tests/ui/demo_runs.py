"""The demo's two runs (stable, exploding), made without TensorFlow and posted over HTTP.

Shaped like ``gradwatch demo``'s runs (``server/cli/demo.py``): a three-layer MLP, 320 steps
in batches of 25, ``clip.global_norm(5.0)``, weight statistics every 50 steps. The exploding
run is calm for 80% of its steps (the detectors learn its baseline), then
``demo_mlp/hidden_2`` blows up first (×4 a step from step 256), the other layers follow
four steps later (×2 a step), and its last steps overflow to +Inf with NaN gradient values;
the first of them comes with an incident bundle's announcement.
Built from :class:`gradwatch.agent.records.StepBatch` (what the agent sends), so the server
runs its real ingest and detectors.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import httpx
import numpy as np

from gradwatch.agent.records import StepBatch

LAYERS = ("demo_mlp/hidden_1", "demo_mlp/hidden_2", "demo_mlp/output")
EXPLODING_LAYER = "demo_mlp/hidden_2"
STEPS = 320
FLUSH_EVERY = 25
EXPLODE_AT = 256
CLIP = 5.0


@dataclass(frozen=True, slots=True)
class DemoRun:
    """A posted run: its id and name."""

    run_id: str
    name: str


def _norms(exploding: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``[STEPS, 3]`` per-layer norms and non-finite counts."""
    rng = np.random.default_rng(seed)
    base = np.array([0.8, 0.5, 0.3])
    norms = base * rng.lognormal(0.0, 0.08, size=(STEPS, len(LAYERS)))
    nonfinite = np.zeros((STEPS, len(LAYERS)), dtype=np.int64)
    if exploding:
        steps = np.arange(STEPS)
        first = np.clip(steps - EXPLODE_AT, 0, None)
        later = np.clip(steps - EXPLODE_AT - 4, 0, None)
        norms[:, 1] *= 4.0**first
        norms[:, 0] *= 2.0**later
        norms[:, 2] *= 2.0**later
        overflow = norms > 1e30  # float32 overflows at 3.4e38; the agent reports such as Inf
        norms[overflow] = np.inf
        nonfinite[overflow] = 7
    return norms.astype(np.float32), nonfinite


def batches(exploding: bool, seed: int = 0) -> list[StepBatch]:
    """The run's batches, in step order."""
    norms, nonfinite = _norms(exploding, seed)
    with np.errstate(over="ignore", invalid="ignore"):
        global_norm = np.sqrt((norms.astype(np.float64) ** 2).sum(axis=1)).astype(np.float32)
        coef = np.where(global_norm > CLIP, CLIP / global_norm, 1.0).astype(np.float32)
    coef[~np.isfinite(global_norm)] = 0.0
    clipped = np.minimum(global_norm, CLIP).astype(np.float32)
    loss = (0.5 * np.exp(-np.arange(STEPS) / 120) + 0.05).astype(np.float32)
    if exploding:
        loss[EXPLODE_AT:] *= np.minimum(1.25 ** np.arange(STEPS - EXPLODE_AT), 1e6)
    weights_known = np.arange(STEPS) % 50 == 0
    weight_norm = np.tile(np.array([4.0, 3.0, 1.0], dtype=np.float32), (STEPS, 1))
    with np.errstate(invalid="ignore"):
        update_ratio = (1e-3 * norms / np.maximum(norms.max(axis=0), 1)).astype(np.float32)
    out = []
    bad = np.flatnonzero(~np.isfinite(global_norm))
    for first in range(0, STEPS, FLUSH_EVERY):
        s = slice(first, first + FLUSH_EVERY)
        n = len(range(STEPS)[s])
        out.append(
            StepBatch(
                layers=LAYERS,
                step=np.arange(first, first + n, dtype=np.int64),
                loss=loss[s],
                loss_known=np.ones(n, dtype=bool),
                global_norm=global_norm[s],
                global_norm_clipped=clipped[s],
                clip_coef=coef[s],
                skipped=~np.isfinite(global_norm[s]),
                grad_norm=norms[s],
                nonfinite=nonfinite[s],
                weight_norm=weight_norm[s],
                update_ratio=np.nan_to_num(update_ratio[s], posinf=1.0),
                weights_known=weights_known[s],
                incidents=tuple(
                    # announced, then again with the rows after it (one read held both)
                    _incident(int(step), after)
                    for step in bad[:1]
                    for after in (False, True)
                    if first <= step < first + n
                ),
            )
        )
    return out


def _incident(step: int, after: bool = False) -> dict[str, object]:
    """The agent's announcement of the first non-finite step's bundle, with the recorder's
    rows up to it, or (``after``) again with the rows of the three steps after it, whose
    learning rate is ×10."""
    steps = [step + 1, step + 2, step + 3] if after else [step - 2, step - 1, step]
    return {
        "step": step,
        "cause": "nonfinite",
        "path": f"/home/me/gradwatch-runs/incidents/demo/step-{step}",
        "host": "trainer-1",
        "bytes": 3 * 2**20,
        "format": "gradwatch-incident/1",
        "learning_rate": 0.05,
        "recorded": {
            "step": steps,
            "learning_rate": [0.5 if after else 0.05] * 3,
            "loss_scale": [None, None, None],
            "epoch": [0, 0, 0],
            "step_in_epoch": steps,
        },
    }


def post_run(client: httpx.Client, name: str, exploding: bool, status: str = "finished") -> DemoRun:
    """Create the run, post every batch, set its status."""
    run_id = str(uuid.uuid4())
    client.post("/api/v1/runs", json={"run_id": run_id, "name": name, "project": "demo"})
    for batch in batches(exploding):
        reply = client.post(f"/api/v1/runs/{run_id}/batches", json=batch.to_wire())
        reply.raise_for_status()
    if status != "running":
        client.patch(f"/api/v1/runs/{run_id}", json={"status": status}).raise_for_status()
    return DemoRun(run_id, name)
