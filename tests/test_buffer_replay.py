"""The replay buffer's decisions, driven through the same records the service logs."""

import pytest

from async_rl.messages import MessageError, Trajectory, encode
from buffer.frames import read_header
from buffer.replay import ReplayBuffer
from buffer.wal import Released
from tests.helpers import fill_group, make_trajectory, put, take


def test_staleness_bound_is_exact_at_the_boundary():
    buffer = ReplayBuffer(capacity=100)
    fill_group(buffer, "at-bound", version=3)
    fill_group(buffer, "past-bound", version=2)
    plan = take(buffer, trainer_version=5, num_groups=1, max_staleness=2)
    assert {sid.split("-")[0] for sid in plan.served.sample_ids} == {"at"}
    assert plan.dropped.group_ids == ["past-bound"]
    assert buffer.stats().dropped_stale == 2 and buffer.stored == 0


def test_incomplete_groups_are_never_served():
    buffer = ReplayBuffer(capacity=100)
    put(buffer, make_trajectory("a0", "a", group_size=3))
    put(buffer, make_trajectory("a1", "a", group_size=3))
    assert take(buffer, 0, 1, 4).served is None
    put(buffer, make_trajectory("a2", "a", group_size=3))
    assert sorted(take(buffer, 0, 1, 4).served.sample_ids) == ["a0", "a1", "a2"]


def test_duplicates_are_acked_not_stored_even_after_serving():
    buffer = ReplayBuffer(capacity=100)
    fill_group(buffer, "g", 0)
    assert put(buffer, make_trajectory("g-0", "g")).reason == "duplicate"
    take(buffer, 0, 1, 4)
    ack = put(buffer, make_trajectory("g-1", "g"))
    assert ack.accepted and ack.reason == "duplicate" and buffer.stored == 0


def test_a_version_asked_for_again_gets_its_batch_again_until_released():
    """A trainer resumed from a checkpoint asks again for versions it was served: the same samples
    come back (nothing acknowledged is lost, nothing else is trained at that version) until the
    trainer reports a checkpoint beyond them."""
    buffer = ReplayBuffer(capacity=100)
    for group in ("a", "b", "c"):
        fill_group(buffer, group, version=0)
    first = take(buffer, trainer_version=0, num_groups=1, max_staleness=2)
    second = take(buffer, trainer_version=1, num_groups=1, max_staleness=2)
    again = take(buffer, trainer_version=0, num_groups=1, max_staleness=2)
    assert again.replayed and again.served is None and again.frames == first.frames
    assert take(buffer, 1, 1, 2).frames == second.frames
    assert buffer.stats().served == 4 and buffer.stats().complete_groups == 1
    buffer.apply(Released(below_version=1))
    fresh = take(buffer, trainer_version=0, num_groups=1, max_staleness=2)  # released: version 0 is new again
    assert not fresh.replayed and fresh.served.group_ids == ["c"]
    assert take(buffer, 1, 1, 2).replayed
    buffer.apply(Released(below_version=1, versions=[1]))  # the trainer refused version 1's batch
    assert 1 not in buffer.retained and take(buffer, 1, 1, 2).served is None  # nothing left to serve


def test_a_restarted_worker_learns_which_of_its_groups_are_done_and_which_to_finish():
    buffer = ReplayBuffer(capacity=100)
    for group in ("w0-g0", "w0-g1", "w0-g2", "w1-g0"):
        fill_group(buffer, group, version=0)
    take(buffer, trainer_version=0, num_groups=1, max_staleness=2)  # serves w0-g0 (FIFO)
    take(buffer, trainer_version=5, num_groups=1, max_staleness=4)  # drops every group left as stale
    fill_group(buffer, "w0-g3", version=5)
    put(buffer, make_trajectory("w0-g4-0", "w0-g4", version=5))  # one of two members stored
    put(buffer, make_trajectory("w0-g5-0", "w0-g5", version=5, partial=True))  # parked by APRIL
    put(buffer, make_trajectory("w01-g0-0", "w01-g0", version=5))  # another worker's prefix
    recovery = buffer.worker_recovery("w0-", group_size=2)
    assert recovery.done_groups == ["w0-g0", "w0-g1", "w0-g2", "w0-g3", "w0-g5"]
    assert recovery.open_groups == ["w0-g4"]
    assert recovery.accepted_samples == 2 + 2 + 1  # served w0-g0, stored w0-g3 and one of w0-g4


