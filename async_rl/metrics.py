"""Where a run's numbers go: metrics.jsonl, TensorBoard, Weights & Biases if asked, the live console line.

Metric names are slash-separated (TensorBoard groups them by prefix); the console
shows the handful in `DISPLAY_KEYS`. Both files are flushed every step so a
crashed or killed run still has every step it finished.
"""

from __future__ import annotations

import math
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Literal

import msgspec

REWARD = "reward/mean"
VERSION = "version"
STALENESS = "staleness/mean"
TOKENS_PER_S = "throughput/tokens_per_s"
DISPLAY_KEYS = {REWARD: "reward", VERSION: "version", STALENESS: "staleness", TOKENS_PER_S: "tok/s"}


class MetricsSink:
    """Appends one JSON object per step to `run_dir/metrics.jsonl` and writes the numeric
    values as TensorBoard scalars under `run_dir/tensorboard` (tensorboard's own event
    writer: no torch import) and, with `wandb` "offline" or "online", to a Weights & Biases run
    under `run_dir/wandb` (one run per output folder: a restarted trainer resumes it; offline
    runs upload later with `wandb sync`). NaN/inf are written as null in JSON, as-is elsewhere."""

    def __init__(
        self,
        run_dir: str | Path,
        tensorboard: bool = True,
        wandb: Literal["off", "offline", "online"] = "off",
        wandb_project: str = "async-rl",
        config: dict[str, Any] | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self._jsonl: IO[bytes] = self.jsonl_path.open("ab")
        self._events = None
        if tensorboard:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self._events = EventFileWriter(str(self.run_dir / "tensorboard"))
        self._wandb = _wandb_run(self.run_dir, wandb, wandb_project, config) if wandb != "off" else None

    def log(self, step: int, metrics: dict[str, Any], wall_time: float | None = None) -> None:
        wall_time = time.time() if wall_time is None else wall_time
        record = {"step": step, "time": wall_time}
        record.update({key: _jsonable(value) for key, value in metrics.items()})
        self._jsonl.write(msgspec.json.encode(record) + b"\n")
        self._jsonl.flush()
        if self._events is not None:
            from tensorboard.compat.proto.event_pb2 import Event
            from tensorboard.compat.proto.summary_pb2 import Summary

            values = [
                Summary.Value(tag=key, simple_value=float(value))
                for key, value in metrics.items()
                if isinstance(value, (int, float)) and not isinstance(value, bool)
            ]
            self._events.add_event(Event(wall_time=wall_time, step=step, summary=Summary(value=values)))
            self._events.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        self._jsonl.close()
        if self._events is not None:
            self._events.close()
        if self._wandb is not None:
            import wandb

            self._wandb.finish()
            wandb.teardown()  # stops W&B's service: its log is whole on disk once the sink is closed

    def __enter__(self) -> MetricsSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wandb_run(run_dir: Path, mode: Literal["offline", "online"], project: str, config: dict[str, Any] | None):
    try:
        import wandb
    except ImportError:
        raise RuntimeError(f'run.wandb = "{mode}" needs Weights & Biases: pip install wandb') from None
    id_file = run_dir / "wandb_id"  # the same W&B run for every start of this output folder
    if not id_file.exists():
        id_file.write_text(uuid.uuid4().hex[:16])
    run_id = id_file.read_text().strip()
    _await_unused_start_second(run_dir / "wandb", run_id)
    return wandb.init(
        project=project,
        mode=mode,
        dir=str(run_dir),
        id=run_id,
        name=run_dir.name,
        resume="allow",
        config=config,
    )


def _await_unused_start_second(wandb_dir: Path, run_id: str) -> None:
    """W&B names each start's folder by its second (`offline-run-YYYYMMDD_HHMMSS-<id>`, `run-…`);
    a second start of the same run within that second would write over the first one's log."""

    def taken() -> bool:
        second = f"{datetime.now():%Y%m%d_%H%M%S}"
        return any((wandb_dir / f"{kind}-{second}-{run_id}").exists() for kind in ("offline-run", "run"))

    while taken():
        time.sleep(0.05)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a torn last line (a killed run) is ignored."""
    records = []
    for line in Path(path).read_bytes().splitlines():
        try:
            records.append(msgspec.json.decode(line))
        except msgspec.DecodeError:
            continue
    return records


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_metrics(metrics: dict[str, Any]) -> str:
    """ "reward 0.431  version 12  staleness 0.80  tok/s 1234" from whichever display keys are present."""
    parts = []
    for key, label in DISPLAY_KEYS.items():
        value = metrics.get(key)
        if isinstance(value, float) and key in (TOKENS_PER_S, VERSION):
            parts.append(f"{label} {value:.0f}")
        elif isinstance(value, float):
            parts.append(f"{label} {value:.3f}")
        elif value is not None:
            parts.append(f"{label} {value}")
    return "  ".join(parts)


class ProgressDisplay:
    """A live progress bar with the latest metrics on a terminal; plain lines (one per
    `update`) when output is piped or logged, so CI logs stay readable."""

    def __init__(self, total_steps: int, stream: IO[str] | None = None, live: bool | None = None):
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.start = time.monotonic()
        self._progress = None
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("step"),
                MofNCompleteColumn(),
                BarColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[stats]}"),
                console=Console(file=self.stream),
            )
            self._task = self._progress.add_task("run", total=total_steps, stats="")
            self._progress.start()

    def update(self, step: int, metrics: dict[str, Any], restarts: dict[str, int] | None = None) -> None:
        stats = format_metrics(metrics)
        if restarted := {name: n for name, n in (restarts or {}).items() if n}:
            stats += "  restarts " + " ".join(f"{name} {n}" for name, n in sorted(restarted.items()))
        if self._progress is not None:
            self._progress.update(self._task, completed=step, stats=stats)
        else:
            elapsed = time.monotonic() - self.start
            print(f"step {step}/{self.total_steps}  {stats}  elapsed {elapsed:.0f}s", file=self.stream, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
