"""Typed messages that cross process boundaries.

Every message is a msgspec Struct, tagged by `kind` so one decoder reads any of
them, and carries `schema` so a receiver can refuse a message from an
incompatible build with a clear reason instead of misreading it.
msgpack on the wire; pickle never crosses a socket.

Per-token arrays (ids, logprobs, versions, masks) are `TokenArray` /
`LogprobArray`: list-like array.array values that travel as one little-endian
binary blob each (a msgpack ext), so a 1k-token trajectory costs the receiver
a few microseconds instead of materialising 3k Python numbers.
"""

from __future__ import annotations

import array
import sys
from collections.abc import Sequence
from typing import Any

import msgspec

SCHEMA_VERSION = 2


class _PerTokenArray(array.array):
    element: str  # array typecode
    ext_code: int  # msgpack ext type on the wire

    def __new__(cls, values=()):
        return super().__new__(cls, cls.element, values)

    def __reduce__(self):
        return type(self), (self.tolist(),)


class TokenArray(_PerTokenArray):
    """int32 per-token values: token ids, policy versions, 0/1 loss masks."""

    element, ext_code = "i", 1


class LogprobArray(_PerTokenArray):
    """float32 per-token log-probabilities."""

    element, ext_code = "f", 2


_ARRAY_TYPES = {cls.ext_code: cls for cls in (TokenArray, LogprobArray)}
_LITTLE_ENDIAN = sys.byteorder == "little"


def _encode_array(value: Any) -> msgspec.msgpack.Ext:
    if not isinstance(value, _PerTokenArray):
        raise NotImplementedError(f"cannot encode {type(value).__name__}")
    if not _LITTLE_ENDIAN:
        value = type(value)(value)
        value.byteswap()
    return msgspec.msgpack.Ext(value.ext_code, value.tobytes())


def _decode_array(code: int, data: memoryview) -> _PerTokenArray:
    cls = _ARRAY_TYPES.get(code)
    if cls is None or len(data) % 4:
        raise msgspec.ValidationError(f"not a per-token array (ext code {code}, {len(data)} bytes)")
    values = cls()
    values.frombytes(data)
    if not _LITTLE_ENDIAN:
        values.byteswap()
    return values


def _coerce_array(kind: type, value: Any) -> Any:
    """Lists become arrays: constructors (and JSON-born dicts) may pass plain lists."""
    if type(value) is kind:
        return value
    if kind in _ARRAY_TYPES.values() and isinstance(value, (list, tuple)):
        try:
            return kind(value)
        except (TypeError, OverflowError) as exc:
            raise ValueError(f"not a {kind.__name__}: {exc}") from exc
    raise ValueError(f"expected a {kind.__name__}, got {type(value).__name__}")


class Message(msgspec.Struct, tag_field="kind", forbid_unknown_fields=False, kw_only=True):
    schema: int = SCHEMA_VERSION


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
    prompt_ids: TokenArray
    response_ids: TokenArray
    behavior_logprobs: LogprobArray
    token_versions: TokenArray
    reward: float = 0.0
    finish_reason: str = "length"
    # 1 = trained on, 0 = masked (e.g. tool output inserted in a multi-turn rollout).
    loss_mask: TokenArray | None = None
    timings: Timings = msgspec.field(default_factory=Timings)
    engine_id: str = ""
    attempt: int = 1
    # A retracted, unfinished response bound for the buffer's partial-rollout pool.
    partial: bool = False
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in _TRAJECTORY_ARRAYS:
            value = getattr(self, name)
            kind = LogprobArray if name == "behavior_logprobs" else TokenArray
            if value is not None and type(value) is not kind:
                setattr(self, name, kind(value))

    @property
    def submission_key(self) -> str:
        return submission_key(self.sample_id, self.attempt, self.partial)

    @property
    def oldest_version(self) -> int:
        return oldest_version(self.token_versions)

    def staleness(self, trainer_version: int) -> int:
        return trainer_version - self.oldest_version


_TRAJECTORY_ARRAYS = ("prompt_ids", "response_ids", "behavior_logprobs", "token_versions", "loss_mask")


def submission_key(sample_id: str, attempt: int, partial: bool) -> str:
    """What the buffer de-duplicates on: a partial is resubmitted once per attempt."""
    return f"{sample_id}@{attempt}" if partial else sample_id


