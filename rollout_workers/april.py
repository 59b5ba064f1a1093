"""The APRIL controller: over-provision rollout rounds, retract their long tail, recycle it.

It follows the model in staleness/experiments/simulator.py (mode "april"), per worker with its share
b = groups_per_step / workers of every batch:

- Rollout rounds of ceil((1 + alpha) * b) groups, fewer by the groups carried over and by
  what earlier rounds over-delivered. Round r may start once the trainer's version v >= r - eta.
- Round r closes when this worker's accepted groups (sent to the buffer, minus those the
  trainer reported dropped) reach (r + 1) * b. Its unfinished tail moves to round r + 1: if
  that round already runs, the tail keeps generating in it; otherwise it is retracted
  (/abort_request of the tail's rids: a running request finishes after its current step and
  returns every token it made) and its partial responses go to the buffer's partial pool.
  When round r + 1 starts it first takes them back and resumes them, on any
  engine; groups whose oldest token is older than r + 1 - eta are dropped (counted, wasted).
- In flight, any group whose oldest token falls behind v - eta is dropped at once: it could
  never be trained.

Admission: over-provisioning launches beyond AReaL's (v + eta + 1) * b limit, by alpha * b
per open round plus the unfinished extra still in flight from earlier rounds. The worker's
admission controller therefore runs with its eta raised by ceil(alpha): that is the limit
APRIL works within (a launch waits for it), and the round gate above keeps generation in
step with training. The staleness bound itself is never relaxed: what would break eta is
dropped and counted.

What to expect (measured and simulated, benchmarks/RESULTS.md): a round launched as early as
the gate allows (v = r - eta) has no staleness slack left, so the tail it retracts is mostly
too stale to resume once round r + 1 starts, and those tokens count as wasted; and where the
trainer is the bottleneck, retraction frees engines that would idle anyway. Small alpha keeps
APRIL about even with plain async there; its gain needs an engine-bound loop.

Retraction never pauses an engine: engines are shared with the trainer's weight sync, whose
pause a retraction's continue would end early (pause and continue are not counted).

The partial pool is shared by all workers; each takes back only its own groups' partials
(TakePartials.group_prefix), so every worker's admission accounts for exactly what it retracted.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Protocol

from async_rl.trace import Tracer
from rollout_workers.group import GroupRollout, abort_requests, stop_group
from staleness.admission import AdmissionController

log = logging.getLogger("april")
TRACK = "april"


@dataclass
class AprilPlan:
    """The round arithmetic alone (no I/O): the rules of staleness/experiments/simulator.py's april_rounds."""

    share: int  # b: this worker's groups per trainer step
    alpha: float
    eta: int
    round_next: int = 0  # next round to launch
    round_close: int = 0  # oldest round still open

    @property
    def round_size(self) -> int:
        return math.ceil((1 + self.alpha) * self.share)

    def closable(self, accepted_groups: int) -> bool:
        return self.round_close < self.round_next and accepted_groups >= (self.round_close + 1) * self.share

    def launchable(self, version: int) -> bool:
        return version >= self.round_next - self.eta

    def new_groups(self, accepted_groups: int, carried: int) -> int:
        """Groups to admit for the round about to launch."""
        surplus = max(0, accepted_groups - self.round_next * self.share)
        return max(0, self.round_size - carried - surplus)


class GroupHost(Protocol):
    """What the controller asks of the rollout worker that owns it (rollout_workers.worker.RolloutWorker)."""

    admission: AdmissionController
    active: dict[str, GroupRollout]  # the worker's groups in flight, by id

    def start_group(self, group: GroupRollout) -> None:
        """Run `group` to its end in the worker's task group."""

    async def new_group(self, round_: int) -> GroupRollout | None:
        """Admit and return a fresh group; None when the task source is exhausted."""

    async def take_partials(self, max_n: int, min_version: int) -> list[GroupRollout]:
        """The pool's partial groups fresh enough for a round (after every retracted group sent so far is durable)."""

    def account_drop(self, group: GroupRollout, *, partial: bool = False, admitted: bool = True) -> None:
        """Account for a group that will never be trained."""


