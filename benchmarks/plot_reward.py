"""Reward vs wall-clock of finished `async-rl run` folders in one PNG, with rewards at a common time.

Wall-clock counts from each run's launch (when it wrote its config.json), so start-up is included,
or with `--since first-step` from its first trained step (runs started one after the other on a
machine whose caches the first one warmed); runs of different speeds are compared at the latest time
every one of them reached, and with `--reach R` by when each first reached reward R (the mean of its
last logged steps, as at the common time).

    python benchmarks/plot_reward.py --out reward_vs_wallclock.png RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from staleness.experiments.report import common_wall_clock, reward_at, summarize_run
from staleness.experiments.report_plots import write_reward_plot


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--since", choices=("launch", "first-step"), default="launch")
    parser.add_argument("--reach", type=float, default=None, help="also print when each run first reached this reward")
    args = parser.parse_args()
    points = [
        summarize_run(
            run,
            name=run.name,
            setting=run.name,
            seed=0,
            status="",
            eta=None,
            started=(run / "config.json").stat().st_mtime if args.since == "launch" else None,
        )
        for run in args.runs
    ]
    at = common_wall_clock([p.curve for p in points])
    write_reward_plot(args.out, points, at)
    for p in points:
        at_common = reward_at(p.curve, at) if at is not None else None
        print(
            f"RESULT reward_vs_wallclock run={p.name} steps={len(p.curve)} end_s={_fmt(p.curve[-1][0] if p.curve else None)} "
            f"common_s={_fmt(at)} reward_at_common={_fmt(at_common, 3)} final_reward={_fmt(p.final_reward, 3)} "
            f"samples_s={_fmt(p.throughput, 2)}"
            + ("" if args.reach is None else f" reached_{args.reach:g}_s={_fmt(_reached(p.curve, args.reach))}")
        )
    print(f"wrote {args.out}")


def _reached(curve: list[tuple[float, float]], reward: float) -> float | None:
    """The first logged time at which the windowed reward is at least `reward`."""
    return next((t for t, _ in curve if (value := reward_at(curve, t)) is not None and value >= reward), None)


if __name__ == "__main__":
    main()