def oldest_version(token_versions: TokenArray) -> int:
    """min() through numpy: a Python min over 1k array items costs ~10 us per call."""
    import numpy as np

    return int(np.frombuffer(token_versions, dtype=np.int32).min()) if len(token_versions) else -1


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
    # The trainer can never go back below this version (its newest checkpoint): the buffer forgets
    # the batches it served for older versions. A version asked for again gets its batch again...
    durable_version: int = 0
    # ...unless the trainer refused that batch (a malformed trajectory): then it gets a fresh one.
    refused_served: bool = False


class BatchResponse(Message, tag="batch_response"):
    trainer_version: int
    trajectories: list[Trajectory]
    dropped_stale: int = 0
    # group_id -> group size of the groups dropped as stale while this request waited (admission gives them back).
    dropped_groups: dict[str, int] = msgspec.field(default_factory=dict)
    error: str = ""
    request_id: str = ""


class RawBatchResponse(Message, tag="batch_response"):
    """BatchResponse on the wire with each trajectory left encoded (`msgspec.Raw`): the buffer serves
    its stored frames as they are, the client decodes each one on its own. Same fields, same order."""

    trainer_version: int
    trajectories: list[msgspec.Raw]
    dropped_stale: int = 0
    dropped_groups: dict[str, int] = msgspec.field(default_factory=dict)
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
    """Remove up to `max_n` partial rollouts whose oldest token version is >= `min_version`
    (older ones of the same groups are dropped), of groups whose id starts with `group_prefix`:
    each worker takes back only the partials it retracted, so its admission stays exact."""

    max_n: int
    min_version: int
    group_prefix: str = ""
    request_id: str = ""


class RecoverWorker(Message, tag="recover_worker"):
    """A (re)starting rollout worker asks what the buffer holds of its groups (ids starting with
    `group_prefix`), so that it neither loses nor generates twice a prompt group."""

    group_prefix: str
    group_size: int
    request_id: str = ""


class WorkerRecovery(Message, tag="worker_recovery"):
    # Samples of the worker's groups the trainer has been served or that wait in the buffer: its
    # admission's accepted count.
    accepted_samples: int
    # Groups never to generate again: complete, served, dropped, or parked as partials (APRIL resumes them).
    done_groups: list[str]
    # Groups with some members stored: generated again, the stored members deduplicated by sample id.
    open_groups: list[str]
    request_id: str = ""


class PartialsResponse(Message, tag="partials"):
    trajectories: list[Trajectory]
    dropped_stale: int = 0
    request_id: str = ""


class RawPartialsResponse(Message, tag="partials"):
    """PartialsResponse with each trajectory left encoded, like RawBatchResponse."""

    trajectories: list[msgspec.Raw]
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
    # group_id -> samples the trainer dropped since the previous notice (malformed batch, too stale):
    # their workers give that admission budget back.
    dropped_groups: dict[str, int] = msgspec.field(default_factory=dict)
    # Set by the publisher, unique per trainer process: a lower version from another start means
    # the trainer resumed from an older checkpoint, not a notice out of order.
    trainer_start: str = ""


AnyMessage = (
    Trajectory
    | TrajectoryAck
    | BatchRequest
    | BatchResponse
    | StatsRequest
    | BufferStats
    | TakePartials
    | PartialsResponse
    | RecoverWorker
    | WorkerRecovery
    | Rejected
    | WeightsPublished
)

_encoder = msgspec.msgpack.Encoder(enc_hook=_encode_array)


def make_decoder(kind: Any) -> msgspec.msgpack.Decoder:
    """A msgpack decoder for `kind` that understands per-token arrays (e.g. a header view of a Trajectory)."""
    return msgspec.msgpack.Decoder(kind, ext_hook=_decode_array, dec_hook=_coerce_array)


_decoder = make_decoder(AnyMessage)


class MessageError(ValueError):
    """A frame that is not a valid message of this schema."""


def encode(message: Message | Sequence[Message]) -> bytes:
    return _encoder.encode(message)


def decode(frame: bytes) -> AnyMessage:
    try:
        message = _decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MessageError(f"undecodable frame ({len(frame)} bytes): {exc}") from exc
    if message.schema != SCHEMA_VERSION:
        raise MessageError(f"schema {message.schema} is not {SCHEMA_VERSION}")
    return message
