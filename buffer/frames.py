"""Read just enough of a Trajectory frame to index, validate and route it.

The buffer never needs the token arrays themselves: it stores the frame as it
arrived and serves it unchanged. The big arrays stay `msgspec.Raw` (views of
their binary blobs) and are checked in place: lengths from the blob sizes,
finiteness as a numpy view. Only the per-token versions are decoded, for the
staleness bound. The trainer-side client decodes each served trajectory on its
own and drops (and logs) any that fail, so one bad frame cannot poison a batch.
"""

from __future__ import annotations

import struct

import msgspec
import numpy as np

from async_rl.messages import (
    SCHEMA_VERSION,
    LogprobArray,
    MessageError,
    TokenArray,
    make_decoder,
    oldest_version,
    submission_key,
)


class TrajectoryHeader(msgspec.Struct, tag_field="kind", tag="trajectory", kw_only=True):
    schema: int
    sample_id: str
    group_id: str
    group_size: int
    prompt_ids: msgspec.Raw
    response_ids: msgspec.Raw
    behavior_logprobs: LogprobArray
    token_versions: TokenArray
    loss_mask: msgspec.Raw = msgspec.Raw(b"\xc0")  # msgpack nil
    attempt: int = 1
    partial: bool = False

    @property
    def submission_key(self) -> str:
        return submission_key(self.sample_id, self.attempt, self.partial)  # one definition of the key

    @property
    def oldest_version(self) -> int:
        return oldest_version(self.token_versions)


_header_decoder = make_decoder(TrajectoryHeader)
_NIL = b"\xc0"  # msgpack nil: no loss mask
# fixext 1/2/4/8/16 carry their size in the tag; ext 8/16/32 in a length field.
_FIXEXT_SIZES = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
_EXT_LENGTHS = {0xC7: ">B", 0xC8: ">H", 0xC9: ">I"}


def _blob(raw: msgspec.Raw, kind: type[TokenArray | LogprobArray]) -> memoryview:
    """The payload of a per-token array's msgpack ext, checked to be of `kind`."""
    view = memoryview(raw)
    tag = view[0]
    if tag in _FIXEXT_SIZES:
        size, start = _FIXEXT_SIZES[tag], 1
    elif tag in _EXT_LENGTHS:
        fmt = _EXT_LENGTHS[tag]
        size, start = struct.unpack_from(fmt, view, 1)[0], 1 + struct.calcsize(fmt)
    else:
        raise MessageError(f"expected a {kind.__name__} blob")
    if struct.unpack_from(">b", view, start)[0] != kind.ext_code or size % 4 or len(view) != start + 1 + size:
        raise MessageError(f"expected a {kind.__name__} blob")
    return view[start + 1 :]


def read_header(frame: bytes) -> TrajectoryHeader:
    """Decode and validate a Trajectory frame; raise MessageError with the reason."""
    try:
        header = _header_decoder.decode(frame)
        tokens = len(header.token_versions)
        lengths: tuple[int, ...] = (
            len(_blob(header.response_ids, TokenArray)) // 4,
            len(header.behavior_logprobs),
            tokens,
        )
        if memoryview(header.loss_mask) != _NIL:
            lengths += (len(_blob(header.loss_mask, TokenArray)) // 4,)
        _blob(header.prompt_ids, TokenArray)
    except (msgspec.DecodeError, msgspec.ValidationError, IndexError, struct.error, TypeError) as exc:
        raise MessageError(f"not a trajectory ({len(frame)} bytes): {exc}") from exc
    if header.schema != SCHEMA_VERSION:
        raise MessageError(f"schema {header.schema} is not {SCHEMA_VERSION}")
    if not header.sample_id or not header.group_id:
        raise MessageError("empty sample_id or group_id")
    if header.group_size < 1:
        raise MessageError(f"group_size {header.group_size} < 1")
    if lengths.count(tokens) != len(lengths):
        raise MessageError(f"per-token fields differ in length: response, logprobs, versions, mask = {lengths}")
    if not tokens:
        raise MessageError("empty response")
    if not np.isfinite(np.frombuffer(header.behavior_logprobs, dtype=np.float32)).all():
        raise MessageError("behavior_logprobs contain NaN or inf")
    return header
