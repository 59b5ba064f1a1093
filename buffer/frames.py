"""Read just enough of a Trajectory frame to index, validate and route it.

The buffer never needs the token lists themselves: it stores the frame as it
arrived and serves it unchanged. Materialising 3k Python numbers per
trajectory would cost more than the socket itself, so the big arrays stay
`msgspec.Raw` and are checked structurally (lengths, finiteness) in place.
Element types of the integer arrays are not checked here; the trainer-side
client decodes each served trajectory on its own and drops (and logs) any
that fail, so one bad frame cannot poison a batch.
"""

from __future__ import annotations

import math
import struct

import msgspec
import numpy as np

from async_rl.messages import SCHEMA_VERSION, MessageError, Trajectory


class TrajectoryHeader(msgspec.Struct, tag_field="kind", tag="trajectory", kw_only=True):
    schema: int
    sample_id: str
    group_id: str
    group_size: int
    prompt_ids: msgspec.Raw
    response_ids: msgspec.Raw
    behavior_logprobs: msgspec.Raw
    token_versions: list[int]
    loss_mask: msgspec.Raw = msgspec.Raw(b"\xc0")  # msgpack nil
    attempt: int = 1
    partial: bool = False

    @property
    def submission_key(self) -> str:
        return Trajectory.submission_key.fget(self)  # one definition of the key

    @property
    def oldest_version(self) -> int:
        return min(self.token_versions) if self.token_versions else -1


_header_decoder = msgspec.msgpack.Decoder(TrajectoryHeader)
_FLOAT64 = 0xCB
_float_cells = np.dtype([("tag", "u1"), ("value", ">f8")])


def _array_length(raw: msgspec.Raw) -> int:
    """Element count from a msgpack array header (fixarray, array16, array32)."""
    raw = memoryview(raw)
    first = raw[0]
    if 0x90 <= first <= 0x9F:
        return first & 0x0F
    if first == 0xDC:
        return struct.unpack_from(">H", raw, 1)[0]
    if first == 0xDD:
        return struct.unpack_from(">I", raw, 1)[0]
    raise MessageError("expected an array")


def _all_finite(raw: msgspec.Raw, length: int) -> bool:
    """msgspec writes every float as float64: check them as a strided numpy view."""
    raw = memoryview(raw)
    if length == 0:
        return True
    if 9 * length < len(raw):
        cells = np.frombuffer(raw, dtype=_float_cells, offset=len(raw) - 9 * length)
        if bool((cells["tag"] == _FLOAT64).all()):
            return bool(np.isfinite(cells["value"]).all())
    values = msgspec.msgpack.decode(raw, type=list[float])  # mixed ints/floats: slow but exact
    return all(math.isfinite(value) for value in values)


def read_header(frame: bytes) -> TrajectoryHeader:
    """Decode and validate a Trajectory frame; raise MessageError with the reason."""
    try:
        header = _header_decoder.decode(frame)
        lengths = {
            "response_ids": _array_length(header.response_ids),
            "behavior_logprobs": _array_length(header.behavior_logprobs),
            "token_versions": len(header.token_versions),
        }
        if bytes(memoryview(header.loss_mask)[:1]) != b"\xc0":
            lengths["loss_mask"] = _array_length(header.loss_mask)
        _array_length(header.prompt_ids)
    except (msgspec.DecodeError, msgspec.ValidationError, IndexError, struct.error, TypeError) as exc:
        raise MessageError(f"not a trajectory ({len(frame)} bytes): {exc}") from exc
    if header.schema != SCHEMA_VERSION:
        raise MessageError(f"schema {header.schema} is not {SCHEMA_VERSION}")
    if not header.sample_id or not header.group_id:
        raise MessageError("empty sample_id or group_id")
    if header.group_size < 1:
        raise MessageError(f"group_size {header.group_size} < 1")
    if len(set(lengths.values())) != 1:
        raise MessageError(f"per-token fields differ in length: {lengths}")
    if not header.token_versions:
        raise MessageError("empty response")
    if not _all_finite(header.behavior_logprobs, lengths["behavior_logprobs"]):
        raise MessageError("behavior_logprobs contain NaN or inf")
    return header
