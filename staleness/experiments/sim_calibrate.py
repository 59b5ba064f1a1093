"""Fit the simulator's costs to measured runs, and say how well it then predicts them.

Why: the simulator is only worth trusting for a sweep once it reproduces the
runs it was fitted on; `prediction_error` is that check (target: within 15%).
`read_run` turns a run folder into a `MeasuredRun`; everything here is plain
(non-negative) least squares or means of timing samples, nothing is fitted to
throughput itself.

    python -m staleness.experiments.sim_calibrate RUN_DIR... [--fit-on RUN_DIR...]
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Collection, Sequence
from pathlib import Path

import msgspec
import numpy as np

from staleness.experiments.simulator import LengthDist, Mode, SimConfig, SimParams, SimResult, simulate


class EngineSnapshot(msgspec.Struct, frozen=True, array_like=True):
    """An engine's cumulative counters at one moment (the embedded engine's /get_server_info internal state)."""

    time: float
    decode_forwards: int
    generated_tokens: int
    finished_requests: int
    running: int
    waiting: int


class MeasuredRun(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One measured run: its configuration, its throughput, and raw timing samples.

    decode_steps: (running batch size, seconds) per decode step (or averaged per batch size).
    prefill_steps: (prompt + partial tokens prefilled, seconds); optional.
    request_steps: (requests sent at once, seconds until every one is answered) for requests of
        one new token each: their slope is the per-request cost on the engine; optional.
    train_steps: (prompt + response tokens in the batch, seconds) per trainer step.
    sync_seconds: engine pause of each weight sync.
    lengths: the response lengths seen; `LengthDist(kind="empirical", values=[...])` replays them.
    engine_counters: per engine, its counters polled during the run (wall-clock times): the decode
        costs are then fitted on them (see fit_engine_counters) instead of on decode_steps, and so is
        the engines' slowdown while the trainer trains (and the per-request cost, if no request_steps).
    train_windows: (start, end) wall-clock times of every train step, to tell which engine intervals
        overlapped training.
    train_busy: per train_steps sample, the fraction of engines that had work during that step; with
        it the train cost is fitted as base + per token + train_busy_engines x busy fraction.
    group_latencies / admission_latencies / trainer_overheads: measured hand-off delays (see SimParams); optional.
    rate_from_step: None when measured_samples_per_s is trained samples / whole run; k when it is
        the rate between the end of step k + 1 and the last (start-up left out, as the benchmarks measure).
    drops_free_admission: how the measured system treated dropped groups (see SimConfig).
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
    request_steps: list[tuple[int, float]] = msgspec.field(default_factory=list)
    engine_counters: list[list[EngineSnapshot]] = msgspec.field(default_factory=list)
    train_windows: list[tuple[float, float]] = msgspec.field(default_factory=list)
    train_busy: list[float] = msgspec.field(default_factory=list)
    group_latencies: list[float] = msgspec.field(default_factory=list)
    admission_latencies: list[float] = msgspec.field(default_factory=list)
    trainer_overheads: list[float] = msgspec.field(default_factory=list)
    rate_from_step: int | None = None
    drops_free_admission: bool = True
    label: str = ""

    def config(self, seed: int = 0) -> SimConfig:
        return SimConfig(
            mode=self.mode,
            n_engines=self.n_engines,
            batch_groups=self.batch_groups,
            group_size=self.group_size,
            eta=self.eta,
            alpha=self.alpha,
            steps=self.steps,
            max_running=self.max_running,
            prompt_tokens=self.prompt_tokens,
            max_new_tokens=self.max_new_tokens,
            lengths=self.lengths,
            drops_free_admission=self.drops_free_admission,
            seed=seed,
        )


class PredictionError(msgspec.Struct, frozen=True):
    label: str
    measured_samples_per_s: float
    predicted_samples_per_s: float
    relative_error: float


def _fit_line(samples: Sequence[tuple[float, float]], what: str) -> tuple[float, float]:
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


def _nonnegative_lstsq(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """min |a x - y| with x >= 0, exactly, by trying every subset of columns (there are three)."""
    best, best_residual = np.zeros(a.shape[1]), float(y @ y)
    for k in range(1, a.shape[1] + 1):
        for columns in itertools.combinations(range(a.shape[1]), k):
            coef, *_ = np.linalg.lstsq(a[:, columns], y, rcond=None)
            residual = float(np.sum((a[:, columns] @ coef - y) ** 2))
            if np.all(coef >= 0) and residual < best_residual:
                best, best_residual = np.zeros(a.shape[1]), residual
                best[list(columns)] = coef
    return best


def _overlap(start: float, end: float, windows: list[tuple[float, float]]) -> float:
    """Fraction of [start, end] covered by the (disjoint) windows."""
    covered = sum(max(0.0, min(end, b) - max(start, a)) for a, b in windows)
    return covered / (end - start) if end > start else 0.0


def engine_intervals(run: MeasuredRun) -> list[tuple[int, int, int, float, float]]:
    """(decode steps, rows decoded, requests, fraction spent training, seconds) per busy poll interval.

    Only intervals at both ends of which the engine had work count (it never idled in between: rows
    only leave a batch it is decoding). Rows decoded = tokens - rows admitted (a prefill makes each
    admitted row's first token); rows admitted = finished + change in running; requests = admitted +
    change in waiting.
    """
    intervals = []
    for snapshots in run.engine_counters:
        for before, after in zip(snapshots, snapshots[1:]):
            if before.running + before.waiting == 0 or after.running + after.waiting == 0 or after.time <= before.time:
                continue
            finished = after.finished_requests - before.finished_requests
            admitted = finished + after.running - before.running
            intervals.append(
                (
                    after.decode_forwards - before.decode_forwards,
                    after.generated_tokens - before.generated_tokens - admitted,
                    admitted + after.waiting - before.waiting,
                    _overlap(before.time, after.time, run.train_windows),
                    after.time - before.time,
                )
            )
    return intervals


def fit_engine_counters(runs: list[MeasuredRun]) -> tuple[float, float, float, float]:
    """(decode_base, decode_per_seq, prefill_per_seq, engine_slowdown_training) from polled counters.

    Each busy interval is one equation: seconds = (decode_base x steps + decode_per_seq x rows decoded
    + prefill_per_seq x requests) x (1 + slowdown x fraction of it the trainer spent training).
    The costs are fitted (non-negative least squares) on the intervals without training, then the
    slowdown on the others, so every number is measured under the run's own conditions.
    """
    data = np.asarray([i for run in runs for i in engine_intervals(run)], dtype=float).reshape(-1, 5)
    if not np.all(np.isfinite(data)):
        raise ValueError("calibrate: non-finite engine counters")
    alone, training = data[data[:, 3] == 0], data[data[:, 3] > 0]
    if len(alone) < 3:
        raise ValueError(f"calibrate: {len(alone)} busy engine intervals without training, need at least 3")
    costs = _nonnegative_lstsq(alone[:, :3], alone[:, 4])
    slowdown = 0.0
    if len(training):
        stretched = (training[:, :3] @ costs) * training[:, 3]
        if stretched @ stretched > 0:
            slowdown = max(0.0, float((training[:, 4] - training[:, :3] @ costs) @ stretched / (stretched @ stretched)))
    return float(costs[0]), float(costs[1]), float(costs[2]), slowdown


def calibrate(measured_runs: list[MeasuredRun], base: SimParams = SimParams()) -> SimParams:
    """Fit every measured cost over all runs pooled; what a run did not measure is kept from `base`.

    Decode costs come from the engine counters when any run has them, else from decode_steps; the
    per-request cost from request_steps when measured (a step's requests arrive in a burst, mostly
    while the engine is idle, which busy-interval counters cannot time), else from the counters.
    A request burst's intercept is one round trip, which delays but does not occupy the engine; only
    its slope (engine time per request) enters the model. The per-context-token decode cost is kept
    from `base`: batch-size samples alone cannot separate it.
    """
    runs = list(measured_runs)
    engine_slowdown_training = base.engine_slowdown_training
    requests = [s for r in runs for s in r.request_steps]
    if any(r.engine_counters for r in runs):
        decode_base, decode_per_seq, prefill_per_seq, engine_slowdown_training = fit_engine_counters(runs)
    else:
        decode_base, decode_per_seq = _fit_line([s for r in runs for s in r.decode_steps], "decode step")
        prefill_per_seq = base.prefill_per_seq
    if requests:  # bursts of requests land on an idle engine, where polled counters cannot see them
        prefill_per_seq = _fit_line(requests, "request burst")[1]
    train_busy_engines = base.train_busy_engines
    if all(len(r.train_busy) == len(r.train_steps) for r in runs) and any(r.train_busy for r in runs):
        tokens_seconds = np.asarray([s for r in runs for s in r.train_steps], dtype=float)
        busy = np.asarray([b for r in runs for b in r.train_busy], dtype=float)
        columns = np.column_stack([np.ones(len(busy)), tokens_seconds[:, 0], busy])
        train_base, train_per_token, train_busy_engines = map(float, _nonnegative_lstsq(columns, tokens_seconds[:, 1]))
    else:
        train_base, train_per_token = _fit_line([s for r in runs for s in r.train_steps], "train step")
    syncs = [s for r in runs for s in r.sync_seconds]
    prefills = [s for r in runs for s in r.prefill_steps]
    prefill_per_token = base.prefill_per_token
    if prefills:
        tokens, seconds = np.asarray(prefills, dtype=float).T
        prefill_per_token = float(max(tokens @ seconds / (tokens @ tokens), 0.0)) if tokens.any() else 0.0
    return msgspec.structs.replace(
        base,
        decode_base=decode_base,
        decode_per_seq=decode_per_seq,
        train_base=train_base,
        train_per_token=train_per_token,
        prefill_per_token=prefill_per_token,
        prefill_per_seq=prefill_per_seq,
        engine_slowdown_training=engine_slowdown_training,
        train_busy_engines=train_busy_engines,
        group_latency=_mean([x for r in runs for x in r.group_latencies], base.group_latency),
        admission_latency=_mean([x for r in runs for x in r.admission_latencies], base.admission_latency),
        trainer_overhead=_mean([x for r in runs for x in r.trainer_overheads], base.trainer_overhead),
        sync_time=_mean(syncs, base.sync_time),
    )


def _mean(values: list[float], default: float) -> float:
    return float(np.mean(values)) if values else default


def simulated_rate(result: SimResult, rate_from_step: int | None) -> float:
    """The simulated counterpart of a measured rate: see MeasuredRun.rate_from_step."""
    if rate_from_step is None:
        return result.samples_per_s
    window = result.steps[rate_from_step:]
    if len(window) < 2:
        raise ValueError(f"rate_from_step={rate_from_step} leaves fewer than 2 of {len(result.steps)} steps")
    return sum(r.samples for r in window[1:]) / (window[-1].sync_end_s - window[0].sync_end_s)


def prediction_error(params: SimParams, measured_runs: list[MeasuredRun], seed: int = 0) -> list[PredictionError]:
    """Relative error |predicted - measured| / measured of samples/s, one row per run."""
    rows = []
    for i, run in enumerate(measured_runs):
        if not run.measured_samples_per_s > 0:
            raise ValueError(f"measured run {run.label or i}: measured_samples_per_s must be > 0")
        predicted = simulated_rate(simulate(run.config(seed), params), run.rate_from_step)
        rows.append(
            PredictionError(
                run.label or f"{run.mode} eta={run.eta} alpha={run.alpha} E={run.n_engines}",
                run.measured_samples_per_s,
                predicted,
                abs(predicted - run.measured_samples_per_s) / run.measured_samples_per_s,
            )
        )
    return rows


ENGINE_COUNTERS_FILE = "engine_counters.json"  # list (per engine) of lists of EngineSnapshot
ENGINE_PROBE_FILE = "engine_probe.json"  # EngineCosts of a probe engine timed next to the run
PUBLISH_SLACK_S = 0.005  # a step's metrics line is written this soon after its weights are published


class EngineCosts(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Timing samples of an engine measured on its own (a run folder has none): see MeasuredRun."""

    decode_steps: list[tuple[int, float]] = msgspec.field(default_factory=list)
    request_steps: list[tuple[int, float]] = msgspec.field(default_factory=list)
    prefill_steps: list[tuple[int, float]] = msgspec.field(default_factory=list)


def read_run(
    run_dir: str | Path,
    engine: EngineCosts | None = None,
    *,
    skip_steps: int = 2,
    drops_free_admission: bool = True,
    label: str = "",
) -> MeasuredRun:
    """A MeasuredRun from an `async-rl run` folder: config.json, metrics.jsonl, the buffer's log, and
    what benchmarks/sim_calibration.py adds: the engine counters it polls (ENGINE_COUNTERS_FILE) and
    its probe engine's costs (ENGINE_PROBE_FILE, used when `engine` is None).

    Train and sync samples skip the first `skip_steps` steps (start-up: first forward passes, empty
    pipeline), and the measured rate is taken between the end of step skip_steps + 1 and the last, as
    benchmarks/e2e_async_vs_sync.py does. Response lengths are every finished response the buffer
    received, replayed as an empirical distribution.
    """
    from async_rl.config import RunConfig
    from async_rl.messages import MessageError, Trajectory, decode
    from async_rl.metrics import read_metrics
    from buffer.wal import Put, Served, read_records

    run_dir = Path(run_dir)
    try:
        config = msgspec.json.decode((run_dir / "config.json").read_bytes(), type=RunConfig)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as err:
        raise ValueError(f"{run_dir}: no readable config.json: {err}") from err
    try:
        records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "samples" in r and "step_seconds" in r]
    except OSError as err:
        raise ValueError(f"{run_dir}: no readable metrics.jsonl: {err}") from err
    if len(records) < skip_steps + 2:
        raise ValueError(f"{run_dir}: {len(records)} steps logged, need more than skip_steps + 1 = {skip_steps + 1}")
    window = records[skip_steps:]
    rate = sum(r["samples"] for r in window[1:]) / (window[-1]["time"] - window[0]["time"])

    buffer_dir = Path(config.buffer.dir) if config.buffer.dir else run_dir / "buffer"
    responses, prompts, finished, submitted, served = {}, [], {}, [], {}
    for record in read_records(buffer_dir / "buffer.wal")[0]:
        if isinstance(record, Served):
            served[record.trainer_version] = record.sample_ids
        if not isinstance(record, Put):
            continue
        try:
            trajectory = decode(record.frame)
        except MessageError:
            continue
        if isinstance(trajectory, Trajectory) and not trajectory.partial and trajectory.response_ids:
            responses[trajectory.sample_id] = len(trajectory.response_ids)
            prompts.append(len(trajectory.prompt_ids))
            finished[trajectory.sample_id] = trajectory.timings.finished
            submitted.append(trajectory.timings.submitted)
    if not responses:
        raise ValueError(f"{run_dir}: the buffer log holds no finished trajectory")

    counters_path, probe_path = run_dir / ENGINE_COUNTERS_FILE, run_dir / ENGINE_PROBE_FILE
    counters = (
        msgspec.json.decode(counters_path.read_bytes(), type=list[list[EngineSnapshot]])
        if counters_path.exists()
        else []
    )
    if engine is None:
        engine = (
            msgspec.json.decode(probe_path.read_bytes(), type=EngineCosts) if probe_path.exists() else EngineCosts()
        )
    # The step is logged after its weight sync: training ran from end - sync - step_seconds to end - sync.
    train_ends = [r["time"] - r.get("weight_sync/seconds", 0.0) for r in records]
    windows = [(end - r["step_seconds"], end) for end, r in zip(train_ends, records)]
    busy = [_busy_fraction(counters, *window) for window in windows[skip_steps:]] if counters else []
    group_latencies, admission_latencies, trainer_overheads = _hand_offs(
        records, windows, served, finished, sorted(submitted), skip_steps
    )
    mode: Mode = "april" if config.april.enabled else "sync" if config.run.sync else "async"
    return MeasuredRun(
        mode=mode,
        eta=config.staleness.eta,
        alpha=config.april.alpha if config.april.enabled else 0.0,
        n_engines=config.engine.count,
        batch_groups=config.trainer.groups_per_step,
        group_size=config.rollout.group_size,
        max_running=config.engine.max_running_requests,
        prompt_tokens=round(float(np.mean(prompts))),
        max_new_tokens=config.rollout.max_new_tokens,
        lengths=LengthDist(kind="empirical", values=sorted(responses.values())),
        steps=len(records),
        measured_samples_per_s=rate,
        rate_from_step=skip_steps,
        # tokens_per_s * step_seconds: prompt + response tokens of the batch, as the trainer counts them
        train_steps=[(round(r["tokens_per_s"] * r["step_seconds"]), r["step_seconds"]) for r in window],
        sync_seconds=[r["weight_sync/seconds"] for r in window if "weight_sync/seconds" in r],
        decode_steps=list(engine.decode_steps),
        request_steps=list(engine.request_steps),
        prefill_steps=list(engine.prefill_steps),
        engine_counters=counters,
        train_windows=windows if counters else [],
        train_busy=busy,
        group_latencies=group_latencies,
        admission_latencies=admission_latencies,
        trainer_overheads=trainer_overheads,
        drops_free_admission=drops_free_admission,
        label=label or run_dir.name,
    )


