"""Discrete-event throughput model of an RL post-training loop.

Why: picking eta, alpha and the engine count on a real cluster costs GPU-hours
per point; this model ranks the knobs in seconds, and `staleness.experiments.sim_calibrate`
fits its costs to a few measured runs so its answers can be checked.

The model, in the terms of ARCHITECTURE.md:

- E engines with continuous batching. A decode step costs
  `decode_base + decode_per_seq * batch + decode_per_ctx_token * context tokens`;
  new sequences join between steps after a prefill of
  `prefill_per_seq + prefill_per_token * (prompt + partial response)` each (the
  per-sequence part is the request's own overhead: HTTP, parsing, its row in the
  batch, its reply); at most `max_running` run.
  Between events an engine's batch is constant, so the time to its next
  completion is closed-form: events happen per completion, never per token,
  which is what lets thousands of engines run in seconds.
- A version is the number of published trainer steps. A sample's version is the
  engine version when it first joined a batch (its oldest token); its staleness
  at trainer step t is t - version, and nothing with staleness > eta is trained.
- The trainer takes the B oldest complete groups, trains for
  `train_base + train_per_token * (prompt + response tokens)`, spends `export_time`
  handing the weights over (a snapshot written to disk, say: the engines keep generating
  on the old ones), then publishes: engines are interrupted (the decode step in progress
  is lost), paused for `sync_time` and, with `recompute_kv_on_sync`, re-prefill the
  contexts they hold, as AReaL's interruptible sync does. The trainer waits for the
  engines' sync (it takes part in an NCCL broadcast) unless `trainer_waits_for_sync` is
  off: then it trains its next step while they load (this project's disk sync), and
  that step's own sync waits for this one, so it is never more than one step ahead.
- Colocation. When the trainer and the engines share compute (one GPU, or a few CPU
  cores under every process of the run), each slows the other: engine work runs
  `1 + engine_slowdown_training` times slower while a train step runs (segments in
  flight are stretched from that moment on), and a train step takes
  `train_busy_engines` seconds longer times the fraction of engines with sequences
  running when it starts; the rest of a train step runs `1 + train_slowdown_generating`
  times slower whenever any engine generates (data-parallel ranks, each beside an
  engine, wait for the slowest; on one H200 the trainer yields the GPU to SGLang).
  All are 0 for dedicated devices. With `pause_engines_training` the GPUs are
  time-sliced explicitly instead: engines stop (the decode step in progress is lost)
  while a train step runs and resume after it.
- Hand-offs. A complete group reaches the trainer `group_latency` after its last
  sample ends (reward, transport, buffer, batch decode), admission sees a new version
  `admission_latency` after its weights are published (notice, worker wake-up), and
  the trainer starts its next step no sooner than `trainer_overhead` after a publish
  (logging, fetching a batch that is there): each stalls a loop that waits on it.
- Modes. `async`: AReaL admission, admitted-and-not-dropped groups
  <= (v + eta + 1) * B; groups that can no longer meet the bound are dropped
  when the version moves (or as they complete, if they became too stale on the way
  to the trainer), handing their budget back unless `drops_free_admission` is off.
  `sync` is `async` with eta = 0: admission then opens only after a sync, so engines idle while the trainer runs, exactly the
  generate-train-sync loop. `april`: rollout rounds of ceil((1 + alpha) * B)
  groups (fewer by what earlier rounds over-delivered); round r may start once
  v >= r - eta, so with eta >= 1 rounds overlap. When round r's B groups are
  in, its unfinished tail moves to round r + 1: if that round already runs the
  tail keeps generating in it, otherwise it is retracted and its partial
  responses resume (re-prefilled) when round r + 1 starts; tail groups that
  can no longer meet eta are dropped. With eta = 0 this is synchronous APRIL,
  whose partials are always too stale, so its gain is the cut-off tail alone.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import os
from collections import deque
from typing import Literal, cast

import msgspec
import numpy as np

Mode = Literal["sync", "async", "april"]
MODES: tuple[str, ...] = ("sync", "async", "april")


class LengthDist(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Response-length distribution; draws are rounded and clipped to [1, max_new_tokens]."""

    kind: Literal["constant", "uniform", "lognormal", "empirical"] = "constant"
    value: int = 256  # constant
    low: int = 1  # uniform, inclusive
    high: int = 512
    median: float = 256.0  # lognormal: exp(Normal(log(median), sigma)); sigma ~1 gives a heavy tail
    sigma: float = 1.0
    values: list[int] = msgspec.field(default_factory=list)  # empirical: resampled uniformly

    def __post_init__(self) -> None:
        problems = {
            "constant": self.value < 1 and f"value must be >= 1, got {self.value}",
            "uniform": not 1 <= self.low <= self.high and f"need 1 <= low <= high, got {self.low}..{self.high}",
            "lognormal": not (self.median > 0 and self.sigma >= 0)
            and f"need median > 0 and sigma >= 0, got {self.median}, {self.sigma}",
            "empirical": (not self.values or min(self.values) < 1) and "values must be non-empty and all >= 1",
        }
        if problems[self.kind]:
            raise ValueError(f"LengthDist({self.kind}): {problems[self.kind]}")

    def sample(self, rng: np.random.Generator, n: int, cap: int) -> np.ndarray:
        if self.kind == "constant":
            draws = np.full(n, self.value)
        elif self.kind == "uniform":
            draws = rng.integers(self.low, self.high + 1, size=n)
        elif self.kind == "lognormal":
            draws = np.rint(rng.lognormal(math.log(self.median), self.sigma, size=n))
        else:
            draws = rng.choice(np.asarray(self.values), size=n)
        return np.clip(draws, 1, cap).astype(np.int64)

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        """`constant:value=300`, `uniform:low=1,high=900`, `lognormal:median=300,sigma=1.2`, `empirical:values=5;80;900`."""
        kind, _, rest = text.partition(":")
        fields: dict[str, object] = {"kind": kind}
        for item in filter(None, rest.split(",")):
            key, _, raw = item.partition("=")
            fields[key] = [int(v) for v in raw.split(";")] if key == "values" else float(raw)
        try:
            return msgspec.convert(fields, cls, strict=False)
        except msgspec.ValidationError as err:
            raise ValueError(f"bad length distribution {text!r}: {err}") from err


class SimParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Cost model in seconds; what `calibrate` fits."""

    decode_base: float = 0.02
    decode_per_seq: float = 1e-4
    decode_per_ctx_token: float = 0.0
    prefill_per_token: float = 0.0
    prefill_per_seq: float = 0.0
    train_base: float = 1.0
    train_per_token: float = 0.0
    sync_time: float = 0.5
    export_time: float = 0.0
    engine_slowdown_training: float = 0.0
    train_busy_engines: float = 0.0
    train_slowdown_generating: float = 0.0
    group_latency: float = 0.0
    admission_latency: float = 0.0
    trainer_overhead: float = 0.0

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"SimParams.{name} must be finite and >= 0, got {value}")


class SimConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The system and workload being modelled."""

    mode: Mode = "async"
    n_engines: int = 1
    batch_groups: int = 8  # B: groups per trainer step
    group_size: int = 8  # G: samples per group
    eta: int = 1
    alpha: float = 0.0  # APRIL over-provisioning
    steps: int = 20
    max_running: int = 256  # per engine
    prompt_tokens: int = 128
    max_new_tokens: int = 1024
    lengths: LengthDist = LengthDist()
    recompute_kv_on_sync: bool = True
    # AReaL admission hands a dropped group's budget back to the workers; False models a system that
    # does not (every stale drop then shrinks the pipeline for good). Async mode only.
    drops_free_admission: bool = True
    # False: the trainer starts its next step while the engines load (see the module docstring).
    trainer_waits_for_sync: bool = True
    pause_engines_training: bool = False  # colocated, explicitly time-sliced (see the module docstring)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"SimConfig.mode must be one of {MODES}, got {self.mode!r}")
        for name in ("n_engines", "batch_groups", "group_size", "steps", "max_running", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"SimConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.eta < 0 or self.prompt_tokens < 0 or not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(
                f"SimConfig needs eta, prompt_tokens, alpha >= 0; got {self.eta}, {self.prompt_tokens}, {self.alpha}"
            )

    @property
    def batch_samples(self) -> int:
        return self.batch_groups * self.group_size

    @property
    def effective_eta(self) -> int:
        return 0 if self.mode == "sync" else self.eta


class StepRecord(msgspec.Struct, frozen=True):
    step: int
    train_start_s: float
    train_end_s: float
    sync_end_s: float
    samples: int
    tokens: int
    mean_staleness: float
    max_staleness: int


class EngineSpan(msgspec.Struct, frozen=True, array_like=True):
    engine: int
    start_s: float
    end_s: float
    batch: int


class SimResult(msgspec.Struct, frozen=True, kw_only=True):
    mode: str
    makespan_s: float
    samples_per_s: float  # trained samples / makespan, warm-up included
    steady_samples_per_s: float  # between the first and last step ends: the pipeline's rate
    groups_per_s: float  # groups completed (trained or not) / makespan
    engine_busy_fraction: float
    trainer_busy_fraction: float
    mean_staleness: float
    max_staleness: int
    tokens_generated: int
    tokens_trained: int
    tokens_recycled: int
    tokens_wasted: int
    groups_dropped: int
    steps: list[StepRecord]
    engine_spans: list[EngineSpan] = msgspec.field(default_factory=list)


# Sample states
_PENDING, _RUNNING, _DONE, _PARKED, _DROPPED = range(5)


