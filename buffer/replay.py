"""The versioned replay buffer's state: groups, partial pool, served/dropped ids, retained batches.

A served batch belongs to its trainer version: it is kept (`retained`) until the trainer reports a
checkpoint at a later version, and a trainer asking again for a version it was served (one resumed
from a checkpoint after a crash) gets the very same samples. So a trainer crash loses no
acknowledged trajectory, none is trained twice in the model's history, and a resumed run
replays exactly.

Pure and synchronous. Every change goes through `apply(record)` with a WAL
record, both live and during recovery, so the state rebuilt from the log is
the state that was acknowledged. `admit`/`plan_*` only decide; the service
logs the resulting records, commits, applies them, and only then replies.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from async_rl.messages import BufferStats, TrajectoryAck, WorkerRecovery
from buffer.frames import TrajectoryHeader, read_header
from buffer.wal import Dropped, PartialsTaken, Put, Released, Served, WalRecord

StalePolicy = Literal["drop", "keep"]
Sampling = Literal["fifo", "stalest_first", "freshest_first"]


@dataclass(slots=True)
class Entry:
    header: TrajectoryHeader
    frame: msgspec.Raw  # exactly as it arrived; served without re-encoding
    oldest_version: int  # computed once: min over ~1k token versions is not free


@dataclass(slots=True)
class Group:
    """Members only leave together (served or dropped), so the oldest version only ever decreases."""

    size: int
    members: dict[str, Entry] = field(default_factory=dict)
    completed_seq: int = -1  # order in which groups became complete: FIFO key
    oldest_version: int = 2**62

    @property
    def complete(self) -> bool:
        return len(self.members) == self.size


@dataclass(slots=True)
class BatchPlan:
    dropped: Dropped | None = None
    served: Served | None = None
    frames: list[msgspec.Raw] = field(default_factory=list)
    replayed: bool = False  # the batch this version was served before: no record, the same frames


@dataclass(slots=True)
class RetainedBatch:
    served: Served
    entries: list[Entry]


_SAMPLING_KEYS = {
    "fifo": lambda group: group.completed_seq,
    # Serve what is about to exceed the bound first, so fewer samples expire.
    "stalest_first": lambda group: (group.oldest_version, group.completed_seq),
    # Serve the most on-policy data first.
    "freshest_first": lambda group: (-group.oldest_version, group.completed_seq),
}


class ReplayBuffer:
    def __init__(self, capacity: int, stale_policy: StalePolicy = "drop", sampling: Sampling = "fifo"):
        if sampling not in _SAMPLING_KEYS:
            raise ValueError(f"sampling must be one of {sorted(_SAMPLING_KEYS)}")
        self.capacity = capacity
        self.stale_policy = stale_policy
        self._sampling_key = _SAMPLING_KEYS[sampling]
        self.groups: dict[str, Group] = {}
        self.partials: dict[str, Entry] = {}  # insertion order = FIFO
        self._group_of: dict[str, str] = {}  # stored sample id -> group id
        # Groups leave whole (served or dropped), so their ids are enough to recognise any later
        # member as a duplicate: one id per group, not per sample, for the whole run.
        self.served_groups: set[str] = set()
        self.dropped_groups: set[str] = set()
        self.taken_partials: set[str] = set()
        self.retained: dict[int, RetainedBatch] = {}  # trainer version -> the batch served for it
        self.released_below = 0
        self.trainer_version = 0
        self.live_bytes = 0
        self.counts = Counter(served=0, dropped_stale=0, duplicates=0, rejected=0)
        self._completion = itertools.count()

    @property
    def stored(self) -> int:
        return len(self._group_of) + len(self.partials)

    # ---- deciding -------------------------------------------------------
    def admit(self, header: TrajectoryHeader) -> TrajectoryAck | None:
        """None: store it. Otherwise the ack to send without storing anything."""
        key = header.submission_key
        if header.partial:
            if key in self.partials or key in self.taken_partials:
                return self._duplicate(key)
            return self._full(key) if self.stored >= self.capacity else None
        if key in self._group_of or header.group_id in self.served_groups:  # a served group was complete
            return self._duplicate(key)
        if header.group_id in self.dropped_groups:
            self.counts["dropped_stale"] += 1
            return TrajectoryAck(sample_id=key, accepted=True, reason="dropped: its group went stale")
        group = self.groups.get(header.group_id)
        if group is not None and group.size != header.group_size:
            return self.reject(key, f"group_size {header.group_size} != {group.size} of group {header.group_id}")
        # Members of an open group always fit, so a full buffer cannot wedge on incomplete groups.
        if group is None and self.stored >= self.capacity:
            return self._full(key)
        return None

    def plan_batch(self, trainer_version: int, num_groups: int, max_staleness: int, include_stale: bool) -> BatchPlan:
        """The batch served before for `trainer_version`, if any; else drop (per policy) what is stale at
        `trainer_version` and pick `num_groups` complete groups if there are enough."""
        if (batch := self.retained.get(trainer_version)) is not None:
            return BatchPlan(frames=[entry.frame for entry in batch.entries], replayed=True)
        plan = BatchPlan()
        stale = {gid for gid, group in self.groups.items() if trainer_version - group.oldest_version > max_staleness}
        if stale and self.stale_policy == "drop":
            plan.dropped = Dropped(
                sample_ids=[sid for gid in stale for sid in self.groups[gid].members], group_ids=sorted(stale)
            )
        servable = [
            (gid, group)
            for gid, group in self.groups.items()
            if group.complete and (gid not in stale or (include_stale and self.stale_policy == "keep"))
        ]
        if len(servable) >= num_groups:
            chosen = sorted(servable, key=lambda item: self._sampling_key(item[1]))[:num_groups]
            entries = [entry for _, group in chosen for entry in group.members.values()]
            plan.served = Served(
                trainer_version=trainer_version,
                sample_ids=[entry.header.sample_id for entry in entries],
                group_ids=[gid for gid, _ in chosen],
            )
            plan.frames = [entry.frame for entry in entries]
        return plan

    def plan_partials(
        self, max_n: int, min_version: int, group_prefix: str = ""
    ) -> tuple[PartialsTaken, list[msgspec.Raw]]:
        taken: list[str] = []
        dropped: list[str] = []
        frames: list[msgspec.Raw] = []
        for key, entry in self.partials.items():
            if not entry.header.group_id.startswith(group_prefix):
                continue
            if entry.oldest_version < min_version:
                dropped.append(key)
            elif len(taken) < max_n:
                taken.append(key)
                frames.append(entry.frame)
        return PartialsTaken(keys=taken, dropped_keys=dropped), frames

    # ---- changing -------------------------------------------------------
    def apply(self, record: WalRecord, header: TrajectoryHeader | None = None) -> None:
        match record:
            case Put(frame=frame):
                # A recovered frame is a view into the whole log file: copy it so the file can be freed.
                self._store(header or read_header(frame), frame if header else frame.copy())
            case Served():
                self.trainer_version = max(self.trainer_version, record.trainer_version)
                self.counts["served"] += len(record.sample_ids) + record.summarized
                self.served_groups.update(record.group_ids)
                entries = self._remove(record.sample_ids)
                if entries and record.trainer_version >= self.released_below:  # compaction's summary removes none
                    self.retained[record.trainer_version] = RetainedBatch(record, entries)
                    self.live_bytes += sum(len(entry.frame) for entry in entries)
            case Released(below_version=below, versions=refused):
                self.released_below = max(self.released_below, below)
                for version in [v for v in self.retained if v < below or v in refused]:
                    self.live_bytes -= sum(len(entry.frame) for entry in self.retained.pop(version).entries)
            case Dropped():
                self.counts["dropped_stale"] += len(record.sample_ids) + record.summarized
                self.dropped_groups.update(record.group_ids)
                self._remove(record.sample_ids)
            case PartialsTaken():
                self.counts["dropped_stale"] += len(record.dropped_keys)
                for key in itertools.chain(record.keys, record.dropped_keys):
                    self.taken_partials.add(key)
                    entry = self.partials.pop(key, None)
                    if entry is not None:
                        self.live_bytes -= len(entry.frame)

    def _store(self, header: TrajectoryHeader, frame: msgspec.Raw) -> None:
        self.live_bytes += len(frame)
        entry = Entry(header, frame, header.oldest_version)
        if header.partial:
            self.partials[header.submission_key] = entry
            return
        group = self.groups.setdefault(header.group_id, Group(size=header.group_size))
        group.members[header.sample_id] = entry
        group.oldest_version = min(group.oldest_version, entry.oldest_version)
        self._group_of[header.sample_id] = header.group_id
        if group.complete:
            group.completed_seq = next(self._completion)

    def _remove(self, sample_ids: list[str]) -> list[Entry]:
        removed = []
        for sid in sample_ids:
            gid = self._group_of.pop(sid, None)
            if gid is None:
                continue
            group = self.groups[gid]
            removed.append(group.members.pop(sid))
            self.live_bytes -= len(removed[-1].frame)
            if not group.members:
                del self.groups[gid]
        return removed

    def _duplicate(self, key: str) -> TrajectoryAck:
        self.counts["duplicates"] += 1
        return TrajectoryAck(sample_id=key, accepted=True, reason="duplicate")

    def _full(self, key: str) -> TrajectoryAck:
        return TrajectoryAck(sample_id=key, accepted=False, reason=f"full ({self.capacity} stored)", retry=True)

    def reject(self, key: str, reason: str) -> TrajectoryAck:
        self.counts["rejected"] += 1
        return TrajectoryAck(sample_id=key, accepted=False, reason=reason)

    # ---- reading --------------------------------------------------------
    def stats(self, trainer_version: int | None = None) -> BufferStats:
        version = self.trainer_version if trainer_version is None else trainer_version
        by_version = Counter(entry.oldest_version for group in self.groups.values() for entry in group.members.values())
        complete = sum(group.complete for group in self.groups.values())
        return BufferStats(
            trainer_version=version,
            stored=len(self._group_of),
            complete_groups=complete,
            incomplete_groups=len(self.groups) - complete,
            partials=len(self.partials),
            capacity=self.capacity,
            stored_by_version=dict(sorted(by_version.items())),
            stored_by_staleness=dict(sorted(Counter({version - v: n for v, n in by_version.items()}).items())),
            served=self.counts["served"],
            dropped_stale=self.counts["dropped_stale"],
            duplicates=self.counts["duplicates"],
            rejected=self.counts["rejected"],
        )

    def worker_recovery(self, group_prefix: str, group_size: int) -> WorkerRecovery:
        """What a restarted worker needs to resume its prompt stream and its admission (its groups
        have `group_size` members and are served whole)."""

        def mine(group_id: str) -> bool:
            return group_id.startswith(group_prefix)

        mine_stored = {gid: group for gid, group in self.groups.items() if mine(gid)}
        served = group_size * sum(1 for gid in self.served_groups if mine(gid))
        done = {gid for gid in itertools.chain(self.served_groups, self.dropped_groups) if mine(gid)}
        done.update(gid for gid, group in mine_stored.items() if group.complete)
        done.update(entry.header.group_id for entry in self.partials.values() if mine(entry.header.group_id))
        return WorkerRecovery(
            accepted_samples=served + sum(len(group.members) for group in mine_stored.values()),
            done_groups=sorted(done),
            open_groups=sorted(gid for gid, group in mine_stored.items() if not group.complete and gid not in done),
        )

    def live_records(self) -> Iterator[WalRecord]:
        """The smallest log that rebuilds this state (for compaction)."""
        yield Released(below_version=self.released_below)
        retained = sum(len(batch.entries) for batch in self.retained.values())  # their records follow
        yield Served(
            trainer_version=self.trainer_version,
            sample_ids=[],
            group_ids=sorted(self.served_groups),
            summarized=self.counts["served"] - retained,
        )
        yield Dropped(sample_ids=[], group_ids=sorted(self.dropped_groups), summarized=self.counts["dropped_stale"])
        yield PartialsTaken(keys=sorted(self.taken_partials))
        for version in sorted(self.retained):
            batch = self.retained[version]
            for entry in batch.entries:
                yield Put(frame=entry.frame)
            yield batch.served
        complete_last = sorted(self.groups.values(), key=lambda group: (group.complete, group.completed_seq))
        for group in complete_last:
            for entry in group.members.values():
                yield Put(frame=entry.frame)
        for entry in self.partials.values():
            yield Put(frame=entry.frame)
