import msgspec
import pytest

from async_rl.messages import SCHEMA_VERSION, MessageError, Trajectory, decode, encode


def _trajectory(**overrides):
    fields = dict(
        sample_id="s0", group_id="g0", group_size=2, prompt_ids=[1, 2], response_ids=[3, 4, 5],
        behavior_logprobs=[-0.1, -0.2, -0.3], token_versions=[3, 3, 4],
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
    foreign = msgspec.msgpack.encode({**msgspec.to_builtins(_trajectory()), "kind": "trajectory", "schema": SCHEMA_VERSION + 1})
    with pytest.raises(MessageError, match="schema"):
        decode(foreign)