class AprilController:
    """Owns the rounds; its host worker starts groups, admits new ones and reports completions."""

    def __init__(self, plan: AprilPlan, pool, tracer: Tracer, *, host: GroupHost, group_size: int):
        self.plan = plan
        self.pool = pool
        self.tracer = tracer
        self.host = host
        self.group_size = group_size
        self.parked: dict[str, GroupRollout] = {}
        self.retracting: list[GroupRollout] = []  # stopped, their tasks may still be returning
        self._changed = asyncio.Event()
        self.exhausted = False

    @property
    def accepted_groups(self) -> int:
        return self.host.admission.accepted // self.group_size

    def wake(self) -> None:
        self._changed.set()

    def group_ended(self, group: GroupRollout) -> None:
        """A group task returned: complete (accepted), dropped, or retracted (parked in the pool)."""
        if group.retracting and not group.complete and not group.dropped:
            self.parked[group.group_id] = group
        self.wake()

    async def run(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            await self.step()

    async def step(self) -> None:
        plan = self.plan
        while True:
            self.reopen_short_rounds()
            if plan.closable(self.accepted_groups):
                closing = plan.round_close
                plan.round_close += 1
                tail = [g for g in self.host.active.values() if g.round == closing]
                for group in tail:
                    group.round = plan.round_close
                if plan.round_close < plan.round_next:
                    # The next round already generates: the tail keeps going in it unless it can no longer meet eta.
                    for group in tail:
                        version = group.oldest_version
                        if version is not None and version < plan.round_close - plan.eta:
                            log.info("dropping stale tail group %s (oldest version %d)", group.group_id, version)
                            await stop_group(group, self.pool)
                elif tail:
                    await self.retract(tail)
                continue
            if self.exhausted or not plan.launchable(self.host.admission.version):
                return
            await self.launch()

    def reopen_short_rounds(self) -> None:
        """Reopen closed rounds that drops left short of their batches.

        A round closes on groups accepted so far; the buffer may later drop some of them as too
        stale (a round's surplus, generated at its launch version, can be older than the next
        batch allows) and credit them back. The closed rounds then no longer cover their
        batches, and with nothing in flight the gate would wait for a version the trainer can
        never reach: the short rounds open again and the next launch (parked tail first) fills them.
        """
        plan = self.plan
        covered = self.accepted_groups // plan.share
        if covered >= plan.round_close:
            return
        log.info("rounds %d..%d lost accepted groups to drops: reopened", covered, plan.round_close - 1)
        plan.round_close = covered
        if not self.host.active:
            plan.round_next = covered

    async def launch(self) -> None:
        plan = self.plan
        r = plan.round_next
        carried = await self.resume_parked(r)
        count = plan.new_groups(self.accepted_groups, len(carried))
        log.info(
            "round %d: %d resumed + %d new groups (v=%d, accepted %d groups)",
            r,
            len(carried),
            count,
            self.host.admission.version,
            self.accepted_groups,
        )
        self.tracer.instant(f"round {r}", TRACK, resumed=len(carried), new=count, version=self.host.admission.version)
        plan.round_next += 1
        for _ in range(count):
            group = await self.host.new_group(r)
            if group is None:
                self.exhausted = True
                break
            self._start(group)

    async def resume_parked(self, round_: int) -> list[GroupRollout]:
        """Take this round's partials back from the pool; the too-stale ones the pool dropped are counted."""
        # A retracted group is parked (its partials sent) once its task returned.
        await asyncio.gather(*(group.ended.wait() for group in self.retracting))
        self.retracting.clear()
        if not self.parked:
            return []
        min_version = round_ - self.plan.eta
        with self.tracer.span("take partials", TRACK, round=round_, min_version=min_version) as span:
            taken = await self.host.take_partials(len(self.parked) * self.group_size, min_version)
            span["groups"] = len(taken)
        by_id = {group.group_id: group for group in taken}
        resumed = []
        for group_id, parked in list(self.parked.items()):
            del self.parked[group_id]
            # Retracted before its first token: nothing went to the pool, it restarts from here.
            group = by_id.pop(group_id, None) if parked.oldest_version is not None else parked
            if group is None:
                self.host.account_drop(parked, partial=True)
                continue
            group.round, group.retracting = round_, False
            resumed.append(group)
            self._start(group)
        for group in by_id.values():  # left in the pool by an earlier run of this worker: adopt if budget allows
            if self.host.admission.try_admit(group.size):
                group.round = round_
                resumed.append(group)
                self._start(group)
            else:
                self.host.account_drop(group, partial=True, admitted=False)
        return resumed

    def _start(self, group: GroupRollout) -> None:
        self.host.active[group.group_id] = group  # at once: a round closing before its task runs must see it
        group.ended.clear()
        self.host.start_group(group)

    async def retract(self, tail: list[GroupRollout]) -> None:
        """Stop the tail on every engine that runs it; the group tasks then park it in the pool."""
        live: dict[int, list[str]] = defaultdict(list)
        for group in tail:
            group.retracting = True
            if group.live is not None:
                engine, rids = group.live
                live[engine].extend(rids)
        with self.tracer.span(
            "retract",
            TRACK,
            groups=len(tail),
            tokens=sum(g.tokens for g in tail),
            engines=len(live),
        ):
            async with asyncio.TaskGroup() as tasks:
                for engine, rids in live.items():
                    tasks.create_task(abort_requests(self.pool.clients[engine], rids))
        self.retracting.extend(tail)
