"""Rollout throughput with APRIL vs plain async vs the synchronous baseline on a long-tail length distribution, one run.

All three sides are real `async-rl run` jobs of the same recipe (engines, buffer, worker,
trainer as processes), response lengths forced from a heavy-tailed log-normal
(recipes/long_tail.py); only april.enabled differs, and `sync` is plain async run with --sync
(staleness.eta = 0, strictly on-policy: what APRIL's paper compares against). Throughput is complete groups per
second, counted two ways between the 3rd and the last trainer version: groups the
trainer trained on (metrics.jsonl), and groups the rollout worker completed
(rollout_metrics.jsonl, which also gives tokens generated / recycled / wasted).
With --repeats N the sides alternate N times (order reversed each time, so a
machine whose load drifts favours none) and the ratios of the summed rates are printed.

    .venv/bin/python benchmarks/april.py [--steps 30] [--max-new-tokens 64] [--eta 1] [--alpha 0.25] [--repeats 2]
    .venv/bin/python benchmarks/april.py --device cuda --model qwen2-folder --max-new-tokens 512
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import msgspec
from keep_folder import keep_folder  # benchmarks/keep_folder.py, beside this file

from async_rl.metrics import read_metrics
from async_rl.orchestrator import run_argv

SKIP = 2  # versions of warm-up not counted


class Side(msgspec.Struct, frozen=True):
    trained_groups_s: float
    completed_groups_s: float
    tokens_generated: int
    tokens_recycled: int
    tokens_wasted: int
    partials_dropped: int
    busy: float
    staleness_max: int
    buffer_dropped: int  # complete samples the buffer dropped as too stale (not in the worker's counters)


def measure(run_dir: Path, group_size: int) -> Side:
    trained = [r for r in read_metrics(run_dir / "metrics.jsonl") if "samples" in r]
    if len(trained) <= SKIP + 1:
        raise RuntimeError(f"{run_dir}: only {len(trained)} steps logged")
    window = trained[SKIP:]
    trained_rate = sum(r["samples"] for r in window[1:]) / group_size / (window[-1]["time"] - window[0]["time"])
    lines = read_metrics(run_dir / "rollout_metrics.jsonl")
    start = next(line for line in lines if line["version"] >= window[0]["step"])
    end = max((line for line in lines if line["version"] <= window[-1]["step"]), key=lambda line: line["time"])
    completed = (end["rollout/groups_completed"] - start["rollout/groups_completed"]) / (end["time"] - start["time"])
    last = lines[-1]
    busy = [line["rollout/engine_busy_fraction"] for line in lines if start["time"] < line["time"] <= end["time"]]
    return Side(
        trained_groups_s=trained_rate,
        completed_groups_s=completed,
        tokens_generated=last["rollout/tokens_generated"],
        tokens_recycled=last["rollout/tokens_recycled"],
        tokens_wasted=last["rollout/tokens_wasted"],
        partials_dropped=last["rollout/partials_dropped_stale"],
        busy=sum(busy) / max(len(busy), 1),
        staleness_max=max(r["staleness/max"] for r in trained),
        buffer_dropped=sum(r.get("buffer/dropped_stale", 0) for r in trained),
    )


def run(recipe: str, output: Path, overrides: list[str], sync: bool) -> None:
    command = run_argv(recipe, output, overrides, sync=sync)
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed ({completed.returncode}):\n{completed.stdout[-3000:]}\n"
            f"{completed.stderr[-3000:]}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/april_tiny.toml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--eta", type=int, default=None, help="staleness.eta; default: the recipe's")
    parser.add_argument("--alpha", type=float, default=None, help="april.alpha; default: the recipe's")
    parser.add_argument("--device", default="cpu", help="model.device: cpu, cuda, cuda:N")
    parser.add_argument(
        "--model", default=None, help="model.spec: a model folder, tiny:llama, tiny:qwen2, qwen2-0.5b, smollm2"
    )
    parser.add_argument("--engines", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--keep", type=keep_folder, default=None, help="keep the run folders (traces, logs) here")
    args = parser.parse_args()
    common = [
        f"rollout.max_new_tokens={args.max_new_tokens}",
        f"trainer.total_steps={args.steps}",
        f"model.device={args.device!r}",
        f"engine.count={args.engines}",
        "run.max_wall_s=600",
    ]
    if args.eta is not None:
        common.append(f"staleness.eta={args.eta}")
    if args.alpha is not None:
        common.append(f"april.alpha={args.alpha}")
    if args.model:
        common.append(f"model.spec={args.model!r}")
    common += args.overrides
    sides: dict[str, list[Side]] = {"april": [], "async": [], "sync": []}
    configs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="april-bench-") as scratch:
        for repeat in range(args.repeats):
            order = [("april", "true", False), ("async", "false", False), ("sync", "false", True)]
            for label, enabled, sync in order if repeat % 2 == 0 else order[::-1]:
                run_dir = (args.keep or Path(scratch)) / f"{label}{repeat}"
                run(args.recipe, run_dir, [*common, f"april.enabled={enabled}"], sync)
                configs[label] = msgspec.json.decode((run_dir / "config.json").read_bytes())
                sides[label].append(measure(run_dir, group_size=configs[label]["rollout"]["group_size"]))
                side = sides[label][-1]
                print(
                    f"{label:6s} trained {side.trained_groups_s:7.2f} groups/s  completed "
                    f"{side.completed_groups_s:7.2f} groups/s  busy {side.busy:.2f}  tokens generated "
                    f"{side.tokens_generated} recycled {side.tokens_recycled} wasted {side.tokens_wasted} "
                    f"(partials dropped {side.partials_dropped}, buffer dropped {side.buffer_dropped} samples)  "
                    f"staleness max {side.staleness_max}",
                    flush=True,
                )
    trained = {k: sum(s.trained_groups_s for s in v) / args.repeats for k, v in sides.items()}
    completed = {k: sum(s.completed_groups_s for s in v) / args.repeats for k, v in sides.items()}
    config = configs["april"]
    print(
        f"RESULT april recipe={args.recipe} device={args.device} model={args.model or 'recipe'} steps={args.steps} "
        f"max_new_tokens={args.max_new_tokens} eta={config['staleness']['eta']} alpha={config['april']['alpha']} "
        f"group_size={config['rollout']['group_size']} repeats={args.repeats} "
        f"april_groups_s={trained['april']:.2f} async_groups_s={trained['async']:.2f} "
        f"sync_groups_s={trained['sync']:.2f} april/async={trained['april'] / trained['async']:.2f} "
        f"april/sync={trained['april'] / trained['sync']:.2f} "
        f"completed april/async={completed['april'] / completed['async']:.2f} "
        f"april/sync={completed['april'] / completed['sync']:.2f}"
    )


if __name__ == "__main__":
    main()
