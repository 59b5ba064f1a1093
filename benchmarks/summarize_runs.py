"""One line per `async-rl run` folder: steps, reward at the start and the end, staleness, sync cost.

python benchmarks/summarize_runs.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from async_rl.metrics import read_metrics


def summary(run_dir: Path) -> str:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return f"{run_dir.name}: no metrics.jsonl"
    records = [r for r in read_metrics(metrics) if "reward/mean" in r]
    if not records:
        return f"{run_dir.name}: no steps"
    rewards = [r["reward/mean"] for r in records]
    window = max(1, min(10, len(rewards) // 3))
    first, last = statistics.mean(rewards[:window]), statistics.mean(rewards[-window:])
    sync = statistics.mean(r.get("weight_sync/seconds", 0.0) for r in records)
    pause = statistics.mean(r.get("weight_sync/pause_s", 0.0) for r in records)
    span = records[-1]["time"] - records[0]["time"]
    # The trainer's own speed (train_step alone), after its first step's warm-up.
    train = statistics.mean(r.get("tokens_per_s", 0.0) for r in records[1:] or records)
    return (
        f"RUN {run_dir.name}: steps={records[-1]['step']} reward_first{window}={first:.3f} "
        f"reward_last{window}={last:.3f} staleness_max={max(r['staleness/max'] for r in records):g} "
        f"sync_s={sync:.3f} pause_s={pause:.3f} s_per_step={span / max(len(records) - 1, 1):.3f} "
        f"train_tokens_s={train:.0f}"
    )


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        if Path(folder).is_dir():
            print(summary(Path(folder)))