class _Group:
    __slots__ = ("samples", "n_done", "version", "dropped", "round")

    def __init__(self, round_: int) -> None:
        self.round = round_  # APRIL rollout round it counts towards
        self.samples: list[_Sample] = []
        self.n_done = 0
        self.version = -1
        self.dropped = False


class _Sample:
    __slots__ = ("group", "target", "generated", "version", "state", "engine", "join_steps", "join_id", "ctx_off")

    def __init__(self, group: _Group, target: int) -> None:
        self.group = group
        self.target = target
        self.generated = 0  # tokens generated before the current join
        self.version = -1
        self.state = _PENDING
        self.engine: _Engine | None = None
        self.join_steps = 0
        self.join_id = -1
        self.ctx_off = 0


class _Engine:
    """Context tokens summed over running sequences = ctx_off + running * steps."""

    __slots__ = (
        "eid",
        "steps",
        "heap",
        "running",
        "ctx_off",
        "joins",
        "paused",
        "epoch",
        "t0",
        "seg_start",
        "seg_k",
        "seg_end",
        "step_a",
        "step_c",
        "busy",
        "kv_recompute",
        "slowdown",
    )

    def __init__(self, eid: int) -> None:
        self.eid = eid
        self.steps = 0  # decode steps executed since the start
        self.heap: list[tuple[int, int, _Sample]] = []  # (finish step, join id, sample); stale entries skipped
        self.running = 0
        self.ctx_off = 0
        self.joins: list[_Sample] = []
        self.paused = False
        self.epoch = 0
        self.t0 = 0.0  # start of the current segment (prefill + decode)
        self.seg_start = 0.0  # decode start
        self.seg_k = 0
        self.seg_end: float | None = None  # None: no segment planned
        self.step_a = 0.0  # first decode step's time in this segment
        self.step_c = 0.0  # growth of step time per step (context cost)
        self.busy = 0.0
        self.kv_recompute = False
        self.slowdown = 1.0  # engine work takes this many times its cost (colocated with a training trainer)

    def decode_time(self, k: int) -> float:
        return k * self.step_a + self.step_c * k * (k - 1) / 2

    def steps_done(self, elapsed: float) -> int:
        """Whole decode steps of the current segment finished `elapsed` s after decode start."""
        if elapsed <= 0:
            return 0
        if self.step_c == 0:
            k = self.seg_k if self.step_a == 0 else int(elapsed / self.step_a)
        else:
            half = self.step_c / 2
            b = self.step_a - half
            k = int((-b + math.sqrt(b * b + 4 * half * elapsed)) / (2 * half))
        k = max(0, min(k, self.seg_k))
        slack = 1e-12 * max(1.0, elapsed)
        while k < self.seg_k and self.decode_time(k + 1) <= elapsed + slack:
            k += 1
        while k > 0 and self.decode_time(k) > elapsed + slack:
            k -= 1
        return k


_ENGINE, _TRAIN_DONE, _SYNC_DONE, _GROUP_READY, _VERSION_SEEN, _TRAINER_FREE, _EXPORT_DONE = range(7)


def _running_engines(groups: list[_Group]) -> set[_Engine]:
    """The engines that hold a running sample of `groups`."""
    engines: set[_Engine] = set()
    for g in groups:
        for s in g.samples:
            if s.state == _RUNNING:
                assert s.engine is not None  # a running sample is always on an engine
                engines.add(s.engine)
    return engines


