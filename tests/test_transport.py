"""Real buffer processes over real sockets: crash recovery, fuzzing, CURVE, versions, partials."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
from pathlib import Path

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from async_rl import zmq_auth
from async_rl.messages import BatchRequest, StatsRequest, WeightsPublished, decode, encode
from async_rl.transport import BufferClient, TrajectorySender, VersionPublisher, VersionSubscriber
from buffer.config import BufferConfig
from buffer.service import BufferService
from tests.helpers import buffer_endpoints, buffer_process, make_trajectory

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
async def test_kill_9_mid_stream_loses_no_acked_trajectory_and_serves_none_twice(tmp_path):
    submit, serve = buffer_endpoints()
    groups, group_size = 50, 4
    trajectories = [
        make_trajectory(f"g{g}-{i}", f"g{g}", group_size=group_size, tokens=64)
        for g in range(groups)
        for i in range(group_size)
    ]
    acked: set[str] = set()
    served: list[str] = []
    versions = itertools.count()  # as a trainer asks: one version per batch

    async def take_batches(client: BufferClient, count: int):
        for _ in range(count):
            batch = await client.get_batch(trainer_version=next(versions), num_groups=2, max_staleness=99, timeout=10)
            assert not batch.error
            served.extend(t.sample_id for t in batch.trajectories)

    with buffer_process(tmp_path, submit, serve, "--set", "fsync=batch", "--max-staleness", "99") as first:
        sender = TrajectorySender(
            submit, max_in_flight=16, ack_timeout_s=0.5, on_ack=lambda ack: acked.add(ack.sample_id)
        )
        async with sender, BufferClient(serve, resend_after_s=0.5) as client, asyncio.timeout(60):
            first_half, second_half = trajectories[:120], trajectories[120:]
            producer = asyncio.create_task(_send_all(sender, first_half))
            await take_batches(client, 5)
            await producer
            os.kill(first.pid, signal.SIGKILL)  # mid-stream: the last sends are still unacked
            first.wait(10)
            acked_before_kill = set(acked)
            with buffer_process(tmp_path, submit, serve, "--set", "fsync=batch", "--max-staleness", "99"):
                await _send_all(sender, second_half)
                await sender.flush(30)
                await take_batches(client, groups // 2 - 5)
                stats = await client.stats()
    assert len(served) == len(set(served)), "a sample was served twice"
    assert set(served) == {t.sample_id for t in trajectories}
    assert acked_before_kill <= set(served)
    assert stats.served == len(trajectories) and stats.stored == 0


async def _send_all(sender: TrajectorySender, trajectories):
    for trajectory in trajectories:
        await sender.send(trajectory)


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz")
    submit, serve = buffer_endpoints()
    with buffer_process(directory, submit, serve, "--set", "max_frame_bytes=65536") as process:
        context = zmq.Context()
        sockets = {name: context.socket(zmq.DEALER) for name in ("submit", "serve")}
        sockets["submit"].connect(submit)
        sockets["serve"].connect(serve)
        yield process, sockets
        context.destroy(linger=0)


def _valid_trajectory_fields():
    # Untyped decode keeps the per-token blobs as msgpack Ext values, so they re-encode as they were.
    return msgspec.msgpack.decode(encode(make_trajectory("s", "g")))


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.builds(msgspec.msgpack.Ext, st.integers(-128, 127), st.binary(max_size=12)),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
_mutated = st.builds(
    lambda field, value, kind: msgspec.msgpack.encode(_valid_trajectory_fields() | {field: value, "kind": kind}),
    st.sampled_from(sorted(_valid_trajectory_fields())),
    _values,
    st.sampled_from(["trajectory", "batch_request", "take_partials", "stats_request", "nonsense"]),
)
_frames = st.one_of(
    st.binary(max_size=256).map(lambda b: [b]),
    _values.map(lambda v: [msgspec.msgpack.encode(v)]),
    _mutated.map(lambda b: [b]),
    st.lists(st.binary(max_size=16), min_size=2, max_size=3),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=_frames, channel=st.sampled_from(["submit", "serve"]))
def test_fuzzed_frames_never_crash_the_service(fuzz_target, frames, channel):
    process, sockets = fuzz_target
    sockets[channel].send_multipart(frames)
    sockets[channel].poll(1000)  # an answer normally comes; a valid fuzzed BatchRequest may legitimately wait
    while sockets[channel].poll(0):
        sockets[channel].recv()
    assert process.poll() is None


def test_oversized_frames_are_refused_with_a_reason_and_counted(fuzz_target):
    process, sockets = fuzz_target
    sockets["submit"].send(encode(make_trajectory("big", "big", tokens=10_000)))
    assert sockets["submit"].poll(5000)
    ack = decode(sockets["submit"].recv())
    assert not ack.accepted and "oversized" in ack.reason
    sockets["serve"].send(encode(StatsRequest(request_id="after-fuzz")))
    assert sockets["serve"].poll(5000)
    while (stats := decode(sockets["serve"].recv())).request_id != "after-fuzz":
        pass
    assert stats.rejected >= 1 and process.poll() is None


async def _in_process_service(tmp_path, curve=None):
    service = BufferService(
        BufferConfig(),
        directory=tmp_path,
        submit="tcp://127.0.0.1:*",
        serve="tcp://127.0.0.1:*",
        max_staleness=4,
        curve=curve,
    )
    task = asyncio.create_task(service.run())
    await service.ready.wait()
    return service, task


async def test_curve_admits_authorized_clients_only(tmp_path):
    keys = tmp_path / "keys"
    server_secret = zmq_auth.generate_keys(keys / "server", "server")
    client_secret = zmq_auth.generate_keys(keys / "clients", "worker")
    rogue_secret = zmq_auth.generate_keys(keys / "rogue", "rogue")
    server = zmq_auth.load_server(server_secret, authorized_clients=keys / "clients")
    service, task = await _in_process_service(tmp_path / "buffer", curve=server)
    try:
        worker = zmq_auth.load_client(client_secret, keys / "server" / "server.key")
        rogue = zmq_auth.load_client(rogue_secret, keys / "server" / "server.key")
        async with TrajectorySender(service.endpoints["submit"], curve=worker) as sender:
            await sender.send(make_trajectory("ok", "g"))
            await sender.flush(10)
        async with TrajectorySender(service.endpoints["submit"], curve=rogue) as sender:
            await sender.send(make_trajectory("rogue", "g"))
            with pytest.raises(TimeoutError):
                await sender.flush(1)
        assert service.buffer.stored == 1
    finally:
        task.cancel()


def test_non_loopback_bind_without_curve_is_refused():
    with pytest.raises(ValueError, match="not loopback"):
        zmq_auth.check_bind("tcp://0.0.0.0:5601", secured=False)
    zmq_auth.check_bind("tcp://0.0.0.0:5601", secured=True)


async def test_version_announcements_reach_late_subscribers_once_each():
    publisher = VersionPublisher("tcp://127.0.0.1:*", repeat_s=0.05)
    subscriber = VersionSubscriber(publisher.endpoint)
    try:
        async with asyncio.timeout(10):
            await publisher.publish(WeightsPublished(version=1, method="disk"))
            assert (await subscriber.wait_for(1)).version == 1
            await publisher.publish(WeightsPublished(version=2, method="disk"))
            assert (await subscriber.next()).version == 2
            # Same version, new drops (a refused batch): delivered, so admission gets its budget back.
            await publisher.publish(WeightsPublished(version=2, method="disk", dropped_groups={"w0-g1": 4}))
            assert (await subscriber.next()).dropped_groups == {"w0-g1": 4}
            await publisher.publish(WeightsPublished(version=3, method="disk"))
            assert (await subscriber.next()).version == 3  # the repeats of version 2 were not yielded again
    finally:
        publisher.close()
        subscriber.close()


@contextlib.asynccontextmanager
async def _holding(tmp_path, trajectories):
    """An in-process buffer service that durably holds `trajectories`, and a client of its serve side."""
    service, task = await _in_process_service(tmp_path)
    try:
        async with (
            TrajectorySender(service.endpoints["submit"]) as sender,
            BufferClient(service.endpoints["serve"]) as client,
            asyncio.timeout(20),
        ):
            for trajectory in trajectories:
                await sender.send(trajectory)
            await sender.flush(5)
            yield service, client
    finally:
        task.cancel()


async def test_partials_round_trip_and_repeated_requests_get_the_same_batch(tmp_path):
    stored = [make_trajectory(f"s{i}", "g") for i in range(2)] + [
        make_trajectory("p", "gp", version=3, partial=True),
        make_trajectory("old", "go", version=0, partial=True),
    ]
    async with _holding(tmp_path, stored) as (service, client):
        partials = await client.take_partials(max_n=4, min_version=2)
        assert [p.sample_id for p in partials] == ["p"] and partials[0].partial
        assert await client.take_partials(max_n=4, min_version=0) == []

        raw = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        raw.connect(service.endpoints["serve"])
        request = encode(BatchRequest(trainer_version=1, num_groups=1, max_staleness=2, request_id="r1"))
        replies = []
        for _ in range(2):
            await raw.send(request)
            replies.append(await raw.recv())
        raw.close(linger=0)
        assert replies[0] == replies[1] and len(decode(replies[0]).trajectories) == 2
        assert (await client.stats()).served == 2


async def test_a_worker_recovers_its_groups_over_the_serve_socket(tmp_path):
    stored = [make_trajectory(f"w0-g0-{i}", "w0-g0") for i in range(2)] + [
        make_trajectory("w0-g1-0", "w0-g1"),
        make_trajectory("w1-g0-0", "w1-g0"),
    ]
    async with _holding(tmp_path, stored) as (_, client):
        recovery = await client.recover_worker("w0-", group_size=2)
    assert recovery.done_groups == ["w0-g0"] and recovery.open_groups == ["w0-g1"]
    assert recovery.accepted_samples == 3


async def test_groups_dropped_as_stale_are_named_in_the_batch_response(tmp_path):
    """The worker that generated them counted them as accepted: the trainer hands the ids back to it."""
    stored = [make_trajectory(f"o{i}", "old", version=0) for i in range(2)] + [
        make_trajectory(f"n{i}", "new", version=5) for i in range(2)
    ]
    async with _holding(tmp_path, stored) as (_, client):
        batch = await client.get_batch(trainer_version=5, num_groups=1, max_staleness=1, timeout=5)
        assert {t.group_id for t in batch.trajectories} == {"new"}
        assert batch.dropped_groups == {"old": 2} and batch.dropped_stale == 2
