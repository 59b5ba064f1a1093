"""The throughput simulator against closed forms, its invariants, scale, and calibration."""

from __future__ import annotations

import json
import time

import msgspec
import numpy as np
import pytest

from staleness.sim_calibrate import MeasuredRun, calibrate, prediction_error
from staleness.simulator import LengthDist, SimConfig, SimParams, main, simulate, write_trace

PARAMS = SimParams(decode_base=0.01, decode_per_seq=0.001, prefill_per_token=1e-5,
                   train_base=0.5, train_per_token=1e-5, sync_time=0.2)
HEAVY_TAIL = LengthDist(kind="lognormal", median=200, sigma=1.2)


def test_sync_one_engine_constant_lengths_matches_closed_form():
    B, G, L, P = 4, 4, 100, 10
    config = SimConfig(mode="sync", n_engines=1, batch_groups=B, group_size=G, steps=5, prompt_tokens=P,
                       lengths=LengthDist(value=L))
    result = simulate(config, PARAMS)
    n = B * G
    generation = PARAMS.prefill_per_token * P * n + L * (PARAMS.decode_base + PARAMS.decode_per_seq * n)
    train = PARAMS.train_base + PARAMS.train_per_token * n * (P + L)
    assert result.samples_per_s == pytest.approx(n / (generation + train + PARAMS.sync_time), rel=1e-12)
    assert result.max_staleness == 0 and result.tokens_wasted == 0


def test_async_with_bottleneck_trainer_runs_at_trainer_rate():
    slow_trainer = msgspec.structs.replace(PARAMS, train_base=5.0, train_per_token=0.0)
    config = SimConfig(mode="async", n_engines=4, batch_groups=4, group_size=4, eta=2, steps=8,
                       lengths=LengthDist(kind="uniform", low=20, high=200))
    result = simulate(config, slow_trainer)
    assert result.steady_samples_per_s == pytest.approx(16 / (5.0 + PARAMS.sync_time), rel=1e-9)
    assert result.trainer_busy_fraction > 0.9


def test_async_eta0_with_free_training_equals_sync_without_train_time():
    free_training = msgspec.structs.replace(PARAMS, train_base=0.0, train_per_token=0.0)
    common = dict(n_engines=3, batch_groups=4, group_size=4, steps=6, lengths=HEAVY_TAIL, seed=3)
    synchronous = simulate(SimConfig(mode="sync", eta=5, **common), free_training)
    asynchronous = simulate(SimConfig(mode="async", eta=0, **common), free_training)
    assert asynchronous.makespan_s == pytest.approx(synchronous.makespan_s, rel=1e-12)
    assert asynchronous.tokens_generated == synchronous.tokens_generated


@pytest.mark.parametrize("eta", [0, 1, 2])
def test_april_gives_nothing_on_constant_lengths(eta):
    # Engines saturated by the quota itself: over-provisioned groups cannot start before it is met.
    common = dict(n_engines=4, batch_groups=4, group_size=4, max_running=4, eta=eta, steps=10,
                  prompt_tokens=10, lengths=LengthDist(value=100))
    plain = simulate(SimConfig(mode="async", **common), PARAMS)
    april = simulate(SimConfig(mode="april", alpha=0.5, **common), PARAMS)
    assert april.samples_per_s / plain.samples_per_s == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("eta", [0, 1])
def test_april_beats_async_on_heavy_tails(eta):
    common = dict(n_engines=8, batch_groups=16, group_size=8, eta=eta, steps=15, max_new_tokens=4000, lengths=HEAVY_TAIL)
    plain = simulate(SimConfig(mode="async", **common), SimParams())
    april = simulate(SimConfig(mode="april", alpha=0.5, **common), SimParams())
    assert april.samples_per_s > 1.1 * plain.samples_per_s
    assert april.max_staleness <= eta


@pytest.mark.parametrize("mode", ["sync", "async", "april"])
@pytest.mark.parametrize("eta", [0, 1, 3])
def test_staleness_never_exceeds_eta(mode, eta):
    params = msgspec.structs.replace(PARAMS, decode_per_ctx_token=1e-7)
    config = SimConfig(mode=mode, n_engines=5, batch_groups=6, group_size=4, eta=eta, alpha=0.5, steps=12,
                       max_running=8, max_new_tokens=2000, lengths=HEAVY_TAIL, seed=eta)
    result = simulate(config, params)
    bound = 0 if mode == "sync" else eta
    assert result.max_staleness <= bound
    assert all(step.max_staleness <= bound and step.samples == 24 for step in result.steps)
    assert result.tokens_trained + result.tokens_wasted <= result.tokens_generated
    assert 0 < result.engine_busy_fraction <= 1 and 0 < result.trainer_busy_fraction <= 1


