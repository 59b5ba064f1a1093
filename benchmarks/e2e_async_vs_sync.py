"""Trained samples/s of the asynchronous loop vs the `--sync` baseline, same recipe, one run.

Both runs are real `async-rl run` jobs (engines, buffer, worker, trainer as processes);
response lengths are forced from a heavy-tailed log-normal (recipes/long_tail.py), which
is what leaves a synchronous loop idle: every step waits for its longest response, and
the engines wait for the trainer. Throughput is measured between the first and the last
logged step, so start-up is not counted. One synchronous baseline, then one asynchronous run
per weight-sync pause mode (--pause-modes) and, with --methods, per weight-sync method (the baseline
uses the first); each line also gives the mean pause of a sync.
With --lengths natural the recipe's own lengths stay (a learnable task: compare rewards with
benchmarks/plot_reward.py on the --keep folders).

    .venv/bin/python benchmarks/e2e_async_vs_sync.py [--steps 20] [--max-new-tokens 64] [--eta 2]
    .venv/bin/python benchmarks/e2e_async_vs_sync.py --set model.device=cuda --set model.spec=qwen2-folder
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import saturation  # benchmarks/saturation.py, beside this file
from keep_folder import keep_folder  # benchmarks/keep_folder.py, beside this file

from async_rl.metrics import read_metrics
from async_rl.orchestrator import run_argv


def trained_samples_per_s(metrics_path: Path, skip_steps: int) -> float:
    records = [r for r in read_metrics(metrics_path) if "samples" in r]
    if len(records) <= skip_steps + 1:
        raise RuntimeError(f"{metrics_path}: only {len(records)} steps logged")
    window = records[skip_steps:]
    samples = sum(r["samples"] for r in window[1:])
    return samples / (window[-1]["time"] - window[0]["time"])


def mean_pause_s(metrics_path: Path) -> float:
    pauses = [r["weight_sync/pause_s"] for r in read_metrics(metrics_path) if "weight_sync/pause_s" in r]
    return sum(pauses) / max(len(pauses), 1)


def run(recipe: str, output: Path, overrides: list[str], sync: bool) -> tuple[float, float]:
    """(trained samples/s, mean pause seconds of a weight sync)."""
    command = run_argv(recipe, output, overrides, sync=sync)
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed ({completed.returncode}):\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
        )
    metrics = output / "metrics.jsonl"
    return trained_samples_per_s(metrics, skip_steps=2), mean_pause_s(metrics)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/tiny.toml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--eta", type=int, default=2)
    parser.add_argument(
        "--pause-modes", default="retract", help="comma list: one asynchronous run per weight-sync pause mode"
    )
    parser.add_argument(
        "--methods",
        default=None,
        help="comma list: weight_sync.method of each asynchronous run (default: the recipe's)",
    )
    parser.add_argument(
        "--lengths",
        choices=("forced", "natural"),
        default="forced",
        help="forced: log-normal response lengths (recipes/long_tail.py); natural: the recipe's own (compare rewards)",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--keep", type=keep_folder, default=None, help="keep the run folders (traces, logs) here")
    parser.add_argument(
        "--limits",
        action="store_true",
        help="after each async run, its engine- and trainer-saturated rates and run / bound (benchmarks/saturation.py)",
    )
    args = parser.parse_args()
    common = [
        *(["rollout.sample_plan='recipes.long_tail:forced_lengths'"] if args.lengths == "forced" else []),
        f"rollout.max_new_tokens={args.max_new_tokens}",
        f"trainer.total_steps={args.steps}",
        *args.overrides,
    ]
    methods = args.methods.split(",") if args.methods else [None]
    method_set = lambda method: [] if method is None else [f"weight_sync.method={method}"]  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="e2e-bench-") as scratch:
        root = args.keep or Path(scratch)
        sync_overrides = [*common, "staleness.eta=0", *method_set(methods[0])]
        sync_rate, sync_pause = run(args.recipe, root / "sync", sync_overrides, sync=True)
        print(f"sync:                     {sync_rate:8.1f} trained samples/s   mean sync pause {sync_pause:.3f} s")
        for mode in args.pause_modes.split(","):
            rates: dict[str, float] = {}
            for method in methods:
                name = f"async-{mode}" if method is None else f"async-{mode}-{method}"
                overrides = [
                    *common,
                    f"staleness.eta={args.eta}",
                    f"weight_sync.pause_mode={mode}",
                    *method_set(method),
                ]
                rate, pause = run(args.recipe, root / name, overrides, sync=False)
                rates[method or "recipe"] = rate
                print(f"{name} (eta={args.eta}): {rate:8.1f} trained samples/s   mean sync pause {pause:.3f} s")
                print(
                    f"RESULT e2e_async_vs_sync recipe={args.recipe} steps={args.steps} max_new_tokens={args.max_new_tokens} "
                    f"eta={args.eta} pause_mode={mode} method={method or 'recipe'} async_samples_s={rate:.1f} "
                    f"sync_samples_s={sync_rate:.1f} ratio={rate / sync_rate:.2f} async_pause_s={pause:.3f}",
                    flush=True,
                )
                if args.limits:
                    limits = saturation.measure(root / name, groups=8 * args.steps, steps=args.steps - 1)
                    print(f"limits ({name}, eta={args.eta}): {limits.describe()}", flush=True)
            first, *others = rates
            for other in others:  # the methods side by side, same pause mode and baseline
                print(
                    f"RESULT e2e_methods pause_mode={mode} {first}/{other}={rates[first] / rates[other]:.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
