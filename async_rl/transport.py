"""Async ZeroMQ endpoints that talk to the buffer service and announce versions.

- TrajectorySender (rollout worker): DEALER -> buffer ROUTER. Keeps every
  trajectory until its ack arrives and re-sends after `ack_timeout_s`
  (at-least-once; the buffer de-duplicates by submission key). At most
  `max_in_flight` unacked trajectories: `send` waits beyond that (backpressure).
- BufferClient (trainer, APRIL controller): DEALER request/reply with a
  request id; a request is repeated with the same id until answered, so a
  buffer restart is survived and a lost reply is re-sent, not re-served.
- VersionPublisher / VersionSubscriber: PUB/SUB of WeightsPublished; the
  publisher repeats the latest notice so late joiners catch up.
Everything connects to loopback unless told otherwise; CURVE keys (`curve=`, from the process's
environment: zmq_auth.RunKeys) secure the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, cast

import msgspec
import zmq
import zmq.asyncio

from async_rl import zmq_auth
from async_rl.messages import (
    BatchRequest,
    BatchResponse,
    BufferStats,
    Message,
    MessageError,
    RawBatchResponse,
    RawPartialsResponse,
    RecoverWorker,
    Rejected,
    StatsRequest,
    TakePartials,
    Trajectory,
    TrajectoryAck,
    WeightsPublished,
    WorkerRecovery,
    decode,
    encode,
    make_decoder,
)

log = logging.getLogger(__name__)

_Request = BatchRequest | StatsRequest | TakePartials | RecoverWorker
_Reply = TypeVar("_Reply", bound=Message)

DEFAULT_SUBMIT = "tcp://127.0.0.1:5601"
DEFAULT_SERVE = "tcp://127.0.0.1:5602"
DEFAULT_VERSIONS = "tcp://127.0.0.1:5603"
CLOSE_LINGER_MS = 500


def _socket(context: zmq.asyncio.Context, kind: int, curve: zmq_auth.CurveClient | None, hwm: int = 1000):
    socket = context.socket(kind)
    socket.sndhwm = socket.rcvhwm = hwm
    socket.linger = 0
    if curve:
        zmq_auth.secure_client(socket, curve)
    return socket


@dataclass
class _Unacked:
    frame: bytes
    resend_at: float


class TrajectorySender:
    """`async with TrajectorySender(endpoint) as sender: await sender.send(t); await sender.flush()`."""

    def __init__(
        self,
        endpoint: str = DEFAULT_SUBMIT,
        *,
        max_in_flight: int = 256,
        ack_timeout_s: float = 2.0,
        retry_after_s: float = 0.2,
        hwm: int = 1000,
        curve: zmq_auth.CurveClient | None = None,
        on_ack: Callable[[TrajectoryAck], None] | None = None,
    ):
        self.endpoint = endpoint
        self.on_ack = on_ack
        self.ack_timeout_s = ack_timeout_s
        self.retry_after_s = retry_after_s
        self.counts = Counter(sent=0, resent=0, acked=0, duplicates=0, rejected=0)
        self.rejections: list[TrajectoryAck] = []  # permanent refusals, for the caller to inspect
        self._context = zmq.asyncio.Context.instance()
        self._socket = _socket(self._context, zmq.DEALER, curve, hwm)
        self._unacked: dict[str, _Unacked] = {}
        self._slots = asyncio.Semaphore(max_in_flight)
        self._all_acked = asyncio.Event()
        self._all_acked.set()
        self._background: asyncio.Task | None = None

    async def __aenter__(self) -> TrajectorySender:
        self._socket.connect(self.endpoint)
        self._background = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._background:
            self._background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._background
        self._socket.close(linger=0)

    @property
    def in_flight(self) -> int:
        return len(self._unacked)

    async def send(self, trajectory: Trajectory) -> None:
        """Returns once queued; waits while `max_in_flight` trajectories are unacked."""
        key = trajectory.submission_key
        if key in self._unacked:
            return
        await self._slots.acquire()
        frame = encode(trajectory)
        self._unacked[key] = _Unacked(frame, time.monotonic() + self.ack_timeout_s)
        self._all_acked.clear()
        await self._socket.send(frame)
        self.counts["sent"] += 1

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every trajectory sent so far is acknowledged (durable in the buffer)."""
        async with asyncio.timeout(timeout):
            await self._all_acked.wait()

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._read_acks())
            tasks.create_task(self._resend_overdue())

    async def _read_acks(self) -> None:
        while True:
            frame = await self._socket.recv()
            try:
                ack = decode(frame)
            except MessageError as exc:
                log.warning("ignored reply from buffer: %s", exc)
                continue
            if not isinstance(ack, TrajectoryAck) or ack.sample_id not in self._unacked:
                continue  # an ack for a resend already acked, or a refusal of an unreadable frame
            if ack.retry:
                self._unacked[ack.sample_id].resend_at = time.monotonic() + self.retry_after_s
                continue
            del self._unacked[ack.sample_id]
            self._slots.release()
            if ack.accepted:
                self.counts["acked"] += 1
                self.counts["duplicates"] += ack.reason == "duplicate"
            else:
                self.counts["rejected"] += 1
                self.rejections.append(ack)
                log.error("buffer refused %s: %s", ack.sample_id, ack.reason)
            if self.on_ack:
                self.on_ack(ack)
            if not self._unacked:
                self._all_acked.set()

    async def _resend_overdue(self) -> None:
        while True:
            await asyncio.sleep(min(self.retry_after_s, self.ack_timeout_s / 4))
            now = time.monotonic()
            for pending in list(self._unacked.values()):
                if pending.resend_at <= now:
                    pending.resend_at = now + self.ack_timeout_s
                    await self._socket.send(pending.frame)
                    self.counts["resent"] += 1


