"""The replay buffer's settings: a recipe's [buffer] table, which the buffer service reads itself.

Where it listens (the endpoints), where its log lives, and the staleness bound are the run's
decisions and come in beside it (see BufferService).
"""

from __future__ import annotations

from typing import Literal

import msgspec

from async_rl.checks import check_field


class BufferConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """[buffer] The versioned replay buffer and its write-ahead log."""

    dir: str = ""
    """Where the write-ahead log lives; "" = <run.output_dir>/buffer."""
    capacity: int = 100_000
    """Most trajectories held; producers are told to retry while it is full."""
    fsync: Literal["always", "batch", "never"] = "always"
    """always: an acknowledged trajectory is on disk before the ack; batch: fsync every fsync_interval_s;
    never: leave it to the OS (fast; a power loss drops the last writes, a process crash loses nothing)."""
    fsync_interval_s: float = 1.0
    """With fsync = batch, the seconds between fsyncs."""
    stale_policy: Literal["drop", "keep"] = "drop"
    """What happens to a group that became staler than the bound: dropped (counted, its budget handed
    back to admission) or kept for a request that asks for stale samples too."""
    sampling: Literal["fifo", "stalest_first", "freshest_first"] = "fifo"
    """Which complete groups a batch takes first."""
    max_frame_bytes: int = 64 << 20
    """A larger message is refused with a reason."""
    compact_min_bytes: int = 64 << 20
    """The log is rewritten to its live records once it is this large and mostly dead."""
    hwm: int = 1000
    """ZeroMQ high-water mark of both sockets: messages queued before senders wait."""
    allow_insecure_bind: bool = False
    """Bind beyond loopback without CURVE (refused otherwise)."""

    def __post_init__(self) -> None:
        check_field(self.capacity >= 1, "capacity", self.capacity, ">= 1")
        check_field(self.fsync_interval_s > 0, "fsync_interval_s", self.fsync_interval_s, "> 0")
        check_field(self.max_frame_bytes >= 1024, "max_frame_bytes", self.max_frame_bytes, ">= 1024")
        check_field(self.compact_min_bytes >= 0, "compact_min_bytes", self.compact_min_bytes, ">= 0")
        check_field(self.hwm >= 1, "hwm", self.hwm, ">= 1")
