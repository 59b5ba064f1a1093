"""Fit the simulator's costs to measured runs, and say how well it then predicts them.

Why: the simulator is only worth trusting for a sweep once it reproduces the
runs it was fitted on; `prediction_error` is that check (target: within 15%).
The orchestrator turns its metrics into `MeasuredRun`s; everything here is
plain least squares on those samples, nothing is fitted to throughput itself.
"""

from __future__ import annotations

import msgspec
import numpy as np

from staleness.simulator import LengthDist, Mode, SimConfig, SimParams, simulate


class MeasuredRun(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One measured run: its configuration, its throughput, and raw timing samples.

    decode_steps: (running batch size, seconds) per decode step (or averaged per batch size).
    prefill_steps: (prompt + partial tokens prefilled, seconds); optional.
    train_steps: (prompt + response tokens in the batch, seconds) per trainer step.
    sync_seconds: engine pause of each weight sync.
    lengths: the response lengths seen; `LengthDist(kind="empirical", values=[...])` replays them.
    """

    mode: Mode
    eta: int
    alpha: float = 0.0
    n_engines: int
    batch_groups: int
    group_size: int
    max_running: int
    prompt_tokens: int
    max_new_tokens: int
    lengths: LengthDist
    steps: int
    measured_samples_per_s: float
    decode_steps: list[tuple[int, float]]
    train_steps: list[tuple[int, float]]
    sync_seconds: list[float]
    prefill_steps: list[tuple[int, float]] = msgspec.field(default_factory=list)
    label: str = ""

    def config(self, seed: int = 0) -> SimConfig:
        return SimConfig(mode=self.mode, n_engines=self.n_engines, batch_groups=self.batch_groups,
                         group_size=self.group_size, eta=self.eta, alpha=self.alpha, steps=self.steps,
                         max_running=self.max_running, prompt_tokens=self.prompt_tokens,
                         max_new_tokens=self.max_new_tokens, lengths=self.lengths, seed=seed)


class PredictionError(msgspec.Struct, frozen=True):
    label: str
    measured_samples_per_s: float
    predicted_samples_per_s: float
    relative_error: float


def _fit_line(samples: list[tuple[float, float]], what: str) -> tuple[float, float]:
    """Non-negative (intercept, slope); one distinct x cannot separate them, so it is all slope."""
    if not samples:
        raise ValueError(f"calibrate: no {what} samples in any measured run")
    x, y = np.asarray(samples, dtype=float).T
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError(f"calibrate: non-finite {what} samples")
    if np.unique(x).size < 2:
        return 0.0, float(np.mean(y) / np.mean(x)) if np.mean(x) > 0 else 0.0
    (intercept, slope), *_ = np.linalg.lstsq(np.column_stack([np.ones_like(x), x]), y, rcond=None)
    if slope < 0:
        return float(max(np.mean(y), 0.0)), 0.0
    if intercept < 0:
        return 0.0, float(max(x @ y / (x @ x), 0.0))
    return float(intercept), float(slope)


def calibrate(measured_runs: list[MeasuredRun], base: SimParams = SimParams()) -> SimParams:
    """Fit decode, train and sync costs (and prefill, when measured) over all runs pooled.

    The per-context-token decode cost is kept from `base`: batch-size samples alone cannot separate it.
    """
    runs = list(measured_runs)
    decode_base, decode_per_seq = _fit_line([s for r in runs for s in r.decode_steps], "decode step")
    train_base, train_per_token = _fit_line([s for r in runs for s in r.train_steps], "train step")
    syncs = [s for r in runs for s in r.sync_seconds]
    prefills = [s for r in runs for s in r.prefill_steps]
    prefill_per_token = base.prefill_per_token
    if prefills:
        tokens, seconds = np.asarray(prefills, dtype=float).T
        prefill_per_token = float(max(tokens @ seconds / (tokens @ tokens), 0.0)) if tokens.any() else 0.0
    return msgspec.structs.replace(
        base, decode_base=decode_base, decode_per_seq=decode_per_seq, train_base=train_base,
        train_per_token=train_per_token, prefill_per_token=prefill_per_token,
        sync_time=float(np.mean(syncs)) if syncs else base.sync_time,
    )


def prediction_error(params: SimParams, measured_runs: list[MeasuredRun], seed: int = 0) -> list[PredictionError]:
    """Relative error |predicted - measured| / measured of samples/s, one row per run."""
    rows = []
    for i, run in enumerate(measured_runs):
        if not run.measured_samples_per_s > 0:
            raise ValueError(f"measured run {run.label or i}: measured_samples_per_s must be > 0")
        predicted = simulate(run.config(seed), params).samples_per_s
        rows.append(PredictionError(run.label or f"{run.mode} eta={run.eta} alpha={run.alpha} E={run.n_engines}",
                                    run.measured_samples_per_s, predicted,
                                    abs(predicted - run.measured_samples_per_s) / run.measured_samples_per_s))
    return rows