def test_full_buffer_asks_to_retry_but_admits_members_of_open_groups():
    buffer = ReplayBuffer(capacity=2)
    fill_group(buffer, "a", 0)
    refusal = put(buffer, make_trajectory("b-0", "b"))
    assert not refusal.accepted and refusal.retry
    buffer = ReplayBuffer(capacity=1)
    put(buffer, make_trajectory("c-0", "c"))
    assert put(buffer, make_trajectory("c-1", "c")) is None


def test_keep_policy_holds_stale_groups_for_explicit_use():
    buffer = ReplayBuffer(capacity=100, stale_policy="keep")
    fill_group(buffer, "old", 0)
    assert take(buffer, 10, 1, 2).served is None and buffer.stored == 2
    assert buffer.stats(10).stored_by_staleness == {10: 2}
    assert len(take(buffer, 10, 1, 2, include_stale=True).served.sample_ids) == 2


@pytest.mark.parametrize("sampling, first", [("fifo", "mid"), ("stalest_first", "old"), ("freshest_first", "new")])
def test_sampling_orders(sampling, first):
    buffer = ReplayBuffer(capacity=100, sampling=sampling)
    for group, version in (("mid", 2), ("old", 1), ("new", 3)):
        fill_group(buffer, group, version)
    assert take(buffer, 3, 1, 4).served.group_ids == [first]


def test_partial_pool_takes_fresh_partials_and_drops_stale_ones():
    buffer = ReplayBuffer(capacity=100)
    put(buffer, make_trajectory("p", "gp", version=1, partial=True))
    put(buffer, make_trajectory("q", "gq", version=4, partial=True))
    assert put(buffer, make_trajectory("q", "gq", version=4, partial=True)).reason == "duplicate"
    assert put(buffer, make_trajectory("q", "gq", version=4, partial=True, attempt=2)) is None
    taken, frames = buffer.plan_partials(max_n=1, min_version=3)
    buffer.apply(taken)
    assert taken.keys == ["q@1"] and taken.dropped_keys == ["p@1"] and len(frames) == 1
    assert list(buffer.partials) == ["q@2"]


def test_each_worker_takes_back_only_its_own_partials():
    buffer = ReplayBuffer(capacity=100)
    for sample, group in (("a", "w0-g1"), ("b", "w1-g1"), ("c", "w1-g2")):
        put(buffer, make_trajectory(sample, group, version=3, partial=True))
    put(buffer, make_trajectory("old", "w0-g0", version=0, partial=True))
    taken, _ = buffer.plan_partials(max_n=10, min_version=2, group_prefix="w1-")
    assert taken.keys == ["b@1", "c@1"] and taken.dropped_keys == []  # w0's stale one is w0's to drop
    buffer.apply(taken)
    taken, _ = buffer.plan_partials(max_n=10, min_version=2, group_prefix="w0-")
    assert taken.keys == ["a@1"] and taken.dropped_keys == ["old@1"]


@pytest.mark.parametrize(
    "bad, reason",
    [
        (dict(token_versions=[0]), "differ in length"),
        (dict(behavior_logprobs=[float("nan")] * 4), "NaN"),
        (dict(group_size=0), "group_size"),
        (dict(sample_id=""), "empty"),
    ],
)
def test_invalid_trajectories_are_refused_with_a_reason(bad, reason):
    fields = {name: getattr(make_trajectory("s", "g"), name) for name in Trajectory.__struct_fields__}
    with pytest.raises(MessageError, match=reason):
        read_header(encode(Trajectory(**{**fields, **bad})))
