"""The buffer service: trajectories in over ZMQ, batches out, every change logged first.

Sockets (both ROUTER, so every message gets its own reply):
- submit: workers' DEALERs send Trajectory frames; each gets a TrajectoryAck
  only after its WAL record is committed. The architecture sketches PUSH/PULL;
  ROUTER/DEALER is a deliberate departure, because one-way PUSH cannot carry
  the per-message acks that at-least-once delivery needs.
- serve: the trainer's BatchRequest, StatsRequest and the APRIL controller's
  TakePartials. A batch's Served record is committed before the reply leaves,
  so after any crash a served id is never served again: at most once per
  sample id. A reply lost in flight is re-sent from a cache when the client
  repeats the request id; if the buffer itself dies between commit and send,
  those samples are lost to training (counted as served), never duplicated.
Off loopback both are CURVE servers: keys from --curve-secret, or the run's from the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import msgspec
import zmq
import zmq.asyncio

from async_rl import stacks, zmq_auth
from async_rl.messages import (
    BatchRequest,
    BatchResponse,
    Message,
    MessageError,
    RawBatchResponse,
    RawPartialsResponse,
    RecoverWorker,
    Rejected,
    StatsRequest,
    TakePartials,
    TrajectoryAck,
    decode,
    encode,
)
from async_rl.transport import DEFAULT_SERVE, DEFAULT_SUBMIT
from buffer.config import BufferConfig
from buffer.frames import read_header
from buffer.replay import ReplayBuffer
from buffer.wal import Put, Released, WriteAheadLog

log = logging.getLogger("buffer.service")

WAL_NAME = "buffer.wal"
_DRAIN = 512  # messages handled per WAL commit (group commit)
_REPLY_CACHE = 64


@dataclass
class _PendingBatch:
    identity: bytes
    request: BatchRequest
    deadline: float
    dropped_stale: int = 0
    dropped_groups: dict[str, int] = field(default_factory=dict)


@dataclass
class BufferService:
    """Usable in-process (`await service.run()`, cancel to stop) or via `async-rl buffer serve`.

    `config` is the recipe's [buffer]; the rest is the run's wiring: the log's folder, the two
    endpoints to bind ("tcp://127.0.0.1:*" picks a port; `endpoints` then tells which), the hard
    ceiling on staleness (staleness.eta: a BatchRequest may ask for less, never more) and CURVE.
    """

    config: BufferConfig
    directory: Path
    submit: str
    serve: str
    max_staleness: int
    curve: zmq_auth.CurveServer | None = None
    endpoints: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.wal = WriteAheadLog(self.directory / WAL_NAME, self.config.fsync, self.config.fsync_interval_s)
        self.buffer = ReplayBuffer(self.config.capacity, self.config.stale_policy, self.config.sampling)
        for record in self.wal.recovered:
            self.buffer.apply(record)
        log.info("recovered %d WAL records: %s", len(self.wal.recovered), self.buffer.stats())
        self.wal.recovered = []
        self.ready = asyncio.Event()
        self._pending: dict[str, _PendingBatch] = {}
        self._replies: OrderedDict[str, bytes] = OrderedDict()

    async def run(self) -> None:
        context = zmq.asyncio.Context()
        authenticator = zmq_auth.start_authenticator(context, self.curve) if self.curve else None
        sockets = {name: self._bind(context, name) for name in ("submit", "serve")}
        self.ready.set()
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._submit_loop(sockets["submit"], sockets["serve"]))
                tasks.create_task(self._serve_loop(sockets["serve"]))
                if self.config.fsync == "batch":
                    tasks.create_task(self._sync_loop())
        finally:
            for socket in sockets.values():
                socket.close(linger=0)
            if authenticator:
                authenticator.stop()
            context.term()
            self.wal.close()

    def _bind(self, context: zmq.asyncio.Context, name: str) -> zmq.asyncio.Socket:
        endpoint = getattr(self, name)
        zmq_auth.check_bind(endpoint, self.curve is not None, self.config.allow_insecure_bind)
        socket = context.socket(zmq.ROUTER)
        socket.sndhwm = socket.rcvhwm = self.config.hwm
        # Hard memory guard in libzmq; frames between max_frame_bytes and this are rejected with a reason.
        socket.maxmsgsize = 4 * self.config.max_frame_bytes
        socket.router_mandatory = False
        if self.curve:
            zmq_auth.secure_server(socket, self.curve)
        socket.bind(endpoint)
        self.endpoints[name] = cast(bytes, socket.last_endpoint).decode()
        return socket

    # ---- submission -----------------------------------------------------
    async def _submit_loop(self, submit: zmq.asyncio.Socket, serve: zmq.asyncio.Socket) -> None:
        while True:
            messages = [await submit.recv_multipart()]
            while len(messages) < _DRAIN:
                try:
                    messages.append(await submit.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
            acks = [(parts[0], self._accept(parts[1:])) for parts in messages]
            self._commit()
            for identity, ack in acks:
                await submit.send_multipart([identity, encode(ack)])
            await self._serve_pending(serve)

    def _accept(self, frames: list[bytes]) -> TrajectoryAck:
        """Validate, de-duplicate and log one trajectory; the ack is sent after the commit."""
        try:
            header = read_header(self._single_frame(frames))
        except MessageError as exc:
            log.warning("rejected submission: %s", exc)
            return self.buffer.reject("", str(exc))
        try:
            refusal = self.buffer.admit(header)
        except Exception as exc:  # a bug must cost one message, never the service
            log.exception("could not admit %s", header.submission_key)
            return self.buffer.reject(header.submission_key, f"internal error: {exc!r}")
        if refusal is not None:
            return refusal
        record = Put(frame=msgspec.Raw(frames[0]))
        self.wal.append(record)
        self.buffer.apply(record, header)
        return TrajectoryAck(sample_id=header.submission_key, accepted=True)

    def _single_frame(self, frames: list[bytes]) -> bytes:
        if len(frames) != 1:
            raise MessageError(f"expected 1 frame, got {len(frames)}")
        if len(frames[0]) > self.config.max_frame_bytes:
            raise MessageError(f"oversized frame: {len(frames[0])} > {self.config.max_frame_bytes} bytes")
        return frames[0]

    def _commit(self) -> None:
        self.wal.commit()
        if self.wal.size > self.config.compact_min_bytes and self.buffer.live_bytes < self.wal.size // 2:
            before = self.wal.size
            self.wal.rewrite(self.buffer.live_records())
            log.info("compacted WAL %d -> %d bytes", before, self.wal.size)

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.fsync_interval_s)
            self.wal.sync()

    # ---- serving --------------------------------------------------------
    async def _serve_loop(self, serve: zmq.asyncio.Socket) -> None:
        while True:
            deadlines = [pending.deadline for pending in self._pending.values()]
            wait_ms = max(0, int((min(deadlines) - time.monotonic()) * 1000) + 1) if deadlines else None
            if await serve.poll(wait_ms):  # flags default to POLLIN
                identity, *frames = await serve.recv_multipart()
                try:
                    await self._handle_request(serve, identity, frames)
                except Exception as exc:  # a bug must cost one request, never the service
                    log.exception("request failed")
                    self.buffer.reject("", repr(exc))
                    await serve.send_multipart([identity, encode(Rejected(reason=f"internal error: {exc!r}"))])
            await self._serve_pending(serve)

    async def _handle_request(self, serve: zmq.asyncio.Socket, identity: bytes, frames: list[bytes]) -> None:
        try:
            request = decode(self._single_frame(frames))
            if isinstance(request, BatchRequest) and not (0 <= request.timeout_s <= 3600 and request.num_groups >= 1):
                raise MessageError(f"BatchRequest needs num_groups >= 1 and 0 <= timeout_s <= 3600: {request}")
        except MessageError as exc:
            log.warning("rejected request: %s", exc)
            self.buffer.reject("", str(exc))
            await serve.send_multipart([identity, encode(Rejected(reason=str(exc)))])
            return
        request_id = getattr(request, "request_id", "")
        if request_id and request_id in self._replies:
            await serve.send_multipart([identity, self._replies[request_id]])
            return
        match request:
            case BatchRequest():
                version = request.trainer_version  # a refused batch is forgotten, if one was served
                refused = [version] if request.refused_served and version in self.buffer.retained else []
                if request.durable_version > self.buffer.released_below or refused:
                    released = Released(
                        below_version=max(request.durable_version, self.buffer.released_below), versions=refused
                    )
                    self.wal.append(released)
                    self._commit()
                    self.buffer.apply(released)
                self.buffer.trainer_version = max(self.buffer.trainer_version, request.trainer_version)
                if request_id in self._pending:  # a repeat: answer the newest connection, keep the count
                    self._pending[request_id].identity = identity
                else:
                    self._pending[request_id] = _PendingBatch(identity, request, time.monotonic() + request.timeout_s)
            case StatsRequest():
                stats = self.buffer.stats(request.trainer_version)
                stats.request_id = request_id
                await serve.send_multipart([identity, encode(stats)])
            case RecoverWorker():
                recovery = self.buffer.worker_recovery(request.group_prefix, request.group_size)
                recovery.request_id = request_id
                await serve.send_multipart([identity, encode(recovery)])
            case TakePartials():
                taken, frames_out = self.buffer.plan_partials(request.max_n, request.min_version, request.group_prefix)
                self.wal.append(taken)
                self._commit()
                self.buffer.apply(taken)
                reply = RawPartialsResponse(
                    trajectories=frames_out, dropped_stale=len(taken.dropped_keys), request_id=request_id
                )
                await self._reply(serve, identity, request_id, reply)
            case _:
                reason = f"{type(request).__name__} is not a request this service answers"
                self.buffer.reject("", reason)
                await serve.send_multipart([identity, encode(Rejected(reason=reason, request_id=request_id))])

    async def _serve_pending(self, serve: zmq.asyncio.Socket) -> None:
        for request_id, pending in list(self._pending.items()):
            request = pending.request
            plan = self.buffer.plan_batch(
                request.trainer_version,
                request.num_groups,
                min(request.max_staleness, self.max_staleness),
                request.include_stale,
            )
            if plan.dropped is not None:
                pending.dropped_stale += len(plan.dropped.sample_ids)
                pending.dropped_groups.update((gid, self.buffer.groups[gid].size) for gid in plan.dropped.group_ids)
            records = [record for record in (plan.dropped, plan.served) if record is not None]
            for record in records:
                self.wal.append(record)
            if records:
                self._commit()
                for record in records:
                    self.buffer.apply(record)
            reply: Message
            if plan.served is not None or plan.replayed:
                # The frames are encoded Trajectories: msgspec.Raw embeds them without re-encoding.
                reply = RawBatchResponse(
                    trainer_version=request.trainer_version,
                    trajectories=plan.frames,
                    dropped_stale=pending.dropped_stale,
                    dropped_groups=pending.dropped_groups,
                    request_id=request_id,
                )
            elif pending.dropped_groups or time.monotonic() >= pending.deadline:
                # Drops are answered at once: the workers counted those groups as accepted and wait
                # for that budget back before they generate what would fill this batch.
                ready = self.buffer.stats(request.trainer_version).complete_groups
                why = f"dropped {len(pending.dropped_groups)} stale groups" if pending.dropped_groups else "timeout"
                reply = BatchResponse(
                    trainer_version=request.trainer_version,
                    trajectories=[],
                    dropped_stale=pending.dropped_stale,
                    dropped_groups=pending.dropped_groups,
                    error=f"{why}: {ready} of {request.num_groups} groups ready",
                    request_id=request_id,
                )
            else:
                continue
            del self._pending[request_id]
            await self._reply(serve, pending.identity, request_id, reply)

    async def _reply(self, serve: zmq.asyncio.Socket, identity: bytes, request_id: str, reply: Message) -> None:
        frame = encode(reply)
        if request_id:
            self._replies[request_id] = frame
            while len(self._replies) > _REPLY_CACHE:
                self._replies.popitem(last=False)
        await serve.send_multipart([identity, frame])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--config", type=Path, help="a run's config.json: its [buffer], its staleness.eta and its folder"
    )
    source.add_argument("--dir", type=Path, help="standalone: the write-ahead log's folder, [buffer] defaults")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="standalone: a [buffer] setting, e.g. --set fsync=batch (repeatable)",
    )
    parser.add_argument("--max-staleness", type=int, default=4, help="standalone: the staleness ceiling")
    parser.add_argument("--bind-submit", default=DEFAULT_SUBMIT, help="ROUTER endpoint for trajectories")
    parser.add_argument("--bind-serve", default=DEFAULT_SERVE, help="ROUTER endpoint for batch/stats requests")
    parser.add_argument(
        "--curve-secret", type=Path, help="server .key_secret file: enables CURVE (else the run's keys from the env)"
    )
    parser.add_argument("--curve-clients", type=Path, help="folder of authorized client .key files")


def server_keys(args: argparse.Namespace) -> zmq_auth.CurveServer | None:
    """--curve-secret (with --curve-clients) when given, else the run's keys from the environment
    (RunKeys.server_env). The flags win: a standalone buffer's key files are never replaced by an
    environment it happened to inherit."""
    if args.curve_secret:
        return zmq_auth.load_server(args.curve_secret, args.curve_clients)
    return zmq_auth.server_keys_from_env()


def service_from_args(args: argparse.Namespace) -> BufferService:
    from async_rl.config import ConfigError, apply_override, read_run_config

    if args.config is not None:
        run = read_run_config(args.config)
        config, directory, max_staleness = run.buffer, run.output_path(run.buffer.dir, "buffer"), run.staleness.eta
    else:
        table: dict = {}
        for assignment in args.overrides:
            apply_override(table, assignment)
        try:
            config = msgspec.convert(table, BufferConfig)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"--set: {exc}") from None
        directory, max_staleness = args.dir, args.max_staleness
    return BufferService(
        config,
        directory=directory,
        submit=args.bind_submit,
        serve=args.bind_serve,
        max_staleness=max_staleness,
        curve=server_keys(args),
    )


async def _serve_until_signalled(service: BufferService) -> None:
    task = asyncio.current_task()
    assert task is not None  # called from a coroutine
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(service.run())
        await service.ready.wait()
        print(f"buffer ready submit={service.endpoints['submit']} serve={service.endpoints['serve']}", flush=True)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stacks.install("buffer")
    try:
        service = service_from_args(args)
    except ValueError as exc:  # a ConfigError, or CURVE keys in the environment that cannot be used
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve_until_signalled(service))
    except asyncio.CancelledError:
        pass
    return 0
