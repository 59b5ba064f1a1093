"""Staleness of a training batch: histogram, summary, and the bound check.

A trajectory's staleness at trainer version t is t - (oldest token version):
a partial rollout resumed under newer weights is as stale as its first token.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Protocol


class Trajectory(Protocol):
    """What staleness needs of a sample (async_rl.messages.Trajectory has it)."""

    sample_id: str

    def staleness(self, trainer_version: int) -> int: ...


class StalenessBoundError(ValueError):
    """A batch holds a sample staler than eta; training on it would break the bound."""


def staleness_histogram(trajectories: Iterable[Trajectory], version: int) -> dict[int, int]:
    """staleness -> number of samples, sorted by staleness."""
    counts = Counter(trajectory.staleness(version) for trajectory in trajectories)
    return dict(sorted(counts.items()))


def staleness_summary(histogram: dict[int, int]) -> dict[str, float]:
    total = sum(histogram.values())
    if total == 0:
        return {"staleness/mean": 0.0, "staleness/max": 0.0}
    mean = sum(staleness * count for staleness, count in histogram.items()) / total
    return {"staleness/mean": float(mean), "staleness/max": float(max(histogram))}


def stale_samples(trajectories: Iterable[Trajectory], version: int, eta: int) -> list[str]:
    """Sample ids that break the bound (staleness > eta) or come from the future (< 0)."""
    return [t.sample_id for t in trajectories if not 0 <= t.staleness(version) <= eta]


def check_staleness_bound(trajectories: Iterable[Trajectory], version: int, eta: int) -> None:
    """Raise StalenessBoundError naming the offenders; the caller decides to drop or abort."""
    trajectories = list(trajectories)
    offenders = stale_samples(trajectories, version, eta)
    if offenders:
        histogram = staleness_histogram(trajectories, version)
        raise StalenessBoundError(
            f"{len(offenders)} sample(s) outside staleness [0, {eta}] at version {version}: "
            f"{offenders[:5]}{' ...' if len(offenders) > 5 else ''}; histogram {histogram}"
        )