def _hand_offs(
    records: list[dict],
    windows: list[tuple[float, float]],
    served: dict[int, list[str]],
    finished: dict[str, float],
    submitted: list[float],
    skip_steps: int,
) -> tuple[list[float], list[float], list[float]]:
    """Measured hand-off delays (worker and trainer clocks are both time.time()).

    Group latency: for a step whose batch was not complete when the previous step ended, from its
    last response ending to training starting. Trainer overhead: for a step whose batch was, from
    the previous publish to training starting. Admission latency: from a step's publish (its
    metrics line, written right after) to the first group the worker starts after it, when one
    starts before the next publish.
    """
    groups, admissions, overheads = [], [], []
    for i in range(max(skip_steps, 1), len(records)):
        version = int(records[i]["step"]) - 1
        ends = [finished[sample] for sample in served.get(version, []) if sample in finished]
        if ends and max(ends) > records[i - 1]["time"]:
            groups.append(max(0.0, windows[i][0] - max(ends)))
        elif ends:
            overheads.append(max(0.0, windows[i][0] - records[i - 1]["time"]))
        if i + 1 < len(records):
            publish = records[i]["time"] - PUBLISH_SLACK_S
            first = bisect.bisect_left(submitted, publish)
            if first < len(submitted) and submitted[first] < records[i + 1]["time"]:
                admissions.append(max(0.0, submitted[first] - records[i]["time"]))
    return groups, admissions, overheads


