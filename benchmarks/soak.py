"""Soak: the tiny recipe for N minutes with chaos on, every process's memory sampled, the invariants checked.

One `async-rl run` (two engines, the buffer, a worker, the trainer) with kill -9 of a randomly chosen
component every --kill-every-s seconds (async_rl.chaos). Every 5 s the resident memory of each
component and of the orchestrator is sampled (psutil). At the end (SIGINT) it reports, per component,
the RSS slope in MB/hour of its longest-lived process (after its first two minutes), the restarts, and the
invariants from the buffer's write-ahead log and the trainer's records (trained_samples.jsonl):
acknowledged trajectories neither trained, dropped as stale, stored nor kept for a resume (lost: 0),
samples trained twice in the final model's history (0), trained samples staler than eta (0).
Not in CI (it runs for --minutes). --kill-every-s 0 runs without chaos, where every process lives
the whole run and the slopes say whether memory grows.

    .venv/bin/python benchmarks/soak.py --minutes 30 [--kill-every-s 45] [--keep DIR]
"""

from __future__ import annotations

import argparse
import random
import signal
import statistics
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import psutil
from keep_folder import keep_folder  # benchmarks/keep_folder.py, beside this file

from async_rl.chaos import component_pids, signal_component
from async_rl.messages import decode
from async_rl.metrics import read_metrics
from async_rl.orchestrator import run_argv
from async_rl.trainer_main import TRAINED_NAME, trained_history
from buffer.replay import ReplayBuffer
from buffer.service import WAL_NAME
from buffer.wal import Dropped, Put, read_records

COMPONENTS = ("engine0", "engine1", "buffer", "worker0", "trainer")
SAMPLE_S = 5.0
WARMUP_S = 120.0


def rss_slope_mb_per_hour(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS over time."""
    times = [t for t, _ in samples]
    sizes = [rss / 2**20 for _, rss in samples]
    return statistics.linear_regression(times, sizes).slope * 3600 if len(samples) > 2 else float("nan")


def audit(run_dir: Path, eta: int) -> dict[str, int]:
    """The invariants, from the buffer's write-ahead log (never compacted in a soak) and trained_samples.jsonl."""
    records, _ = read_records(run_dir / "buffer" / WAL_NAME)
    acknowledged: dict[str, int] = {}  # complete trajectory -> its oldest token version
    dropped: set[str] = set()
    buffer = ReplayBuffer(capacity=0)
    for record in records:
        buffer.apply(record)
        if isinstance(record, Put):
            trajectory = decode(bytes(record.frame))
            if not trajectory.partial:
                acknowledged[trajectory.sample_id] = trajectory.oldest_version
        elif isinstance(record, Dropped):
            dropped.update(record.sample_ids)
    history = trained_history(run_dir / TRAINED_NAME)
    trained = Counter(sid for ids in history.values() for sid in ids)
    stored = {sid for group in buffer.groups.values() for sid in group.members}
    kept = {entry.header.sample_id for batch in buffer.retained.values() for entry in batch.entries}
    return {
        "acknowledged": len(acknowledged),
        "trained": sum(trained.values()),
        "dropped_stale": len(dropped & acknowledged.keys()),
        "stored_at_end": len(stored),
        "kept_for_resume": len(kept - trained.keys()),
        "lost": len(acknowledged.keys() - trained.keys() - dropped - stored - kept),
        "trained_twice": sum(n - 1 for n in trained.values() if n > 1),
        "beyond_eta": sum(
            version - acknowledged[sid] > eta for version, ids in history.items() for sid in ids if sid in acknowledged
        ),
        "steps": len(history),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/tiny.toml")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--kill-every-s", type=float, default=45.0)
    parser.add_argument("--eta", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=keep_folder, default=None, help="run folder to keep (default: a temporary one)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    duration = args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="soak-") as scratch:
        run_dir = args.keep or Path(scratch) / "run"
        overrides = [
            "trainer.total_steps=1000000",
            "trainer.checkpoint_interval=20",
            "engine.count=2",
            f"staleness.eta={args.eta}",
            "buffer.fsync=batch",
            "buffer.compact_min_bytes=1000000000000",  # the audit reads every record
            "run.max_restarts=100",  # per component within an hour; kills come every --kill-every-s
            f"run.max_wall_s={duration + 600}",
        ]
        console = (run_dir.parent / f"{run_dir.name}.console.txt").open("w")
        process = subprocess.Popen(run_argv(args.recipe, run_dir, overrides), stdout=console, stderr=subprocess.STDOUT)
        series: dict[tuple[str, int], list[tuple[float, int]]] = defaultdict(list)
        kills: Counter[str] = Counter()
        started = time.monotonic()
        next_kill = started + 60  # let it start
        while (now := time.monotonic()) - started < duration:
            if process.poll() is not None:
                raise SystemExit(f"the run ended after {now - started:.0f} s: see {console.name}")
            live = {"orchestrator": process.pid, **component_pids(run_dir)}
            for name, pid in live.items():
                try:
                    rss = psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    continue
                series[(name, pid)].append((now - started, rss))
            if args.kill_every_s and now >= next_kill:
                victim = rng.choice(COMPONENTS)
                if signal_component(run_dir, victim) is not None:
                    kills[victim] += 1
                next_kill = now + args.kill_every_s
            time.sleep(SAMPLE_S)
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=120)
        console.close()
        output = Path(console.name).read_text()
        restarts = Counter(line.split()[1] for line in output.splitlines() if line.startswith("restarting "))
        steps = read_metrics(run_dir / "metrics.jsonl")
        invariants = audit(run_dir, args.eta)

        print(f"soak {args.minutes:g} min, kill -9 every {args.kill_every_s:g} s, exit {code} (130: stopped by SIGINT)")
        print(f"{'component':<13} {'kills':>5} {'restarts':>8} {'RSS MB first/last':>18} {'slope MB/h':>10}")
        for name in ("orchestrator", *COMPONENTS):
            lifetimes = [samples for (n, _), samples in series.items() if n == name]
            life = max(lifetimes, key=len, default=[])
            longest = [s for s in life if s[0] >= life[0][0] + WARMUP_S]
            first_last = f"{longest[0][1] / 2**20:.0f} / {longest[-1][1] / 2**20:.0f}" if longest else "-"
            print(
                f"{name:<13} {kills[name]:>5} {restarts[name]:>8} {first_last:>18} "
                f"{rss_slope_mb_per_hour(longest):>10.1f}"
            )
        print("invariants:", " ".join(f"{k}={v}" for k, v in invariants.items()))
        print(
            f"RESULT soak minutes={args.minutes:g} steps={steps[-1]['step'] if steps else 0} "
            f"kills={sum(kills.values())} restarts={sum(restarts.values())} lost={invariants['lost']} "
            f"trained_twice={invariants['trained_twice']} beyond_eta={invariants['beyond_eta']}"
        )


if __name__ == "__main__":
    main()
