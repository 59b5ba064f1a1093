"""Typed messages that cross process boundaries.

Every message is a msgspec Struct, tagged by `kind` so one decoder reads any of
them, and carries `schema` so a receiver can refuse a message from an
incompatible build with a clear reason instead of misreading it.
msgpack on the wire; pickle never crosses a socket.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

SCHEMA_VERSION = 1


class Message(msgspec.Struct, tag_field="kind", forbid_unknown_fields=False, kw_only=True):
    schema: int = SCHEMA_VERSION


class PromptTask(Message, tag="prompt"):
    """One prompt to roll out `group_size` times (a GRPO group)."""

    task_id: str
    prompt_ids: list[int]
    group_size: int = 1
    prompt_text: str | None = None
    # Whatever the reward function needs (reference answer, test cases, ...).
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class Timings(msgspec.Struct, kw_only=True):
    """Wall-clock seconds (time.time()) of a trajectory's life."""

    submitted: float = 0.0
    first_token: float = 0.0
    finished: float = 0.0
    reward_done: float = 0.0


class Trajectory(Message, tag="trajectory"):
    """One finished (or partial) response with everything the trainer needs.

    `token_versions[i]` is the policy version whose weights produced
    `response_ids[i]`; staleness at trainer version t is t - min(token_versions).
    """

    sample_id: str
    group_id: str
    group_size: int
    prompt_ids: list[int]
    response_ids: list[int]
    behavior_logprobs: list[float]
    token_versions: list[int]
    reward: float = 0.0
    finish_reason: str = "length"
    # 1 = trained on, 0 = masked (e.g. tool output inserted in a multi-turn rollout).
    loss_mask: list[int] | None = None
    timings: Timings = msgspec.field(default_factory=Timings)
    engine_id: str = ""
    attempt: int = 1
    # A retracted, unfinished response bound for the buffer's partial-rollout pool.
    partial: bool = False
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)

    @property
    def submission_key(self) -> str:
        """What the buffer de-duplicates on: a partial is resubmitted once per attempt."""
        return f"{self.sample_id}@{self.attempt}" if self.partial else self.sample_id

    @property
    def oldest_version(self) -> int:
        return min(self.token_versions) if self.token_versions else -1

    def staleness(self, trainer_version: int) -> int:
        return trainer_version - self.oldest_version


class TrajectoryAck(Message, tag="ack"):
    """The buffer's reply once a trajectory is durable (or was a duplicate).

    `sample_id` echoes the trajectory's `submission_key`. A refusal with
    `retry=True` (buffer full) asks the sender to try again later.
    """

    sample_id: str
    accepted: bool
    reason: str = ""
    retry: bool = False


class BatchRequest(Message, tag="batch_request"):
    trainer_version: int
    num_groups: int
    max_staleness: int
    timeout_s: float = 30.0
    # A resend with the same id gets the same answer instead of a second batch.
    request_id: str = ""
    # Serve groups beyond max_staleness too (buffer kept them for importance-weighted use).
    include_stale: bool = False


class BatchResponse(Message, tag="batch_response"):
    trainer_version: int
    trajectories: list[Trajectory]
    dropped_stale: int = 0
    error: str = ""
    request_id: str = ""


class StatsRequest(Message, tag="stats_request"):
    trainer_version: int | None = None
    request_id: str = ""


class BufferStats(Message, tag="buffer_stats"):
    """Counts admission control and dashboards read; staleness is at `trainer_version`."""

    trainer_version: int
    stored: int = 0
    complete_groups: int = 0
    incomplete_groups: int = 0
    partials: int = 0
    served: int = 0
    dropped_stale: int = 0
    duplicates: int = 0
    rejected: int = 0
    capacity: int = 0
    stored_by_version: dict[int, int] = msgspec.field(default_factory=dict)
    stored_by_staleness: dict[int, int] = msgspec.field(default_factory=dict)
    request_id: str = ""


class TakePartials(Message, tag="take_partials"):
    """Remove up to `max_n` partial rollouts whose oldest token version is >= `min_version`."""

    max_n: int
    min_version: int
    request_id: str = ""


class PartialsResponse(Message, tag="partials"):
    trajectories: list[Trajectory]
    dropped_stale: int = 0
    request_id: str = ""


class Rejected(Message, tag="rejected"):
    """A request the receiver could not act on, with the reason."""

    reason: str
    request_id: str = ""


class WeightsPublished(Message, tag="weights_published"):
    version: int
    method: str  # disk | tensor | distributed
    path: str = ""
    sync_seconds: float = 0.0


AnyMessage = Union[
    PromptTask, Trajectory, TrajectoryAck, BatchRequest, BatchResponse, StatsRequest, BufferStats,
    TakePartials, PartialsResponse, Rejected, WeightsPublished,
]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AnyMessage)


class MessageError(ValueError):
    """A frame that is not a valid message of this schema."""


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(frame: bytes) -> AnyMessage:
    try:
        message = _decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MessageError(f"undecodable frame ({len(frame)} bytes): {exc}") from exc
    if message.schema != SCHEMA_VERSION:
        raise MessageError(f"schema {message.schema} is not {SCHEMA_VERSION}")
    return message