def _busy_fraction(series: list[list[EngineSnapshot]], start: float, end: float) -> float:
    """Fraction of engines with work during [start, end], from the polls inside it (or the last one before)."""
    fractions = []
    for snapshots in series:
        inside = [s for s in snapshots if start <= s.time <= end] or [s for s in snapshots if s.time < start][-1:]
        if inside:
            fractions.append(sum(s.running + s.waiting > 0 for s in inside) / len(inside))
    return float(np.mean(fractions)) if fractions else 0.0


def error_table(rows: list[PredictionError], fitted_on: Collection[str] = frozenset()) -> str:
    """Markdown: measured vs predicted samples/s per run, and which runs the costs were fitted on."""
    lines = ["| run | fitted on | measured samples/s | predicted samples/s | error |", "|---|:-:|---:|---:|---:|"]
    for row in rows:
        lines.append(
            f"| {row.label} | {'yes' if row.label in fitted_on else 'no'} | {row.measured_samples_per_s:.1f} "
            f"| {row.predicted_samples_per_s:.1f} "
            f"| {100 * (row.predicted_samples_per_s / row.measured_samples_per_s - 1):+.1f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m staleness.experiments.sim_calibrate RUN_DIR... [--fit-on RUN_DIR...]`: calibrated SimParams and their error."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m staleness.experiments.sim_calibrate", description=(main.__doc__ or "").partition(": ")[2]
    )
    parser.add_argument(
        "runs",
        nargs="+",
        type=Path,
        help="`async-rl run` folders (with engine_counters.json, "
        "as benchmarks/sim_calibration.py leaves them, or give --engine-costs)",
    )
    parser.add_argument("--fit-on", nargs="+", type=Path, default=[], help="fit on these folders only (default: all)")
    parser.add_argument(
        "--engine-costs", type=Path, help=f"EngineCosts JSON (default: each folder's {ENGINE_PROBE_FILE})"
    )
    parser.add_argument("--skip-steps", type=int, default=2, help="start-up steps left out of every measurement")
    parser.add_argument(
        "--dropped-budget",
        choices=("kept", "returned"),
        default="returned",
        help="whether the system gives a dropped stale group's admission budget back (see SimConfig)",
    )
    args = parser.parse_args(argv)
    try:
        engine = msgspec.json.decode(args.engine_costs.read_bytes(), type=EngineCosts) if args.engine_costs else None
        folders = list(dict.fromkeys([*args.runs, *args.fit_on]))
        runs = {
            folder: read_run(
                folder,
                engine,
                skip_steps=args.skip_steps,
                label=str(folder),
                drops_free_admission=args.dropped_budget == "returned",
            )
            for folder in folders
        }
        fitted_on = {str(folder) for folder in (args.fit_on or folders)}
        params = calibrate([run for run in runs.values() if run.label in fitted_on])
        rows = prediction_error(params, list(runs.values()))
    except (OSError, ValueError, msgspec.DecodeError, msgspec.ValidationError) as err:
        parser.exit(2, f"error: {err}\n")
    print(msgspec.json.encode(params).decode())
    print(error_table(rows, fitted_on))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
