"""The hang watchdog of `async-rl run`: no step, no trajectory and no weight sync for T seconds.

Progress is read from what the run writes anyway: a trainer step or sync appends to
metrics.jsonl (one line per step, its sync included), a trajectory grows the buffer's
write-ahead log, a worker's version notice appends to rollout_metrics.jsonl. When none of
them has grown for `timeout_s`, every registered component dumps its stacks (async_rl.stacks)
and the report names, per component, the call it is in.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from async_rl import stacks

DUMP_WAIT_S = 5.0  # for every registered process to write its dump


class Watchdog:
    def __init__(self, progress: list[Path], stacks_dir: Path, timeout_s: float, poll_s: float = 1.0):
        self.progress = progress
        self.stacks_dir = stacks_dir
        self.timeout_s = timeout_s
        self.poll_s = min(poll_s, timeout_s / 4)

    def _sizes(self) -> tuple[int, ...]:
        return tuple(path.stat().st_size if path.exists() else -1 for path in self.progress)

    async def stalled(self) -> str:
        """Returns, with the report, once the run has made no progress for timeout_s."""
        sizes, since = self._sizes(), time.monotonic()
        while True:
            await asyncio.sleep(self.poll_s)
            now = self._sizes()
            if now != sizes:
                sizes, since = now, time.monotonic()
            elif time.monotonic() - since >= self.timeout_s:
                return await self.report()

    async def report(self) -> str:
        """Ask every registered component for its stacks; one line per component says where it is."""
        targets = stacks.registered(self.stacks_dir)
        dumps = {name: self.stacks_dir / f"{name}.txt" for name in targets}
        before = {name: _size(path) for name, path in dumps.items()}
        for pid in targets.values():
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + DUMP_WAIT_S
        while time.monotonic() < deadline and not all(
            stacks.TASKS_HEADER in _read_after(path, before[name]) for name, path in dumps.items()
        ):
            await asyncio.sleep(0.1)
        lines = [f"no trainer step, trajectory or weight sync for {self.timeout_s:g} s (run.watchdog_s)"]
        for name, path in sorted(dumps.items()):
            lines.append(f"  {name}: {stacks.where(_read_after(path, before[name]))}")
        lines.append(f"  whole stacks: {self.stacks_dir}/")
        return "\n".join(lines)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _read_after(path: Path, offset: int) -> str:
    """The newest dump: what the file gained since `offset`."""
    try:
        with path.open("rb") as file:
            file.seek(offset)
            return file.read().decode(errors="replace")
    except OSError:
        return ""