class _Simulation:
    def __init__(self, cfg: SimConfig, params: SimParams, record_spans: bool) -> None:
        self.cfg = cfg
        self.p = params
        self.eta = cfg.effective_eta
        self.rng = np.random.default_rng(cfg.seed)
        self.record_spans = record_spans
        self.spans: list[EngineSpan] = []
        self.events: list[tuple[float, int, int, object, int]] = []
        self.counter = itertools.count()
        self.join_ids = itertools.count()
        self.engines = [_Engine(i) for i in range(cfg.n_engines)]
        self.free: set[int] = set(range(cfg.n_engines))  # unpaused engines with a free slot
        self.needs_plan: list[_Engine] = []
        self.pending: deque[_Sample] = deque()
        self.inflight: dict[int, _Group] = {}  # id(group) -> group, admitted and not complete
        self.buffer: list[tuple[int, int, _Group]] = []  # (version, completion order, group)
        self.version = 0
        self.admit_version = 0  # the version admission has heard of (admission_latency behind)
        self.trainer_busy = False
        self.train_started = 0
        self.train_time = 0.0
        self.admitted = 0
        self.dropped = 0
        self.completed = 0
        self.trained_groups = 0
        self.round_next = 0  # APRIL: next round to launch
        self.round_close = 0  # APRIL: oldest round still open
        self.parked: list[_Group] = []  # APRIL: retracted tail waiting for round `round_close` to launch
        self.steps: list[StepRecord] = []
        self.current_step: tuple[int, float, int, int, float, int] | None = None
        # Trained steps not yet published, as (step, start, train end, samples, tokens, mean and max staleness).
        self.unpublished: deque[tuple[int, float, float, int, int, float, int]] = deque()
        self.exported = 0  # of them, how many have their weights ready for the engines
        self.syncing = False
        self.training = False
        self.generating = 0  # engines with a decode segment planned
        # A train step slowed while engines generate: its epoch, alone-seconds of work left at `train_mark`, its end.
        self.train_epoch = 0
        self.train_left = 0.0
        self.train_mark = 0.0
        self.train_slow = False
        self.train_end_at = 0.0
        self.staleness_sum = 0
        self.staleness_max = 0
        self.tokens_generated = 0
        self.tokens_trained = 0
        self.tokens_recycled = 0
        self.tokens_wasted = 0
        self.done_at: float | None = None

    # --- event loop ---------------------------------------------------------

    def push(self, at: float, kind: int, ref: object = None, epoch: int = 0) -> None:
        heapq.heappush(self.events, (at, next(self.counter), kind, ref, epoch))

    def run(self) -> SimResult:
        self.settle(0.0)
        while self.events and self.done_at is None:
            now, _, kind, ref, epoch = heapq.heappop(self.events)
            # `kind` says what `ref` is (see the push calls).
            if kind == _ENGINE:
                engine = cast(_Engine, ref)
                if engine.epoch != epoch:
                    continue
                self.on_engine_event(engine, now)
            elif kind == _TRAIN_DONE:
                if epoch != self.train_epoch:
                    continue
                self.on_train_done(now)
            elif kind == _SYNC_DONE:
                self.end_sync(now, paused=True)
            elif kind == _GROUP_READY:
                self.group_ready(cast(_Group, ref), now)
            elif kind == _TRAINER_FREE:
                self.trainer_busy = False
            elif kind == _EXPORT_DONE:
                self.on_export_done(now)
            else:
                self.admit_version = max(self.admit_version, cast(int, ref))
            self.settle(now)
        if self.done_at is None:
            raise RuntimeError("simulation stalled before the last step: no engine can make progress")
        return self.result()

    def settle(self, now: float) -> None:
        """Everything that may follow any event: close/open rounds, admit, hand out work, train.

        Training starts last so that it sees which engines have work (colocation costs)."""
        self.drop_untrainable(now)
        if self.cfg.mode == "april":
            self.april_rounds(now)
        if self.cfg.mode != "april":
            limit = (self.admit_version + self.eta + 1) * self.cfg.batch_groups
            self.admit(limit - (self.admitted - (self.dropped if self.cfg.drops_free_admission else 0)))
        self.dispatch(now)
        while self.needs_plan:
            engine = self.needs_plan.pop()
            if engine.seg_end is None and not engine.paused:
                self.plan(engine, now)
        self.try_train(now)
        self.retime_training(now)

    # --- engines ------------------------------------------------------------

    def plan(self, e: _Engine, now: float) -> None:
        """Start the next segment: prefill joiners (and recomputed KV), decode to the next completion."""
        cfg, p = self.cfg, self.p
        prefill = e.ctx_off + e.running * e.steps if e.kv_recompute else 0
        e.kv_recompute = False
        while len(e.joins) < cfg.max_running - e.running and self.pending:
            e.joins.append(self.pending.popleft())
        prefill_time = p.prefill_per_seq * len(e.joins)
        for s in e.joins:
            ctx = cfg.prompt_tokens + s.generated
            prefill += ctx
            s.state, s.engine, s.join_steps, s.join_id = _RUNNING, e, e.steps, next(self.join_ids)
            s.ctx_off = ctx - e.steps
            e.running += 1
            e.ctx_off += s.ctx_off
            if s.version < 0:
                s.version = self.version
                if s.group.version < 0:
                    s.group.version = self.version
            heapq.heappush(e.heap, (e.steps + s.target - s.generated, s.join_id, s))
        e.joins.clear()
        self.refresh_free(e)
        e.t0 = now
        top = self.next_finish(e)
        if top is None:
            e.seg_end = None
            return
        e.seg_start = now + e.slowdown * (prefill_time + p.prefill_per_token * prefill)
        e.step_a = e.slowdown * (
            p.decode_base + p.decode_per_seq * e.running + p.decode_per_ctx_token * (e.ctx_off + e.running * e.steps)
        )
        e.step_c = e.slowdown * p.decode_per_ctx_token * e.running
        e.seg_k = top - e.steps
        self.schedule(e, e.seg_start + e.decode_time(e.seg_k))

    def schedule(self, e: _Engine, at: float) -> None:
        if e.seg_end is None:
            self.generating += 1
        e.seg_end = at
        e.epoch += 1
        self.push(at, _ENGINE, e, e.epoch)

    def next_finish(self, e: _Engine) -> int | None:
        heap = e.heap
        while heap:
            finish, join_id, s = heap[0]
            if s.state == _RUNNING and s.join_id == join_id:
                return finish
            heapq.heappop(heap)
        return None

    def set_slowdown(self, slowdown: float, now: float) -> None:
        """Stretch (or shrink) every engine's remaining work from `now` on: elapsed work keeps its progress."""
        for e in self.engines:
            if e.slowdown == slowdown:
                continue
            ratio, e.slowdown = slowdown / e.slowdown, slowdown
            if e.seg_end is not None:
                e.seg_start = now - (now - e.seg_start) * ratio
                e.step_a *= ratio
                e.step_c *= ratio
                self.schedule(e, e.seg_start + e.decode_time(e.seg_k))

    def refresh_free(self, e: _Engine) -> None:
        if not e.paused and e.running + len(e.joins) < self.cfg.max_running:
            self.free.add(e.eid)
        else:
            self.free.discard(e.eid)

    def close_segment(self, e: _Engine, now: float, steps: int) -> None:
        e.steps += steps
        e.busy += now - e.t0
        if self.record_spans and now > e.t0:
            self.spans.append(EngineSpan(e.eid, e.t0, now, e.running))
        e.t0 = now
        e.seg_end = None
        self.generating -= 1
        e.epoch += 1
        self.collect_finished(e, now)

    def on_engine_event(self, e: _Engine, now: float) -> None:
        self.close_segment(e, now, e.seg_k)
        if not e.paused:
            self.plan(e, now)

    def interrupt(self, e: _Engine, now: float) -> None:
        """Stop mid-step: whole steps done so far count, the step in progress is lost."""
        if e.seg_end is not None:
            self.close_segment(e, now, e.steps_done(now - e.seg_start))

    def wake(self, e: _Engine, now: float) -> None:
        """New work for a running engine joins at its next step boundary (continuous batching)."""
        if e.seg_end is None:
            self.needs_plan.append(e)
            return
        k = e.steps_done(now - e.seg_start)
        if now > e.seg_start and e.seg_start + e.decode_time(k) < now:
            k += 1
        if k < e.seg_k:
            e.seg_k = k
            self.schedule(e, e.seg_start + e.decode_time(k))

    def collect_finished(self, e: _Engine, now: float) -> None:
        while (finish := self.next_finish(e)) is not None and finish <= e.steps:
            s = heapq.heappop(e.heap)[2]
            self.leave_engine(s)
            s.state = _DONE
            group = s.group
            group.n_done += 1
            if group.n_done == len(group.samples) and not group.dropped:
                self.completed += 1
                del self.inflight[id(group)]
                if self.p.group_latency:
                    self.push(now + self.p.group_latency, _GROUP_READY, group)
                else:
                    self.group_ready(group, now)
        self.refresh_free(e)

    def group_ready(self, group: _Group, now: float) -> None:
        """A complete group reaches the buffer, unless the version moved past its bound on the way."""
        if group.version < self.version - self.eta:
            self.drop_groups([group], now)
        else:
            heapq.heappush(self.buffer, (group.version, next(self.counter), group))

    def leave_engine(self, s: _Sample) -> None:
        """Take a running sample off its engine (whose steps must be current), keeping its tokens."""
        e = s.engine
        assert e is not None
        generated = min(s.target, s.generated + e.steps - s.join_steps)
        self.tokens_generated += generated - s.generated
        s.generated = generated
        s.engine = None
        s.state = _PARKED
        e.running -= 1
        e.ctx_off -= s.ctx_off

    def progress(self, s: _Sample, now: float) -> int:
        """Tokens a sample has generated by `now`, whether running or not."""
        e = s.engine
        if e is None or s.state != _RUNNING:
            return s.generated
        in_segment = e.steps_done(now - e.seg_start) if e.seg_end is not None else 0
        return min(s.target, s.generated + e.steps + in_segment - s.join_steps)

    def dispatch(self, now: float) -> None:
        """Spread queued samples over engines with free slots, least loaded first."""
        if not self.pending or not self.free:
            return
        loads = [(self.engines[i].running + len(self.engines[i].joins), i) for i in self.free]
        heapq.heapify(loads)
        touched = set()
        while self.pending and loads:
            load, i = heapq.heappop(loads)
            e = self.engines[i]
            e.joins.append(self.pending.popleft())
            touched.add(i)
            if load + 1 < self.cfg.max_running:
                heapq.heappush(loads, (load + 1, i))
        for i in touched:
            e = self.engines[i]
            self.refresh_free(e)
            self.wake(e, now)

    # --- admission and rounds -----------------------------------------------

    def admit(self, n_groups: int, round_: int = 0) -> None:
        if n_groups <= 0:
            return
        g = self.cfg.group_size
        lengths = self.cfg.lengths.sample(self.rng, n_groups * g, self.cfg.max_new_tokens).tolist()
        for start in range(0, len(lengths), g):
            group = _Group(round_)
            group.samples = [_Sample(group, length) for length in lengths[start : start + g]]
            self.inflight[id(group)] = group
            self.pending.extend(group.samples)
        self.admitted += n_groups

    def april_rounds(self, now: float) -> None:
        """Close rounds whose quota is met (retracting their tail) and launch rounds eta allows."""
        B = self.cfg.batch_groups
        while True:
            available = self.trained_groups + len(self.buffer)
            if self.round_close < self.round_next and available >= (self.round_close + 1) * B:
                self.round_close += 1
                tail = [g for g in self.inflight.values() if g.round == self.round_close - 1]
                for g in tail:
                    g.round = self.round_close
                    self.tokens_recycled += sum(self.progress(s, now) for s in g.samples if s.state != _DONE)
                if self.round_close < self.round_next:
                    # The next round is already generating: its tail simply keeps running in it.
                    self.drop_groups([g for g in tail if 0 <= g.version < self.round_close - self.eta], now)
                else:
                    self.retract(tail, now)
                continue
            if self.admit_version < self.round_next - self.eta:
                return
            r = self.round_next
            self.drop_groups([g for g in self.parked if 0 <= g.version < r - self.eta], now)
            carried = [g for g in self.parked if not g.dropped]
            self.parked = []
            resumed = [s for g in carried for s in g.samples if s.state == _PARKED]
            for s in resumed:
                s.state = _PENDING
            self.pending.extendleft(reversed(resumed))
            surplus = max(0, available - r * B)
            self.admit(math.ceil((1 + self.cfg.alpha) * B) - len(carried) - surplus, r)
            self.round_next += 1

    def retract(self, tail: list[_Group], now: float) -> None:
        """Stop unfinished groups, keeping partial responses to resume when the next round launches."""
        engines = _running_engines(tail)
        for e in engines:
            self.interrupt(e, now)  # may finish samples on this very step
        for g in tail:
            for s in g.samples:
                if s.state == _RUNNING:
                    self.leave_engine(s)
                elif s.state == _PENDING:
                    s.state = _PARKED
        self.parked = [g for g in tail if id(g) in self.inflight]
        self.pending = deque(s for s in self.pending if s.state == _PENDING)
        for e in engines:
            self.refresh_free(e)
            self.needs_plan.append(e)

    def drop_groups(self, groups: list[_Group], now: float) -> None:
        """Groups that can no longer meet eta: their tokens are wasted, their admission slots freed."""
        groups = [g for g in groups if not g.dropped]
        if not groups:
            return
        for g in groups:
            g.dropped = True
            self.dropped += 1
            self.inflight.pop(id(g), None)
        engines = _running_engines(groups)
        for e in engines:
            self.interrupt(e, now)
        for g in groups:
            for s in g.samples:
                if s.state == _RUNNING:
                    self.leave_engine(s)
                self.tokens_wasted += s.generated
                s.state = _DROPPED
        self.pending = deque(s for s in self.pending if s.state == _PENDING)
        for e in engines:
            self.refresh_free(e)
            self.needs_plan.append(e)

    # --- trainer ------------------------------------------------------------

    def drop_untrainable(self, now: float) -> None:
        """Buffered groups too stale for the trainer's next step: only a trainer that runs ahead of
        the engines' version (`trainer_waits_for_sync` off) meets them before a publish drops them."""
        if self.trainer_busy:
            return
        stale = []
        while self.buffer and self.buffer[0][0] < self.train_started - self.eta:
            stale.append(heapq.heappop(self.buffer)[2])
        self.drop_groups(stale, now)

    def try_train(self, now: float) -> None:
        cfg = self.cfg
        if self.trainer_busy or self.train_started >= cfg.steps or len(self.buffer) < cfg.batch_groups:
            return
        step = self.train_started
        groups = [heapq.heappop(self.buffer)[2] for _ in range(cfg.batch_groups)]
        samples = [s for g in groups for s in g.samples]
        staleness = [step - s.version for s in samples]
        assert max(staleness) <= self.eta, "staleness bound broken"
        response = sum(s.target for s in samples)
        tokens = response + cfg.prompt_tokens * len(samples)
        self.tokens_trained += response
        self.staleness_sum += sum(staleness)
        self.staleness_max = max(self.staleness_max, max(staleness))
        self.trained_groups += cfg.batch_groups
        busy_engines = sum(e.running > 0 for e in self.engines) / cfg.n_engines if self.p.train_busy_engines else 0.0
        duration = self.p.train_base + self.p.train_per_token * tokens + self.p.train_busy_engines * busy_engines
        self.train_time += duration
        self.trainer_busy = self.training = True
        self.train_started += 1
        self.current_step = (step, now, len(samples), tokens, sum(staleness) / len(samples), max(staleness))
        if self.cfg.pause_engines_training:
            self.pause_engines(now)
        self.train_left, self.train_mark, self.train_slow = duration, now, self.generating > 0
        self.train_end_at = self.time_training(now)
        self.train_time += self.train_end_at - (now + duration)  # 0 unless engines slow it from the start
        if self.p.engine_slowdown_training:
            self.set_slowdown(1.0 + self.p.engine_slowdown_training, now)

    def time_training(self, now: float) -> float:
        """(Re)schedule the train step's end from the work it has left and whether engines generate."""
        end = now + self.train_left * (1.0 + self.p.train_slowdown_generating if self.train_slow else 1.0)
        self.train_epoch += 1
        self.push(end, _TRAIN_DONE, None, self.train_epoch)
        return end

    def retime_training(self, now: float) -> None:
        """A train step slowed by generating engines speeds up when they all stop, and the other way round."""
        if not (self.training and self.p.train_slowdown_generating) or (self.generating > 0) == self.train_slow:
            return
        rate = 1.0 / (1.0 + self.p.train_slowdown_generating) if self.train_slow else 1.0
        self.train_left -= (now - self.train_mark) * rate
        self.train_mark, self.train_slow = now, not self.train_slow
        end = self.time_training(now)
        self.train_time += end - self.train_end_at
        self.train_end_at = end

    def pause_engines(self, now: float) -> None:
        for e in self.engines:
            self.interrupt(e, now)
            e.paused = True
        self.free.clear()

    def resume_engines(self) -> None:
        for e in self.engines:
            e.paused = False
            e.kv_recompute = self.cfg.recompute_kv_on_sync and e.running > 0
            self.refresh_free(e)
            self.needs_plan.append(e)

    def on_train_done(self, now: float) -> None:
        assert self.current_step is not None
        step, start, n, tokens, mean_st, max_st = self.current_step
        self.unpublished.append((step, start, now, n, tokens, mean_st, max_st))
        self.training = False
        self.set_slowdown(1.0, now)
        if self.cfg.pause_engines_training and not self.syncing:
            self.resume_engines()
        if self.p.export_time:
            self.push(now + self.p.export_time, _EXPORT_DONE)
        else:
            self.on_export_done(now)

    def on_export_done(self, now: float) -> None:
        self.exported += 1
        self.start_sync(now)

    def start_sync(self, now: float) -> None:
        """The engines take the oldest exported weights, once no other sync is in progress."""
        if self.syncing or not self.exported:
            return
        self.exported -= 1
        if not self.cfg.trainer_waits_for_sync:
            self.release_trainer(now)
        if self.p.sync_time == 0:
            self.end_sync(now, paused=False)
            return
        self.syncing = True
        self.pause_engines(now)
        self.push(now + self.p.sync_time, _SYNC_DONE)

    def release_trainer(self, now: float) -> None:
        if self.p.trainer_overhead:
            self.push(now + self.p.trainer_overhead, _TRAINER_FREE)
        else:
            self.trainer_busy = False

    def end_sync(self, now: float, *, paused: bool) -> None:
        self.syncing = False
        step, start, train_end, n, tokens, mean_st, max_st = self.unpublished.popleft()
        self.steps.append(StepRecord(step, start, train_end, now, n, tokens, mean_st, max_st))
        if len(self.steps) == self.cfg.steps:
            self.done_at = now
            return
        self.version += 1
        if self.cfg.trainer_waits_for_sync:
            self.release_trainer(now)
        if self.p.admission_latency:
            self.push(now + self.p.admission_latency, _VERSION_SEEN, self.version)
        else:
            self.admit_version = self.version
        threshold = self.version - self.eta
        stale = [g for g in self.inflight.values() if 0 <= g.version < threshold]
        while self.buffer and self.buffer[0][0] < threshold:
            stale.append(heapq.heappop(self.buffer)[2])
        self.drop_groups(stale, now)
        if paused and not (self.training and self.cfg.pause_engines_training):
            self.resume_engines()
        self.start_sync(now)  # the next step's weights, if they were exported during this sync

    def result(self) -> SimResult:
        cfg = self.cfg
        makespan = self.done_at or 0.0
        if makespan <= 0:
            raise ValueError("every cost in SimParams is zero: the run takes no time and has no throughput")
        trained = sum(r.samples for r in self.steps)
        first, last = self.steps[0], self.steps[-1]
        steady = (
            (trained - first.samples) / (last.sync_end_s - first.sync_end_s)
            if len(self.steps) > 1 and last.sync_end_s > first.sync_end_s
            else trained / makespan
        )
        for e in self.engines:
            if e.seg_end is not None:  # work cut off by the end of the run still counts as busy
                e.busy += makespan - e.t0
        return SimResult(
            mode=cfg.mode,
            makespan_s=makespan,
            samples_per_s=trained / makespan,
            steady_samples_per_s=steady,
            groups_per_s=self.completed / makespan,
            engine_busy_fraction=sum(e.busy for e in self.engines) / (cfg.n_engines * makespan),
            trainer_busy_fraction=self.train_time / makespan,
            mean_staleness=self.staleness_sum / trained,
            max_staleness=self.staleness_max,
            tokens_generated=self.tokens_generated,
            tokens_trained=self.tokens_trained,
            tokens_recycled=self.tokens_recycled,
            tokens_wasted=self.tokens_wasted,
            groups_dropped=self.dropped,
            steps=self.steps,
            engine_spans=self.spans,
        )


