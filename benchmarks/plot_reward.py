"""Reward vs wall-clock of finished `async-rl run` folders in one PNG, with rewards at a common time.

Wall-clock counts from each run's launch (when it wrote its config.json), so start-up is included
and runs of different speeds are compared at the latest time every one of them reached.

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
    args = parser.parse_args()
    points = [
        summarize_run(
            run,
            name=run.name,
            setting=run.name,
            seed=0,
            status="",
            eta=None,
            started=(run / "config.json").stat().st_mtime,
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
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
