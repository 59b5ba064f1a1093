"""Admission control: generate only what the staleness bound lets the trainer use.

With trainer version t, every sample accepted so far (trained or waiting in the
buffer) plus every sample still being generated must fit in (t + eta + 1) * B.
A rollout admitted beyond that would finish too stale to train on, so it is
not started until the trainer publishes a new version.

Counters are plain ints touched from one event loop; every change wakes the
waiters, who re-check their own request. A swapped asyncio.Event is used
rather than an asyncio.Condition because notifying a Condition needs its lock,
which would make every counter update a coroutine; here `on_finished` can be
called from any plain callback in the loop.
"""

from __future__ import annotations

import asyncio

from staleness.config import StalenessConfig


class AdmissionController:
    """Counts samples (not groups): admitting a GRPO group of G is `admit(G)`; `batch_size` is the
    samples one trainer step consumes (groups_per_step x group_size, or a worker's share of it)."""

    def __init__(
        self, config: StalenessConfig, batch_size: int, *, version: int = 0, accepted: int = 0, in_flight: int = 0
    ):
        if version < 0 or accepted < 0 or in_flight < 0:
            raise ValueError(f"counts must be >= 0: version={version} accepted={accepted} in_flight={in_flight}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be >= 1")
        self.config = config
        self.batch_size = batch_size
        self.version = version
        self.accepted = accepted
        self.in_flight = in_flight
        self._changed = asyncio.Event()

    @classmethod
    def from_counts(
        cls, config: StalenessConfig, batch_size: int, *, version: int, accepted: int
    ) -> AdmissionController:
        """Rebuild after a restart from the trainer's version and the buffer's accepted count.

        Requests in flight at the crash are gone with their engines, so none are counted.
        """
        return cls(config, batch_size, version=version, accepted=accepted, in_flight=0)

    @property
    def limit(self) -> int:
        return (self.version + self.config.eta + 1) * self.batch_size

    @property
    def capacity(self) -> int:
        """How many more samples may be admitted now."""
        room = self.limit - self.accepted - self.in_flight
        if self.config.max_in_flight is not None:
            room = min(room, self.config.max_in_flight - self.in_flight)
        return max(room, 0)

    def try_admit(self, n: int = 1) -> bool:
        """Admit `n` samples at once (all of a group or none) if they fit."""
        if n < 1:
            raise ValueError(f"admit n={n} must be >= 1")
        if n > self.capacity:
            return False
        self.in_flight += n
        return True

    async def admit(self, n: int = 1) -> None:
        """Wait until `n` samples fit, then admit them. Cancel-safe: nothing is counted until it returns."""
        if self.config.max_in_flight is not None and n > self.config.max_in_flight:
            raise ValueError(f"admit n={n} can never fit max_in_flight={self.config.max_in_flight}")
        while not self.try_admit(n):
            await self._changed.wait()

    def on_version(self, version: int) -> None:
        """The trainer published `version`; the budget grows by B per version."""
        if version < self.version:
            raise ValueError(f"version went backwards: {self.version} -> {version}")
        self.version = version
        self._wake()

    def on_finished(self, n: int = 1) -> None:
        """`n` admitted samples finished and were accepted by the buffer."""
        self._take_in_flight(n)
        self.accepted += n
        self._wake()

    def on_dropped(self, n: int = 1, *, accepted: bool = False) -> None:
        """`n` samples will never be trained on: freed from in-flight, or from accepted
        (`accepted=True`, e.g. the buffer evicted them as too stale)."""
        if accepted:
            if n > self.accepted:
                raise ValueError(f"dropping {n} accepted samples but only {self.accepted} are counted")
            self.accepted -= n
        else:
            self._take_in_flight(n)
        self._wake()

    def snapshot(self) -> dict[str, int]:
        return {
            "admission/version": self.version,
            "admission/accepted": self.accepted,
            "admission/in_flight": self.in_flight,
            "admission/limit": self.limit,
            "admission/capacity": self.capacity,
        }

    def _take_in_flight(self, n: int) -> None:
        if n < 1 or n > self.in_flight:
            raise ValueError(f"{n} samples leave flight but {self.in_flight} are in flight")
        self.in_flight -= n

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