def simulate(config: SimConfig, params: SimParams, *, record_spans: bool = False) -> SimResult:
    """Run `config.steps` trainer steps; `record_spans` keeps every engine segment for `write_trace`."""
    return _Simulation(config, params, record_spans).run()


def write_trace(result: SimResult, path: str) -> None:
    """Draw a simulated run in Perfetto: train steps, weight syncs, and engine segments if recorded."""
    from async_rl.trace import Tracer, merge

    stream = f"{path}.part"
    with Tracer(stream, process_name=f"simulated {result.mode}", pid=0) as tracer:
        for r in result.steps:
            tracer.complete(
                f"train step {r.step}",
                "trainer",
                r.train_start_s,
                r.train_end_s,
                samples=r.samples,
                tokens=r.tokens,
                mean_staleness=r.mean_staleness,
            )
            if r.sync_end_s > r.train_end_s:
                tracer.complete(f"sync v{r.step + 1}", "weight-sync", r.train_end_s, r.sync_end_s)
        for span in sorted(result.engine_spans, key=lambda s: (s.engine, s.start_s)):
            tracer.complete("generate", f"engine-{span.engine}", span.start_s, span.end_s, batch=span.batch)
    merge([stream], path)
    os.remove(stream)


def _table(rows: list[tuple[str, SimResult]]) -> str:
    columns = [
        ("run", lambda r: ""),
        ("samples/s", lambda r: f"{r.samples_per_s:.2f}"),
        ("steady/s", lambda r: f"{r.steady_samples_per_s:.2f}"),
        ("groups/s", lambda r: f"{r.groups_per_s:.2f}"),
        ("engine busy", lambda r: f"{r.engine_busy_fraction:.2f}"),
        ("trainer busy", lambda r: f"{r.trainer_busy_fraction:.2f}"),
        ("staleness", lambda r: f"{r.mean_staleness:.2f}/{r.max_staleness}"),
        ("tok gen", lambda r: str(r.tokens_generated)),
        ("tok recycled", lambda r: str(r.tokens_recycled)),
        ("tok wasted", lambda r: str(r.tokens_wasted)),
        ("dropped", lambda r: str(r.groups_dropped)),
    ]
    cells = [[name for name, _ in columns]] + [[label] + [fmt(r) for _, fmt in columns[1:]] for label, r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in cells)


