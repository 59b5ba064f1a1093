"""Chrome / Perfetto timelines (JSON Trace Event Format) of engines, syncs and train steps.

Why this shape: each process streams its own file, one event per line, in the
format's JSON-array form, whose closing `]` the format makes optional. A file
cut off by a crash therefore still opens in Perfetto and still parses line by
line here, and no lock is shared between processes. `merge` turns the
per-process files into one `{"traceEvents": [...]}` document; `merge_run` does
that for a run (RUN_DIR/trace/<process>.json -> RUN_DIR/trace.json), as the
orchestrator does when a run ends and `async-rl trace merge RUN_DIR` on demand.

Times are wall-clock seconds in microseconds so files from different
processes line up, read from `wall_clock` (wall time at start-up plus the monotonic
clock since): one clock for every span of a process, so a span timed inside
another stays inside it even while the system clock is slewed; `complete` also
takes explicit seconds, which is how the throughput simulator draws its
simulated timeline with the same writer.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

TRACE_DIR = "trace"  # RUN_DIR/trace/<process>.json, one file per process
MERGED_NAME = "trace.json"


_WALL_AT_PERF_ZERO = time.time() - time.perf_counter()


def wall_clock() -> float:
    """Wall-clock seconds on this process's monotonic clock (see the module docstring)."""
    return _WALL_AT_PERF_ZERO + time.perf_counter()


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 3)


class Tracer:
    """Process-local, thread-safe trace writer; `Tracer(None)` records nothing at no cost.

    Each `track` (e.g. "engine-0", "weight-sync", "trainer") becomes a named
    thread of this process in the viewer.
    """

    def __init__(self, path: str | os.PathLike[str] | None, *, process_name: str | None = None, pid: int | None = None):
        self.path = Path(path) if path is not None else None
        self.pid = os.getpid() if pid is None else pid
        self._lock = threading.Lock()
        self._tids: dict[str, int] = {}
        self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()
            self._file.write("[\n")
            self._first = True
            self._emit(
                {
                    "ph": "M",
                    "name": "process_name",
                    "pid": self.pid,
                    "tid": 0,
                    "args": {"name": process_name or f"pid-{self.pid}"},
                }
            )

    @property
    def enabled(self) -> bool:
        return self._file is not None

    def complete(self, name: str, track: str, start_s: float, end_s: float, **args: Any) -> None:
        """A span with explicit start/end in seconds (wall clock, or any shared time base)."""
        if self._file is None:
            return
        if end_s < start_s:
            raise ValueError(f"trace span {name!r} on {track!r} ends before it starts: {start_s} > {end_s}")
        self._emit(
            {
                "ph": "X",
                "name": name,
                "ts": _us(start_s),
                "dur": _us(end_s - start_s),
                "tid": self._tid(track),
                "args": args,
            }
        )

    def instant(self, name: str, track: str, at_s: float | None = None, **args: Any) -> None:
        if self._file is None:
            return
        self._emit(
            {
                "ph": "i",
                "s": "t",
                "name": name,
                "ts": _us(wall_clock() if at_s is None else at_s),
                "tid": self._tid(track),
                "args": args,
            }
        )

    @contextlib.contextmanager
    def span(self, name: str, track: str, **args: Any) -> Iterator[dict[str, Any]]:
        """Time a block; the yielded dict's entries are added to the span's args (e.g. token counts)."""
        if self._file is None:
            yield args
            return
        start = wall_clock()
        try:
            yield args
        finally:
            self.complete(name, track, start, wall_clock(), **args)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.write("\n]\n")
                self._file.close()
                self._file = None

    def __enter__(self) -> Tracer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tid(self, track: str) -> int:
        with self._lock:
            tid = self._tids.get(track)
            if tid is None:
                tid = self._tids[track] = len(self._tids) + 1
                self._write({"ph": "M", "name": "thread_name", "pid": self.pid, "tid": tid, "args": {"name": track}})
            return tid

    def _emit(self, event: dict[str, Any]) -> None:
        event["pid"] = self.pid
        with self._lock:
            if self._file is not None:
                self._write(event)

    def _write(self, event: dict[str, Any]) -> None:
        # Comma first, so the file is valid JSON after close() and a valid unterminated array before.
        assert self._file is not None
        self._file.write(("" if self._first else ",") + json.dumps(event, default=str) + "\n")
        self._first = False
        self._file.flush()


def read_events(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Events of one tracer file, closed or cut off mid-line by a crash (the broken line is skipped)."""
    events = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip().lstrip(",")
        if line in ("", "[", "]"):
            continue
        with contextlib.suppress(json.JSONDecodeError):
            event = json.loads(line)
            if isinstance(event, dict):
                events.append(event)
    return events


def merge(paths: Iterable[str | os.PathLike[str]], out: str | os.PathLike[str]) -> int:
    """Combine per-process files into one trace; events sorted by time within each track. Returns the event count."""
    events = [event for path in paths for event in read_events(path)]
    metadata = [e for e in events if e.get("ph") == "M"]
    # Longest first at equal start: an enclosing span is written after its children, yet must come first to nest.
    timed = sorted((e for e in events if e.get("ph") != "M"), key=lambda e: (e["ts"], -e.get("dur", 0)))
    Path(out).write_text(json.dumps({"traceEvents": metadata + timed, "displayTimeUnit": "ms"}), encoding="utf-8")
    return len(metadata) + len(timed)


def merge_run(run_dir: str | os.PathLike[str]) -> Path | None:
    """RUN_DIR/trace/*.json -> RUN_DIR/trace.json (what the orchestrator does when a run ends); None if no files."""
    run_dir = Path(run_dir)
    paths = sorted((run_dir / TRACE_DIR).glob("*.json"))
    if not paths:
        return None
    out = run_dir / MERGED_NAME
    merge(paths, out)
    return out


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="a run's output_dir (holds trace/<process>.json)")


def main(args) -> int:
    out = merge_run(args.run_dir)
    if out is None:
        print(f"error: no trace files in {Path(args.run_dir) / TRACE_DIR}", file=sys.stderr)
        return 1
    print(f"{out}: open it in https://ui.perfetto.dev")
    return 0