class BufferRefused(RuntimeError):
    """The buffer answered a request with a refusal."""


class BufferClient:
    """Trainer/controller side of the serve socket. One request at a time per client."""

    def __init__(
        self,
        endpoint: str = DEFAULT_SERVE,
        *,
        resend_after_s: float = 1.0,
        reply_grace_s: float = 2.0,
        curve: zmq_auth.CurveClient | None = None,
    ):
        self.resend_after_s = resend_after_s
        self.reply_grace_s = reply_grace_s
        self.undecodable_trajectories = 0
        self._socket = _socket(zmq.asyncio.Context.instance(), zmq.DEALER, curve)
        self._socket.connect(endpoint)
        self._lock = asyncio.Lock()

    def close(self) -> None:
        self._socket.close(linger=0)

    async def __aenter__(self) -> BufferClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.close()

    async def get_batch(
        self,
        trainer_version: int,
        num_groups: int,
        max_staleness: int,
        timeout: float = 30.0,
        include_stale: bool = False,
        durable_version: int = 0,
        refused_served: bool = False,
    ) -> BatchResponse:
        """`num_groups` complete groups with staleness <= max_staleness, or an empty batch with `error`
        (at timeout, or at once after dropping stale groups: their ids are in `dropped_groups`); for a
        version served before (above `durable_version`), the same batch again, unless `refused_served`."""
        request = BatchRequest(
            trainer_version=trainer_version,
            num_groups=num_groups,
            max_staleness=max_staleness,
            timeout_s=timeout,
            include_stale=include_stale,
            durable_version=durable_version,
            refused_served=refused_served,
            request_id=uuid.uuid4().hex,
        )
        raw = await self._request(request, RawBatchResponse, timeout + self.reply_grace_s)
        return BatchResponse(
            trainer_version=raw.trainer_version,
            trajectories=self._decode_each(raw.trajectories),
            dropped_stale=raw.dropped_stale,
            dropped_groups=raw.dropped_groups,
            error=raw.error,
            request_id=raw.request_id,
        )

    async def stats(self, trainer_version: int | None = None, timeout: float = 5.0) -> BufferStats:
        request = StatsRequest(trainer_version=trainer_version, request_id=uuid.uuid4().hex)
        return await self._request(request, BufferStats, timeout)

    async def recover_worker(self, group_prefix: str, group_size: int, timeout: float = 30.0) -> WorkerRecovery:
        """What the buffer holds of the groups whose ids start with `group_prefix` (RecoverWorker)."""
        request = RecoverWorker(group_prefix=group_prefix, group_size=group_size, request_id=uuid.uuid4().hex)
        return await self._request(request, WorkerRecovery, timeout)

    async def take_partials(
        self, max_n: int, min_version: int, timeout: float = 5.0, group_prefix: str = ""
    ) -> list[Trajectory]:
        """Remove and return partial rollouts fresh enough to resume (older ones are dropped by the buffer)."""
        request = TakePartials(
            max_n=max_n, min_version=min_version, group_prefix=group_prefix, request_id=uuid.uuid4().hex
        )
        raw = await self._request(request, RawPartialsResponse, timeout)
        return self._decode_each(raw.trajectories)

    def _decode_each(self, frames: list[msgspec.Raw]) -> list[Trajectory]:
        """One undecodable trajectory is dropped and logged; it does not cost the batch."""
        trajectories = []
        for frame in frames:
            try:
                trajectories.append(_trajectory_decoder.decode(frame))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self.undecodable_trajectories += 1
                log.error("dropped an undecodable trajectory from the buffer: %s", exc)
        return trajectories

    async def _request(self, request: _Request, reply_type: type[_Reply], timeout: float) -> _Reply:
        frame = encode(request)
        decoder = make_decoder(reply_type | Rejected)
        async with self._lock, asyncio.timeout(timeout):
            while True:
                await self._socket.send(frame)
                try:
                    async with asyncio.timeout(max(self.resend_after_s, getattr(request, "timeout_s", 0.0) + 0.5)):
                        while True:
                            reply = self._read(decoder, await self._socket.recv())
                            if reply is not None and reply.request_id == request.request_id:
                                break
                except TimeoutError:
                    continue  # buffer restarted or reply lost: ask again under the same id
                if isinstance(reply, Rejected):
                    raise BufferRefused(reply.reason)
                return reply

    @staticmethod
    def _read(decoder: msgspec.msgpack.Decoder, frame: bytes):
        try:
            return decoder.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("ignored reply from buffer: %s", exc)
            return None