def _length_arg(text: str) -> LengthDist:
    try:
        return LengthDist.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m staleness.experiments.simulator", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--mode", default="sync,async,april", help="comma-separated modes to compare")
    parser.add_argument("--eta", type=int, default=1)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--engines", type=int, default=8)
    parser.add_argument("--batch-groups", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-running", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=4096)
    parser.add_argument(
        "--lengths",
        type=_length_arg,
        default=LengthDist(kind="lognormal", median=300, sigma=1.0),
        help="e.g. constant:value=300, uniform:low=1,high=900, lognormal:median=300,sigma=1.2",
    )
    parser.add_argument("--params", default="{}", help="SimParams as JSON, e.g. '{\"train_base\": 2.0}'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace", help="write the last mode's timeline here (Perfetto JSON)")
    args = parser.parse_args(argv)
    try:
        params = msgspec.json.decode(args.params, type=SimParams)
        configs = [
            SimConfig(
                mode=mode,
                n_engines=args.engines,
                batch_groups=args.batch_groups,
                group_size=args.group_size,
                eta=args.eta,
                alpha=args.alpha,
                steps=args.steps,
                max_running=args.max_running,
                prompt_tokens=args.prompt_tokens,
                max_new_tokens=args.max_new_tokens,
                lengths=args.lengths,
                seed=args.seed,
            )
            for mode in args.mode.split(",")
        ]
    except (ValueError, msgspec.ValidationError, msgspec.DecodeError) as err:
        parser.error(str(err))
    rows = [
        (
            f"{c.mode} eta={c.effective_eta}" + (f" a={c.alpha}" if c.mode == "april" else ""),
            simulate(c, params, record_spans=bool(args.trace)),
        )
        for c in configs
    ]
    print(_table(rows))
    if args.trace:
        write_trace(rows[-1][1], args.trace)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
