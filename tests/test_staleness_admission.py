import asyncio

import pytest

from async_rl.messages import Trajectory
from staleness import AdmissionController, StalenessBoundError, StalenessConfig, check_staleness_bound
from staleness.metrics import stale_samples, staleness_histogram, staleness_summary


@pytest.mark.parametrize("eta", [0, 2])
def test_exactly_the_bound_is_admitted(eta):
    batch_size = 4
    control = AdmissionController(StalenessConfig(eta=eta), batch_size)
    for _ in range((eta + 1) * batch_size):
        assert control.try_admit()
    assert control.in_flight == (0 + eta + 1) * batch_size
    assert not control.try_admit()
    control.on_finished(batch_size)  # finishing frees nothing: accepted samples still count
    assert not control.try_admit()
    control.on_version(1)
    assert control.capacity == batch_size
    assert control.try_admit(batch_size) and not control.try_admit()


async def test_admit_waits_for_the_next_version():
    control = AdmissionController(StalenessConfig(eta=0), 2)
    await control.admit(2)
    waiter = asyncio.create_task(control.admit(2))
    await asyncio.sleep(0)
    control.on_finished(2)
    await asyncio.sleep(0)
    assert not waiter.done()  # still over the bound at version 0
    control.on_version(1)
    async with asyncio.timeout(5):
        await waiter
    assert (control.accepted, control.in_flight) == (2, 2)


async def test_dropping_frees_capacity_and_cancelled_waiter_counts_nothing():
    control = AdmissionController(StalenessConfig(eta=0), 3)
    assert control.try_admit(3)
    cancelled = asyncio.create_task(control.admit(1))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert control.in_flight == 3
    waiter = asyncio.create_task(control.admit(1))
    control.on_dropped(1)  # e.g. filtered out by the reward: never accepted
    async with asyncio.timeout(5):
        await waiter
    assert (control.accepted, control.in_flight) == (0, 3)
    control.on_finished(3)
    control.on_dropped(2, accepted=True)  # evicted by the buffer as too stale
    assert control.accepted == 1 and control.capacity == 2


def test_group_admission_is_all_or_nothing_and_max_in_flight_caps():
    control = AdmissionController(StalenessConfig(eta=4, max_in_flight=6), 4)
    assert control.try_admit(4)
    assert not control.try_admit(4)  # would exceed max_in_flight, though the staleness budget allows 16
    assert control.try_admit(2)
    assert control.capacity == 0


def test_restart_from_buffer_counts():
    control = AdmissionController.from_counts(StalenessConfig(eta=1), 2 * 4, version=3, accepted=36)
    assert control.limit == (3 + 1 + 1) * 8 and control.capacity == 4 and control.in_flight == 0


def test_misuse_is_refused():
    control = AdmissionController(StalenessConfig(eta=0), 2)
    with pytest.raises(ValueError):
        control.on_finished(1)  # nothing in flight
    control.on_version(2)
    with pytest.raises(ValueError, match="backwards"):
        control.on_version(1)
    with pytest.raises(ValueError, match="eta"):
        StalenessConfig(eta=-1)
    with pytest.raises(ValueError, match="batch_size"):
        AdmissionController(StalenessConfig(eta=0), 0)


def _trajectory(sample_id, versions):
    return Trajectory(
        sample_id=sample_id,
        group_id="g",
        group_size=1,
        prompt_ids=[1],
        response_ids=[2] * len(versions),
        behavior_logprobs=[-1.0] * len(versions),
        token_versions=versions,
    )


def test_staleness_histogram_and_bound():
    batch = [_trajectory("a", [5, 5]), _trajectory("b", [3, 5]), _trajectory("c", [4]), _trajectory("d", [5])]
    histogram = staleness_histogram(batch, version=5)
    assert histogram == {0: 2, 1: 1, 2: 1}
    assert staleness_summary(histogram) == {"staleness/mean": 0.75, "staleness/max": 2.0}
    check_staleness_bound(batch, version=5, eta=2)
    assert stale_samples(batch, version=5, eta=1) == ["b"]
    with pytest.raises(StalenessBoundError, match="'b'"):
        check_staleness_bound(batch, version=5, eta=1)
    with pytest.raises(StalenessBoundError):  # a token from a version the trainer has not reached
        check_staleness_bound([_trajectory("e", [6])], version=5, eta=3)