_trajectory_decoder = make_decoder(Trajectory)


class VersionPublisher:
    """Trainer side: binds PUB; repeats the latest notice every `repeat_s` for late subscribers.
    Construct it inside the event loop: with `curve`, its ZAP handler runs there."""

    def __init__(
        self,
        endpoint: str = DEFAULT_VERSIONS,
        *,
        repeat_s: float = 1.0,
        curve: zmq_auth.CurveServer | None = None,
        allow_insecure_bind: bool = False,
    ):
        zmq_auth.check_bind(endpoint, curve is not None, allow_insecure_bind)
        self.repeat_s = repeat_s
        # A context of its own: a ZAP handler serves a whole context, and this one admits the run's subscribers.
        self._context = zmq.asyncio.Context()
        self._authenticator = zmq_auth.start_authenticator(self._context, curve) if curve else None
        self._socket = self._context.socket(zmq.PUB)
        self._socket.linger = 0
        if curve:
            zmq_auth.secure_server(self._socket, curve)
        self._socket.bind(endpoint)
        self.endpoint = cast(bytes, self._socket.last_endpoint).decode()
        self._latest: bytes | None = None
        self._repeater: asyncio.Task | None = None
        self.start = uuid.uuid4().hex

    async def publish(self, notice: WeightsPublished) -> None:
        self._latest = encode(msgspec.structs.replace(notice, trainer_start=self.start))
        await self._socket.send(self._latest)
        if self._repeater is None:
            self._repeater = asyncio.create_task(self._repeat())

    async def _repeat(self) -> None:
        while True:
            await asyncio.sleep(self.repeat_s)
            await self._socket.send(self._latest)

    def close(self) -> None:
        """The last notice still reaches connected subscribers (waits up to a short linger), then the socket goes."""
        if self._repeater:
            self._repeater.cancel()
        self._socket.close(linger=CLOSE_LINGER_MS)
        if self._authenticator:
            self._authenticator.stop()
        self._context.term()


class VersionSubscriber:
    """Engines/workers/controller side: yields each new version once, in increasing order, and a
    repeat of the current version only when it reports new drops (the trainer refused a batch
    without publishing, which must give admission budget back even at eta = 0). A notice from a new
    trainer start is yielded whatever its version (a restarted trainer resumes from a checkpoint)."""

    def __init__(self, endpoint: str = DEFAULT_VERSIONS, *, curve: zmq_auth.CurveClient | None = None):
        self._socket = _socket(zmq.asyncio.Context.instance(), zmq.SUB, curve)
        self._socket.subscribe(b"")
        self._socket.connect(endpoint)
        self.latest: WeightsPublished | None = None

    async def next(self) -> WeightsPublished:
        while True:
            try:
                notice = decode(await self._socket.recv())
            except MessageError as exc:
                log.warning("ignored version notice: %s", exc)
                continue
            if not isinstance(notice, WeightsPublished):
                continue
            latest = self.latest
            if (
                latest is None
                or notice.trainer_start != latest.trainer_start
                or notice.version > latest.version
                or (notice.version == latest.version and notice.dropped_groups != latest.dropped_groups)
            ):
                self.latest = notice
                return notice

    async def wait_for(self, version: int) -> WeightsPublished:
        while self.latest is None or self.latest.version < version:
            await self.next()
        return self.latest

    def close(self) -> None:
        self._socket.close(linger=0)
