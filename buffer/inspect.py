"""`async-rl buffer inspect PATH`: what a buffer's log holds, without starting it.

Read-only: replays the WAL into a ReplayBuffer and prints its stats, so the
numbers are exactly what a restarted service would begin with.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import msgspec

from async_rl.messages import Trajectory, make_decoder
from buffer.replay import ReplayBuffer
from buffer.service import WAL_NAME
from buffer.wal import Put, Served, read_records


def served_at_versions(buffer_dir: Path) -> list[tuple[int, list[Trajectory]]]:
    """(trainer version, trajectories) of every batch the buffer served, in order, from its write-ahead log."""
    records, _ = read_records(buffer_dir / WAL_NAME)
    decoder = make_decoder(Trajectory)
    stored = {}
    for record in records:
        if isinstance(record, Put):
            trajectory = decoder.decode(record.frame)
            if not trajectory.partial:  # a partial shares its sample id with the finished one
                stored[trajectory.sample_id] = trajectory
    return [(r.trainer_version, [stored[s] for s in r.sample_ids]) for r in records if isinstance(r, Served)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="buffer directory (or its WAL file)")
    parser.add_argument("--trainer-version", type=int, help="measure staleness at this version (default: last served)")
    parser.add_argument("--json", action="store_true", help="print the stats as JSON")


def main(args: argparse.Namespace) -> int:
    path = args.path / WAL_NAME if args.path.is_dir() else args.path
    if not path.exists():
        print(f"no buffer log at {path}")
        return 1
    records, intact = read_records(path)
    buffer = ReplayBuffer(capacity=0)
    for record in records:
        buffer.apply(record)
    stats = buffer.stats(args.trainer_version)
    if args.json:
        print(msgspec.json.encode(stats).decode())
        return 0
    torn = path.stat().st_size - intact
    print(f"{path}: {len(records)} records, {intact} bytes" + (f" (+{torn} torn bytes ignored)" if torn else ""))
    print(
        f"stored {stats.stored} ({stats.complete_groups} complete groups, {stats.incomplete_groups} incomplete), "
        f"partials {stats.partials}, served {stats.served}, dropped stale {stats.dropped_stale}"
    )
    print(f"by oldest token version (staleness at trainer version {stats.trainer_version}):")
    for version, count in stats.stored_by_version.items():
        print(f"  version {version:>6}  staleness {stats.trainer_version - version:>4}  {count:>8}")
    return 0
