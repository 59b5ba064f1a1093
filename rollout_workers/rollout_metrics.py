"""A rollout worker's own numbers: RUN_DIR/rollout_metrics.jsonl and the engine tracks of its trace.

One JSON line per trainer version the worker sees, plus a final one. Counters are
cumulative; the two rates cover the interval since the previous line:

- rollout/engine_busy_fraction: per engine, the fraction of the interval during which this
  worker had at least one request in flight on it; averaged over engines.
- rollout/long_tail_wait_s: seconds during which this worker had some groups in flight but
  fewer than its share of one batch (b groups): the engines were only finishing leftovers
  of earlier admissions, the long tail, instead of a batch's worth of work. The same
  definition holds for plain async and APRIL; APRIL retracts the tail once a round's quota
  is met, so its tail wait is what remains before the next round may start.

Trace: each engine's busy periods (first request in until the last one out) are "generate"
spans on track "engine-<i>"; per-request spans would overlap and not nest on one track.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from async_rl.trace import Tracer

COUNTERS = (
    "tokens_generated",
    "tokens_recycled",
    "tokens_wasted",
    "partials_dropped_stale",
    "groups_refused",
    "groups_completed",
    "samples_completed",
)
METRICS_NAME = "rollout_metrics.jsonl"


class _Stopwatch:
    """Seconds spent in a state that switches on and off, read and reset per interval."""

    def __init__(self) -> None:
        self.on_since: float | None = None
        self.seconds = 0.0

    def set(self, on: bool, now: float) -> None:
        if on and self.on_since is None:
            self.on_since = now
        elif not on and self.on_since is not None:
            self.seconds += now - self.on_since
            self.on_since = None

    def take(self, now: float) -> float:
        if self.on_since is not None:
            self.seconds += now - self.on_since
            self.on_since = now
        seconds, self.seconds = self.seconds, 0.0
        return seconds


class _EngineActivity:
    def __init__(self) -> None:
        self.in_flight = 0
        self.busy = _Stopwatch()
        self.period_start = 0.0
        self.period_requests = 0
        self.period_tokens = 0


class RolloutMetrics:
    def __init__(self, run_dir: Path, worker: int, engines: int, share_groups: int, tracer: Tracer):
        self.path = Path(run_dir) / METRICS_NAME
        self.worker = worker
        self.share_groups = share_groups
        self.tracer = tracer
        self.counts: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))
        self.engines = [_EngineActivity() for _ in range(engines)]
        self.groups_in_flight = 0
        self.tail = _Stopwatch()
        self.last_line = time.time()

    # ---- events -------------------------------------------------------------
    def request_started(self, engine: int) -> None:
        now, activity = time.time(), self.engines[engine]
        if activity.in_flight == 0:
            activity.period_start, activity.period_requests, activity.period_tokens = now, 0, 0
        activity.in_flight += 1
        activity.period_requests += 1
        activity.busy.set(True, now)

    def request_finished(self, engine: int, tokens: int) -> None:
        now, activity = time.time(), self.engines[engine]
        activity.in_flight -= 1
        activity.period_tokens += tokens
        self.counts["tokens_generated"] += tokens
        if activity.in_flight == 0:
            activity.busy.set(False, now)
            self.tracer.complete(
                "generate",
                f"engine-{engine}",
                activity.period_start,
                now,
                requests=activity.period_requests,
                tokens=activity.period_tokens,
            )

    def group_started(self) -> None:
        self.groups_in_flight += 1
        self._update_tail()

    def group_ended(self) -> None:
        self.groups_in_flight -= 1
        self._update_tail()

    def _update_tail(self) -> None:
        self.tail.set(0 < self.groups_in_flight < self.share_groups, time.time())

    # ---- lines --------------------------------------------------------------
    def line(self, version: int) -> dict[str, float | int]:
        now = time.time()
        wall = max(now - self.last_line, 1e-9)
        busy = [activity.busy.take(now) / wall for activity in self.engines]
        self.last_line = now
        record: dict[str, float | int] = {"time": now, "worker": self.worker, "version": version}
        record.update({f"rollout/{name}": self.counts[name] for name in COUNTERS})
        record["rollout/long_tail_wait_s"] = self.tail.take(now)
        record["rollout/engine_busy_fraction"] = sum(busy) / len(busy) if busy else 0.0
        return record

    def write(self, version: int) -> dict[str, float | int]:
        record = self.line(version)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
        return record
