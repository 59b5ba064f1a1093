"""Calibrate the throughput simulator on measured runs and report its prediction error (target ≤ 15%).

Real `async-rl run` jobs of the tiny recipe with long-tail response lengths
(recipes/long_tail.py) in sync mode, async with a few eta, and APRIL when the
orchestrator accepts it. Every simulator input is measured, none is guessed:

- response lengths and prompt length: every trajectory the run's buffer logged (empirical);
- train cost vs tokens and weight-sync time: the run's own metrics ("step_seconds",
  "weight_sync/seconds"), with the fraction of engines busy during each step (colocation cost);
- decode step cost vs batch size and the engines' slowdown while the trainer trains: the run's own
  engine counters (/get_server_info polled every 50 ms), see staleness.experiments.sim_calibrate.fit_engine_counters;
- per-sequence request cost: a probe engine (same model and threads) timed through the real client
  just before each run: the slope of burst time vs burst size for one-token sequences, sent in
  requests of --probe-request-size sequences as the worker sends them (a step's requests land in a
  burst on an idle engine, which the polled counters cannot time). The probe also times
  decode steps (a burst of c requests of L tokens takes overhead(c) + L x step(c), so two lengths give
  step(c)); those are shown for comparison: run alone, the probe cannot see the run's own contention;
- hand-offs (group -> trainer, publish -> admission, trainer loop): worker and trainer timestamps.

The costs are fitted on the runs named by --fit-on (all rounds), then every run is predicted.
Throughput is trained samples/s between the 3rd and the last step, in the run and in the simulator.
The run folders stay in --out: `python -m staleness.experiments.sim_calibrate FOLDER...` refits them.

    .venv/bin/python benchmarks/sim_calibration.py [--rounds 3] [--steps 20] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import msgspec

from async_rl.orchestrator import run_argv
from staleness.experiments.sim_calibrate import (
    ENGINE_COUNTERS_FILE,
    ENGINE_PROBE_FILE,
    EngineCosts,
    EngineSnapshot,
    MeasuredRun,
    PredictionError,
    calibrate,
    error_table,
    prediction_error,
    read_run,
)

SKIP_STEPS = 2  # the rate starts at the 3rd step, as in benchmarks/e2e_async_vs_sync.py
PROBE_CONCURRENCY = (1, 8, 32, 128)
PROBE_LENGTHS = (8, 40)  # decode step cost = difference of the two burst times / 32
PROBE_REPEATS = 3
PROBE_PROMPT_TOKENS = 4  # the tiny recipe's digit prompts; the per-request cost hardly depends on it
POLL_INTERVAL_S = 0.05


class Mode(msgspec.Struct, frozen=True):
    label: str
    overrides: list[str]
    sync: bool = False


def modes(etas: list[int], april_eta: int, alpha: float) -> list[Mode]:
    return [
        Mode("sync", ["staleness.eta=0"], sync=True),
        *(Mode(f"async eta={eta}", [f"staleness.eta={eta}"]) for eta in etas),
        Mode(
            f"april eta={april_eta} a={alpha}",
            [f"staleness.eta={april_eta}", "april.enabled=true", f"april.alpha={alpha}"],
        ),
    ]


async def _burst(client, prompt: list[int], samples: int, length: int, per_request: int) -> float:
    """Seconds until `samples` sequences of exactly `length` new tokens, sent at once in requests of
    `per_request` sequences each, are all answered."""
    params = {"max_new_tokens": length, "ignore_eos": True, "temperature": 0.7}
    sizes = [min(per_request, samples - start) for start in range(0, samples, per_request)]
    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for size in sizes:
            group.create_task(
                client.generate_batch([prompt] * size, sampling_params=[params] * size, return_logprob=True)
            )
    return time.perf_counter() - started


async def probe_engine(url: str, prompt_tokens: int, per_request: int) -> EngineCosts:
    """Decode step seconds per batch size, and burst seconds of one-token sequences per burst size."""
    from rollout_workers.client import EngineClient

    prompt = [5 + i % 20 for i in range(prompt_tokens)]
    decode, requests = [], []
    async with EngineClient(url) as client:
        await _burst(client, prompt, 4, 4, per_request)  # warm-up
        for c in PROBE_CONCURRENCY:
            timed = {
                length: statistics.median(
                    [await _burst(client, prompt, c, length, per_request) for _ in range(PROBE_REPEATS)]
                )
                for length in (1, *PROBE_LENGTHS)
            }
            short, long = PROBE_LENGTHS
            decode.append((c, max(timed[long] - timed[short], 0.0) / (long - short)))
            requests.append((c, timed[1]))
    return EngineCosts(decode_steps=decode, request_steps=requests)


def poll_engines(urls: list[str], stop: threading.Event, interval_s: float) -> list[list[EngineSnapshot]]:
    """Each engine's counters every interval_s until `stop`; a poll that fails (engine busy starting,
    or gone at the end) is skipped. The time is the middle of the request."""
    series: list[list[EngineSnapshot]] = [[] for _ in urls]
    while not stop.wait(interval_s):
        for url, snapshots in zip(urls, series):
            sent = time.time()  # wall clock, as the trainer's metrics: read_run lines them up
            try:
                with urllib.request.urlopen(url + "/get_server_info", timeout=2.0) as reply:
                    state = json.loads(reply.read())["internal_states"][0]
            except (OSError, ValueError, KeyError, IndexError):
                continue
            snapshots.append(
                EngineSnapshot(
                    time=(sent + time.time()) / 2,
                    decode_forwards=state["decode_forwards"],
                    generated_tokens=state["generated_tokens"],
                    finished_requests=state["finished_requests"],
                    running=state["running"],
                    waiting=state["waiting"],
                )
            )
    return series


def real_run(recipe: str, output: Path, overrides: list[str], sync: bool) -> str | None:
    """Run one job, polling its engines' counters into output/ENGINE_COUNTERS_FILE.

    None when it finished, the orchestrator's refusal when it refused the config."""
    command = run_argv(recipe, output, overrides, sync=sync)
    with tempfile.TemporaryFile("w+") as errors:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True)
        stdout, stop, polled = [], threading.Event(), []
        poller = None
        for line in process.stdout:
            stdout.append(line)
            found = re.search(r"engines (\S+)", line)
            if found and poller is None:
                urls = found.group(1).split(",")
                poller = threading.Thread(
                    target=lambda urls=urls: polled.append(poll_engines(urls, stop, POLL_INTERVAL_S))
                )
                poller.start()
        process.wait()
        stop.set()
        if poller is not None:
            poller.join()
        errors.seek(0)
        stderr = errors.read()
    if process.returncode == 2 and "error:" in stderr:
        return stderr.strip().splitlines()[-1]
    if process.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed ({process.returncode}):\n{''.join(stdout)[-3000:]}\n{stderr[-3000:]}"
        )
    if polled:
        (output / ENGINE_COUNTERS_FILE).write_bytes(msgspec.json.encode(polled[0]))
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/tiny.toml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--etas", default="1,2", help="async runs, comma-separated")
    parser.add_argument("--april-eta", type=int, default=1)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3, help="every mode this many times, interleaved")
    parser.add_argument("--fit-on", default="sync,async eta=2", help="labels of the modes the costs are fitted on")
    parser.add_argument(
        "--dropped-budget",
        choices=("kept", "returned"),
        default="kept",
        help="whether the system hands a dropped stale group's admission budget back to the worker "
        "(at 83d5dcc it does not for groups the buffer drops: BatchResponse carries only a count)",
    )
    parser.add_argument(
        "--probe-request-size",
        type=int,
        help="sequences per /generate request in the probe, as the worker sends them (default: "
        "rollout.group_size: one request per group, as for a resumable generate function like "
        "recipes.long_tail's; the worker at 83d5dcc sent one request per sample: use 1)",
    )
    parser.add_argument("--out", type=Path, help="keep the run folders and measurements here (default: a temp dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    from async_rl.config import load_config
    from rollout_workers.launcher import EngineProcess, EngineSpec

    common = [
        "rollout.sample_plan='recipes.long_tail:forced_lengths'",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        f"trainer.total_steps={args.steps}",
        "run.max_wall_s=240",
        *args.overrides,
    ]
    todo = modes([int(e) for e in args.etas.split(",")], args.april_eta, args.alpha)
    fit_modes = set(args.fit_on.split(","))
    config = load_config(args.recipe, common)
    device = config.engine.device or config.model.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    scratch = args.out or Path(tempfile.mkdtemp(prefix="sim-calibration-"))
    runs: list[MeasuredRun] = []
    refused: dict[str, str] = {}
    # As the orchestrator splits the cores: one engine and the trainer get half each.
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    probe_env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    started = time.monotonic()
    probe_spec = EngineSpec(model=config.model.spec, device=device, extra_args=["--dtype", config.model.dtype])
    with EngineProcess(probe_spec, env=probe_env) as probe:
        for round_ in range(1, args.rounds + 1):
            for mode in todo:
                if mode.label in refused:
                    continue
                costs = asyncio.run(
                    probe_engine(probe.url, PROBE_PROMPT_TOKENS, args.probe_request_size or config.rollout.group_size)
                )
                folder = scratch / f"{mode.label.replace(' ', '_')}-r{round_}"
                refusal = real_run(args.recipe, folder, [*common, *mode.overrides], mode.sync)
                if refusal:
                    refused[mode.label] = refusal
                    print(f"skipped {mode.label}: {refusal}", flush=True)
                    continue
                (folder / ENGINE_PROBE_FILE).write_bytes(msgspec.json.encode(costs))
                run = read_run(
                    folder,
                    skip_steps=SKIP_STEPS,
                    label=f"{mode.label} #{round_}",
                    drops_free_admission=args.dropped_budget == "returned",
                )
                runs.append(run)
                print(
                    f"[{time.monotonic() - started:5.0f} s] {run.label}: {run.measured_samples_per_s:.1f} samples/s, "
                    f"train step {statistics.median(s for _, s in run.train_steps):.3f} s (median)",
                    flush=True,
                )
    (scratch / "measured_runs.json").write_bytes(msgspec.json.format(msgspec.json.encode(runs)))

    fitted_on = {r.label for r in runs if r.label.rsplit(" #", 1)[0] in fit_modes}
    print(
        f"\nCosts fitted on {', '.join(sorted(fitted_on))}; every run predicted. Dropped groups' admission "
        f"budget {'returned' if args.dropped_budget == 'returned' else 'kept (not returned)'}."
    )
    report(
        "each run predicted from its own measured costs (the model's structure, without load drift)",
        [[r] for r in runs],
        {r.label for r in runs},
        show_params=False,
    )
    pooled = report("in-run costs, one fit over all rounds", [runs], fitted_on)
    rounds = [[r for r in runs if r.label.endswith(f"#{round_}")] for round_ in range(1, args.rounds + 1)]
    per_round = report(
        "in-run costs, one fit per round (runs measured minutes apart see different loads)",
        [group for group in rounds if group],
        fitted_on,
    )
    report(
        "engine decode costs from the isolated probe instead of the run's counters, one fit over all rounds",
        [[msgspec.structs.replace(r, engine_counters=[]) for r in runs]],
        fitted_on,
    )
    summary = " ".join(
        f"{name}_max_error={100 * max(r.relative_error for r in rows):.1f}% "
        f"{name}_mean_error={100 * statistics.mean(r.relative_error for r in rows):.1f}%"
        for name, rows in (("pooled", pooled), ("per_round", per_round))
    )
    print(
        f"RESULT sim_calibration recipe={args.recipe} steps={args.steps} max_new_tokens={args.max_new_tokens} "
        f"runs={len(runs)} {summary} folder={scratch}"
    )


def report(
    title: str, groups: list[list[MeasuredRun]], fitted_on: set[str], show_params: bool = True
) -> list[PredictionError]:
    """Fit each group's costs on its runs in `fitted_on`, predict all its runs, print one table."""
    rows = []
    print(f"\n### {title}\n")
    for runs in groups:
        params = calibrate([r for r in runs if r.label in fitted_on])
        if show_params:
            print(f"SimParams: {msgspec.json.encode(params).decode()}\n")
        rows += prediction_error(params, runs)
    print(error_table(rows, fitted_on))
    return rows


if __name__ == "__main__":
    main()
