"""Append-only, checksummed write-ahead log of every buffer state change.

Record = 8-byte header (payload length, CRC32, little-endian) + msgpack payload.
A crash can only tear the tail: replay stops at the first short or
mismatching record and the writer truncates there, so everything that was
acknowledged (written before its ack) is read back, and nothing half-written is.

fsync policy: `always` fsyncs each commit before acks go out (group commit:
one fsync per drained batch of messages); `batch` fsyncs at most every
`fsync_interval_s` (acks go out after write(2): a killed process loses
nothing, a power cut loses at most the interval); `never` leaves it to the OS.
"""

from __future__ import annotations

import logging
import os
import struct
import time
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import msgspec

log = logging.getLogger(__name__)

FsyncPolicy = Literal["always", "batch", "never"]
_HEADER = struct.Struct("<II")


class Put(msgspec.Struct, tag="put"):
    """A trajectory (finished or partial), stored as the exact frame that arrived."""

    frame: msgspec.Raw


class Served(msgspec.Struct, tag="served"):
    """Written before the batch reply leaves; the batch belongs to `trainer_version` (buffer/replay.py)."""

    trainer_version: int
    sample_ids: list[str]
    group_ids: list[str]
    summarized: int = 0  # compaction's summary: samples counted beyond `sample_ids`


class Dropped(msgspec.Struct, tag="dropped"):
    """Stale samples removed; their groups are closed so late members are not stored."""

    sample_ids: list[str]
    group_ids: list[str]
    reason: str = "stale"
    summarized: int = 0  # compaction's summary: samples counted beyond `sample_ids`


class Released(msgspec.Struct, tag="released"):
    """Served batches of versions below `below_version` are forgotten (the trainer has a checkpoint
    there and can never ask for them again), and those of `versions` (batches the trainer refused)."""

    below_version: int
    versions: list[int] = msgspec.field(default_factory=list)


class PartialsTaken(msgspec.Struct, tag="partials_taken"):
    keys: list[str]
    dropped_keys: list[str] = msgspec.field(default_factory=list)


WalRecord = Put | Served | Dropped | PartialsTaken | Released
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(WalRecord)


def read_records(path: Path) -> tuple[list[WalRecord], int]:
    """Every intact record and the byte offset where the intact prefix ends."""
    records: list[WalRecord] = []
    if not path.exists():
        return records, 0
    data = memoryview(path.read_bytes())
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, checksum = _HEADER.unpack_from(data, offset)
        payload = data[offset + _HEADER.size : offset + _HEADER.size + length]
        if len(payload) < length or zlib.crc32(payload) != checksum:
            break
        try:
            records.append(_decoder.decode(payload))
        except msgspec.DecodeError:
            break
        offset += _HEADER.size + length
    if offset < len(data):
        log.warning("%s: %d bytes after offset %d are torn or corrupt; ignored", path, len(data) - offset, offset)
    return records, offset


def _frame(record: WalRecord) -> bytes:
    payload = _encoder.encode(record)
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


class WriteAheadLog:
    """Single writer. `append` buffers; `commit` writes (and fsyncs per policy).

    Opening reads the intact records into `recovered` and cuts off a torn tail.
    """

    def __init__(self, path: Path, fsync: FsyncPolicy = "batch", fsync_interval_s: float = 1.0):
        self.path = path
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        self._pending = bytearray()
        self._unsynced = False
        self._last_sync = time.monotonic()
        self.recovered, intact = read_records(path)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        os.ftruncate(self._fd, intact)
        os.lseek(self._fd, intact, os.SEEK_SET)
        self.size = intact

    def append(self, record: WalRecord) -> None:
        self._pending += _frame(record)

    def commit(self) -> None:
        if self._pending:
            os.write(self._fd, self._pending)
            self.size += len(self._pending)
            self._pending.clear()
            self._unsynced = True
        if self.fsync == "always" or (
            self.fsync == "batch" and time.monotonic() - self._last_sync >= self.fsync_interval_s
        ):
            self.sync()

    def sync(self) -> None:
        if self._unsynced:
            os.fsync(self._fd)
            self._unsynced = False
        self._last_sync = time.monotonic()

    def rewrite(self, records: Iterable[WalRecord]) -> None:
        """Compaction: write the live state to a new file, fsync, atomically replace."""
        self.commit()
        tmp = self.path.with_suffix(".compacting")
        with open(tmp, "wb") as out:
            for record in records:
                out.write(_frame(record))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        _fsync_directory(self.path.parent)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.size = os.fstat(self._fd).st_size
        self._unsynced = False

    def close(self) -> None:
        self.commit()
        self.sync()
        os.close(self._fd)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