def test_thousand_engines_simulate_in_seconds():
    config = SimConfig(mode="april", n_engines=1024, batch_groups=128, group_size=8, eta=2, alpha=0.5, steps=20,
                       max_running=64, max_new_tokens=4000, lengths=LengthDist(kind="lognormal", median=300, sigma=1.0))
    start = time.perf_counter()
    result = simulate(config, SimParams(train_base=5.0, sync_time=2.0))
    assert time.perf_counter() - start < 5.0
    assert len(result.steps) == 20


def test_bad_configs_are_refused_with_the_field_name():
    with pytest.raises(ValueError, match="mode"):
        SimConfig(mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_engines"):
        SimConfig(n_engines=0)
    with pytest.raises(ValueError, match="sync_time"):
        SimParams(sync_time=float("nan"))
    with pytest.raises(ValueError, match="empirical"):
        LengthDist(kind="empirical", values=[])
    assert LengthDist.parse("empirical:values=5;80;900").values == [5, 80, 900]


def _measure(config: SimConfig, truth: SimParams, rng: np.random.Generator) -> MeasuredRun:
    """A stand-in for the orchestrator's metrics: true costs with 5% noise, the true model's throughput."""
    noisy = lambda seconds: float(seconds * rng.normal(1.0, 0.05))  # noqa: E731
    return MeasuredRun(
        mode=config.mode, eta=config.eta, alpha=config.alpha, n_engines=config.n_engines,
        batch_groups=config.batch_groups, group_size=config.group_size, max_running=config.max_running,
        prompt_tokens=config.prompt_tokens, max_new_tokens=config.max_new_tokens, lengths=config.lengths,
        steps=config.steps, measured_samples_per_s=simulate(config, truth).samples_per_s,
        decode_steps=[(b, noisy(truth.decode_base + truth.decode_per_seq * b)) for b in range(1, 65, 3)],
        train_steps=[(t, noisy(truth.train_base + truth.train_per_token * t)) for t in range(5000, 60000, 5000)],
        sync_seconds=[noisy(truth.sync_time) for _ in range(5)],
        prefill_steps=[(t, noisy(truth.prefill_per_token * t)) for t in (500, 2000, 8000)],
    )


def test_calibration_recovers_costs_and_predicts_within_15_percent():
    truth = SimParams(decode_base=0.015, decode_per_seq=4e-4, prefill_per_token=2e-6,
                      train_base=0.8, train_per_token=2e-5, sync_time=0.4)
    rng = np.random.default_rng(0)
    lengths = LengthDist(kind="empirical", values=[30, 60, 120, 250, 900])
    runs = [_measure(SimConfig(mode=mode, n_engines=4, batch_groups=8, group_size=4, eta=1, alpha=0.5, steps=8,
                               max_running=32, lengths=lengths), truth, rng) for mode in ("sync", "async", "april")]
    runs = msgspec.json.decode(msgspec.json.encode(runs), type=list[MeasuredRun])  # the wire form round-trips
    fitted = calibrate(runs)
    assert fitted.decode_per_seq == pytest.approx(truth.decode_per_seq, rel=0.25)
    assert fitted.train_base == pytest.approx(truth.train_base, rel=0.25)
    errors = prediction_error(fitted, runs)
    assert len(errors) == 3 and max(e.relative_error for e in errors) <= 0.15
    with pytest.raises(ValueError, match="decode step"):
        calibrate([msgspec.structs.replace(runs[0], decode_steps=[])])


def test_simulated_timeline_is_a_perfetto_trace_and_cli_prints_a_table(tmp_path, capsys):
    config = SimConfig(mode="april", n_engines=2, batch_groups=2, group_size=2, eta=1, alpha=0.5, steps=3,
                       lengths=HEAVY_TAIL)
    write_trace(simulate(config, PARAMS, record_spans=True), str(tmp_path / "sim.json"))
    events = json.loads((tmp_path / "sim.json").read_text())["traceEvents"]
    names = {e["args"]["name"] for e in events if e["ph"] == "M"}
    assert {"trainer", "weight-sync", "engine-0", "engine-1"} <= names
    assert sum(e["name"].startswith("train step") for e in events) == 3
    assert main(["--mode", "sync,async", "--engines", "2", "--steps", "3", "--batch-groups", "2"]) == 0
    assert "async eta=1" in capsys.readouterr().out
