"""A sweep folder on disk: where each point's run, log and status file live.

The status files are what makes a sweep resumable and reportable: each one is
replaced atomically, so a sweep killed at any instant leaves every point either
in its previous state or its new one, never a torn file.

    SWEEP_DIR/points/NAME/     the point's run.output_dir
    SWEEP_DIR/status/NAME.json PointStatus
    SWEEP_DIR/logs/NAME.attemptK.log  stdout+stderr of `async-rl run`, one per attempt
    SWEEP_DIR/report/          summary.md, summary.html, *.png
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal

import msgspec

PointState = Literal["pending", "running", "finished", "timed_out", "failed"]
# A run that ended on its own (timed_out = it reached run.max_wall_s) is not run again.
DONE_STATES: frozenset[str] = frozenset({"finished", "timed_out"})


class Failure(msgspec.Struct, frozen=True, kw_only=True):
    """One attempt that did not complete; kept so the report can show what went wrong."""

    attempt: int
    exit_code: int | None  # None: the sweep itself was stopped while the run was going
    message: str
    log: str  # relative to the sweep folder


class PointStatus(msgspec.Struct, kw_only=True):
    name: str
    settings: dict[str, str]  # grid key -> value as given on the command line
    seed: int
    config: str  # the recipe's resolved path
    overrides: list[str]  # every --set the run gets, except run.output_dir
    state: PointState = "pending"
    attempts: int = 0
    exit_code: int | None = None
    started: float | None = None  # time.time() when the current attempt was launched
    ended: float | None = None
    failures: list[Failure] = []

    @property
    def done(self) -> bool:
        return self.state in DONE_STATES


class SweepLayout:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.points = self.root / "points"
        self.status = self.root / "status"
        self.logs = self.root / "logs"
        self.report = self.root / "report"

    def run_dir(self, name: str) -> Path:
        return self.points / name

    def status_path(self, name: str) -> Path:
        return self.status / f"{name}.json"

    def log_path(self, name: str, attempt: int) -> Path:
        return self.logs / f"{name}.attempt{attempt}.log"

    def write_status(self, status: PointStatus) -> None:
        write_atomic(self.status_path(status.name), msgspec.json.format(msgspec.json.encode(status), indent=2))

    def read_status(self, name: str) -> PointStatus | None:
        path = self.status_path(name)
        return read_status_file(path) if path.exists() else None

    def all_statuses(self) -> list[PointStatus]:
        """Every point ever run in this folder, in name order."""
        return [read_status_file(path) for path in sorted(self.status.glob("*.json"))]


class StatusError(ValueError):
    """A status file that cannot be read back: named, so the user can remove or fix it."""


def read_status_file(path: Path) -> PointStatus:
    try:
        return msgspec.json.decode(path.read_bytes(), type=PointStatus)
    except (OSError, msgspec.DecodeError) as exc:
        raise StatusError(f"{path}: unreadable point status ({exc}); delete it to run that point again") from None


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
