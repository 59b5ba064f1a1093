import array

import msgspec
import pytest

from async_rl.messages import (
    SCHEMA_VERSION,
    BatchResponse,
    LogprobArray,
    MessageError,
    PartialsResponse,
    RawBatchResponse,
    RawPartialsResponse,
    TokenArray,
    Trajectory,
    decode,
    encode,
)


def _trajectory(**overrides):
    fields = dict(
        sample_id="s0",
        group_id="g0",
        group_size=2,
        prompt_ids=[1, 2],
        response_ids=[3, 4, 5],
        behavior_logprobs=[-0.1, -0.2, -0.3],
        token_versions=[3, 3, 4],
    )
    fields.update(overrides)
    return Trajectory(**fields)


def test_roundtrip_keeps_every_field():
    original = _trajectory(reward=1.0, metadata={"answer": "7"})
    assert decode(encode(original)) == original


def test_staleness_is_measured_from_the_oldest_token():
    assert _trajectory().staleness(trainer_version=6) == 3


def test_garbage_and_foreign_schema_are_rejected_with_a_reason():
    with pytest.raises(MessageError, match="undecodable"):
        decode(b"\x93garbage")
    foreign = msgspec.msgpack.encode({**msgspec.msgpack.decode(encode(_trajectory())), "schema": SCHEMA_VERSION + 1})
    with pytest.raises(MessageError, match="schema"):
        decode(foreign)


def test_per_token_arrays_travel_as_typed_binary_blobs():
    trajectory = _trajectory(loss_mask=[1, 0, 1])
    raw = msgspec.msgpack.decode(encode(trajectory))
    assert raw["response_ids"] == msgspec.msgpack.Ext(1, array.array("i", [3, 4, 5]).tobytes())
    assert raw["behavior_logprobs"].code == 2 and len(raw["behavior_logprobs"].data) == 3 * 4
    decoded = decode(encode(trajectory))
    assert isinstance(decoded.response_ids, TokenArray) and isinstance(decoded.behavior_logprobs, LogprobArray)
    assert list(decoded.loss_mask) == [1, 0, 1]
    assert list(decoded.behavior_logprobs) == pytest.approx([-0.1, -0.2, -0.3], abs=1e-7)


def test_lists_from_older_writers_are_still_read_and_bad_arrays_are_refused():
    as_lists = {**msgspec.msgpack.decode(encode(_trajectory())), "response_ids": [3, 4, 5]}
    assert list(decode(msgspec.msgpack.encode(as_lists)).response_ids) == [3, 4, 5]
    for bad in ([1.5], [2**40], msgspec.msgpack.Ext(2, b"\0" * 12), msgspec.msgpack.Ext(1, b"\0" * 5)):
        with pytest.raises(MessageError):
            decode(msgspec.msgpack.encode({**as_lists, "response_ids": bad}))


def test_raw_responses_are_the_same_messages_on_the_wire():
    """The buffer sends stored frames as Raw*Response; the trainer reads a *Response with Trajectories."""
    assert RawBatchResponse.__struct_fields__ == BatchResponse.__struct_fields__
    assert RawPartialsResponse.__struct_fields__ == PartialsResponse.__struct_fields__
    trajectory = _trajectory()
    frames = [msgspec.Raw(encode(trajectory))]
    batch = decode(encode(RawBatchResponse(trainer_version=4, trajectories=frames, dropped_groups={"g": 2})))
    assert isinstance(batch, BatchResponse) and batch.trajectories == [trajectory] and batch.dropped_groups == {"g": 2}
    partials = decode(encode(RawPartialsResponse(trajectories=frames, dropped_stale=1)))
    assert isinstance(partials, PartialsResponse) and partials.trajectories == [trajectory]
