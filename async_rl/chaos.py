"""Fault injection into a running `async-rl run`: find its components by name and signal them.

Every component registers itself in RUN_DIR/stacks/NAME-PID.pid when it starts (async_rl.stacks);
a restarted one registers again under the same name, so the living process of a name is the newest
registration whose pid still runs. Used by the fault-tolerance tests and benchmarks/soak.py.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil

from async_rl import stacks


def component_pids(run_dir: str | os.PathLike[str]) -> dict[str, int]:
    """name -> pid of every registered component that is alive now (an SGLang engine never registers)."""
    folder = Path(run_dir, "stacks")
    newest: dict[str, tuple[float, int]] = {}
    for stem, pid in stacks.registered(folder).items():
        try:
            started = (folder / f"{stem}.pid").stat().st_mtime
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:  # killed, not reaped yet
                continue
        except (OSError, psutil.Error):
            continue
        name = stem.rpartition("-")[0]
        if started >= newest.get(name, (-1.0, 0))[0]:
            newest[name] = (started, pid)
    return {name: pid for name, (_, pid) in newest.items()}


def signal_component(run_dir: str | os.PathLike[str], name: str, signum: int = signal.SIGKILL) -> int | None:
    """Send `signum` to component `name`; its pid, or None when no living process has that name
    (e.g. it is being restarted)."""
    pid = component_pids(run_dir).get(name)
    if pid is not None:
        os.kill(pid, signum)
    return pid
