"""Detector benchmark: ``detect()`` time per batch, state size, false-alarm rate, blow-up delay.

1. Speed: a run of ``--layers`` layers fed in batches of ``--steps`` steps of healthy
   lognormal norms; median and best ``detect()`` time per batch (after the baseline is warm),
   and the size and round-trip time of ``DetectorState.to_bytes()``.
2. False alarms with the default thresholds on healthy synthetic runs (lognormal noise with
   σ_log 0.3 to 1.0, slow drifts, AR(1) noise, many layers): events per 10,000 steps of one
   series, and per 10,000 steps of a run.
3. Delay of the explosion rule on slow exponential blow-ups (×1.002 to ×1.05 per step from a
   lognormal steady state of σ_log 0.1 to 0.3, onset at step 300 or 2000): steps from the
   onset to the first explosion trigger, min / median / max over seeds, and the growth of the
   norm by then (float32 overflows at 3.4e38).

    python -m bench.detect [--layers 500] [--steps 50] [--batches 200] [--quick]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np

from gradwatch.server.detect import (
    DetectorConfig,
    DetectorState,
    Rule,
    StepColumns,
    detect,
)
from tests.fakes import NormGenerator, ar1_norms

Generator = NormGenerator


def columns(first: int, norms: np.ndarray) -> StepColumns:
    """A batch whose global norm is the quadrature sum of ``norms`` (rows = steps)."""
    n, width = norms.shape
    return StepColumns(
        steps=np.arange(first, first + n, dtype=np.int64),
        layers=tuple(f"layer_{i}" for i in range(width)),
        global_norm=np.sqrt((norms.astype(np.float64) ** 2).sum(axis=1)).astype(np.float32),
        grad_norm=norms.astype(np.float32),
        nonfinite=np.zeros((n, width), np.int64),
        clip_coef=np.ones(n, np.float32),
        skipped=np.zeros(n, np.bool_),
    )


def lognormal(sigma: float) -> Generator:
    return lambda rng, steps, width: np.exp(sigma * rng.standard_normal((steps, width)))


def drift(sigma: float, factor: float) -> Generator:
    def make(rng: np.random.Generator, steps: int, width: int) -> np.ndarray:
        trend = np.linspace(0.0, math.log(factor), steps)[:, None]
        return np.exp(trend + sigma * rng.standard_normal((steps, width)))

    return make


SCENARIOS: dict[str, Generator] = {
    "lognormal σ0.3": lognormal(0.3),
    "lognormal σ0.5": lognormal(0.5),
    "lognormal σ1.0": lognormal(1.0),
    "drift ×10 up, σ0.3": drift(0.3, 10.0),
    "drift ×100 down, σ0.3": drift(0.3, 0.01),
    "AR(1) φ0.9 σ1.0": ar1_norms(0.9, 1.0),
    "AR(1) φ0.99 σ0.3": ar1_norms(0.99, 0.3),
    "AR(1) φ0.99 σ0.5": ar1_norms(0.99, 0.5),
}


def run_stream(norms: np.ndarray, batch: int, config: DetectorConfig) -> list:
    """All events of a stream fed in batches (continuations merged)."""
    state: DetectorState | None = None
    events: dict[tuple[Rule, str], list] = {}
    for first in range(0, len(norms), batch):
        result = detect(state, columns(first, norms[first : first + batch]), config)
        state = result.state
        for event in result.events:
            stored = events.setdefault((event.rule, event.layer), [])
            if event.continues:
                stored[-1] = stored[-1].merged(event)
            else:
                stored.append(event)
    return [event for stored in events.values() for event in stored]


def bench_speed(layers: int, steps: int, batches: int) -> None:
    rng = np.random.default_rng(0)
    config = DetectorConfig()
    norms = np.exp(0.3 * rng.standard_normal((steps * batches, layers)))
    state: DetectorState | None = None
    times = []
    for b in range(batches):
        batch = columns(b * steps, norms[b * steps : (b + 1) * steps])
        start = time.perf_counter()
        state = detect(state, batch, config).state
        times.append(time.perf_counter() - start)
    assert state is not None
    warm = times[len(times) // 4 :]
    start = time.perf_counter()
    blob = state.to_bytes()
    encode = time.perf_counter() - start
    start = time.perf_counter()
    DetectorState.from_bytes(blob)
    decode = time.perf_counter() - start
    print(f"detect(): {steps} steps × {layers} layers per batch, {batches} batches")
    print(
        f"  median {statistics.median(warm) * 1e3:.2f} ms, best {min(warm) * 1e3:.2f} ms "
        f"per batch ({statistics.median(warm) / (steps * (layers + 1)) * 1e9:.0f} ns/sample)"
    )
    print(
        f"  state: {len(blob)} bytes ({len(blob) / (layers + 1):.1f} per series), "
        f"to_bytes {encode * 1e3:.2f} ms, from_bytes {decode * 1e3:.2f} ms"
    )


def bench_false_alarms(seeds: int, steps: int, width: int) -> None:
    config = DetectorConfig()
    print(f"false alarms, default thresholds: {seeds} seeds × {steps} steps × {width} layers")
    total_events = total_series_steps = total_run_steps = 0
    for name, make in SCENARIOS.items():
        events = 0
        for seed in range(seeds):
            norms = make(np.random.default_rng(seed), steps, width)
            events += len(run_stream(norms, 50, config))
        series_steps = seeds * steps * (width + 1)
        total_events += events
        total_series_steps += series_steps
        total_run_steps += seeds * steps
        print(f"  {name:24s} {events:3d} events, {events / series_steps * 1e4:.3f} / 10k steps")
    print(
        f"  all: {total_events} events in {total_series_steps} series-steps: "
        f"{total_events / total_series_steps * 1e4:.3f} per 10k steps of a series, "
        f"{total_events / total_run_steps * 1e4:.2f} per 10k steps of a {width}-layer run"
    )


def blowup_delay(
    rate: float, sigma: float, onset: int, seed: int, config: DetectorConfig
) -> int | None:
    rng = np.random.default_rng(seed)
    length = onset + 6000
    log_norm = sigma * rng.standard_normal(length)
    log_norm[onset:] += math.log(rate) * np.arange(1, length - onset + 1)
    norms = np.exp(np.minimum(log_norm, 88.0))[:, None]
    for event in run_stream(norms, 50, config):
        if event.rule is Rule.EXPLOSION and event.layer == "layer_0":
            return event.first_step - onset + 1 if event.first_step >= onset else 0
    return None


def bench_blowups(seeds: int) -> None:
    config = DetectorConfig()
    print("slow blow-up, steps from onset to the first explosion (min / median / max):")
    for rate in (1.002, 1.005, 1.01, 1.05):
        for sigma in (0.1, 0.3):
            for onset in (300, 2000):
                delays = [blowup_delay(rate, sigma, onset, seed, config) for seed in range(seeds)]
                found = sorted(d for d in delays if d is not None)
                missed = len(delays) - len(found)
                if not found:
                    print(f"  ×{rate}/step σ{sigma} onset {onset}: missed")
                    continue
                median = statistics.median(found)
                print(
                    f"  ×{rate}/step σ{sigma} onset {onset:4d}: {found[0]} / {median:.0f} / "
                    f"{found[-1]} steps (norm ×{rate**median:.3g} by then; overflow after "
                    f"{math.log(3.4e38) / math.log(rate):.0f})"
                    + (f", {missed} missed" if missed else "")
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=500)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="fewer seeds and steps")
    args = parser.parse_args()
    bench_speed(args.layers, args.steps, args.batches)
    if args.quick:
        bench_false_alarms(seeds=1, steps=2000, width=50)
        bench_blowups(seeds=3)
    else:
        bench_false_alarms(seeds=3, steps=5000, width=100)
        bench_blowups(seeds=10)


if __name__ == "__main__":
    main()
