"""Push the trainer's new weights to every engine, all engines concurrently.

disk: one safetensors folder per version, loaded by each engine (update_weights_from_disk);
tensor: the weights in the request body (same host, no disk); distributed: broadcasts from the
trainer (rank 0 of a private process group, see broadcast_group) while every engine receives, one
per bucket of tensors flattened into one buffer (SGLang's load_format "flattened_bucket"), one
update request per bucket, the version set by the last; cuda_ipc: a device snapshot whose CUDA IPC
handles go to SGLang engines on the trainer's GPU (update_weights_from_tensor), which copy from it.
Each engine is paused with the configured mode around the update so no request mixes two
versions mid-token.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from async_rl.supervisor import NODE_ADDRESS_ENV
from async_rl.trace import Tracer, wall_clock
from rollout_workers.client import EngineClient, EngineConnectionError, EngineError, EngineTimeoutError, PauseMode

if TYPE_CHECKING:
    import torch

    from async_rl.dist_group import WeightUpdateGroup
    from async_rl.trainer.trainer import WeightsExport

log = logging.getLogger("weight_sync")

KEEP_SNAPSHOTS = 2  # the one engines load now, and the previous one a slow engine may still read
GROUP_NAME = "async_rl_weights"
# Bounds the rendezvous and every broadcast: a dead engine then fails the sync instead of hanging it.
GROUP_TIMEOUT_S = 120.0
# Distributed: tensor bytes per flattened broadcast (and per update request); bounds the buffer each side holds.
BUCKET_BYTES = 512 << 20
# Methods that send the live parameters: the trainer must not train while they are sent.
LIVE_METHODS = ("tensor", "distributed")
SYNC_TRACK = "weight-sync"
PHASES = ("pause", "update", "continue")


@contextlib.asynccontextmanager
async def broadcast_group(clients: list[EngineClient], device) -> AsyncIterator[WeightUpdateGroup]:
    """Open the trainer's rank-0 group with every engine (engine i is rank 1 + i); close it on exit.

    Every rank blocks in the rendezvous, so the engines' HTTP joins and the trainer's own join
    (in a thread) must run concurrently. NCCL when the trainer trains on CUDA, gloo otherwise.
    """
    from async_rl.dist_group import destroy, init_weight_update_group
    from rollout_workers.launcher import free_port

    backend = "nccl" if device.type == "cuda" else "gloo"
    # The trainer hosts the group's store on its node's address (loopback on one machine).
    master_address = os.environ.get(NODE_ADDRESS_ENV, "127.0.0.1")
    port, world_size = free_port(master_address), 1 + len(clients)
    async with asyncio.TaskGroup() as joins:
        for rank, client in enumerate(clients, start=1):
            joins.create_task(
                client.init_weights_update_group(
                    master_address,
                    port,
                    rank_offset=rank,
                    world_size=world_size,
                    group_name=GROUP_NAME,
                    backend=backend,
                )
            )
        group = await asyncio.to_thread(
            init_weight_update_group, master_address, port, 0, world_size, backend, GROUP_NAME, GROUP_TIMEOUT_S
        )
    log.info("weight broadcast group %s: %d engine(s) over %s on port %d", GROUP_NAME, len(clients), backend, port)
    try:
        yield group
    finally:
        for client in clients:  # best effort: an engine that is already gone needs no cleanup
            with contextlib.suppress(Exception):
                await client.destroy_weights_update_group(GROUP_NAME, timeout_s=10.0)
        destroy(group)


@dataclasses.dataclass(frozen=True)
class SyncResult:
    """What one sync cost. Each phase is the slowest engine's: the sync waits for all of them."""

    seconds: float  # trainer state -> every engine serving it, the export included
    path: str  # the disk snapshot, or ""
    export_s: float  # taking the snapshot (disk, cuda_ipc) or gathering the tensors: the trainer waits for it
    write_s: float  # disk: writing the snapshot folder, beside training; 0 otherwise
    pause_s: float
    update_s: float
    continue_s: float
    missed: tuple[int, ...] = ()  # engines that could not be reached: they still serve an older version

    def metrics(self) -> dict[str, float]:
        return {
            "weight_sync/engines_missed": float(len(self.missed)),
            "weight_sync/seconds": self.seconds,
            "weight_sync/export_s": self.export_s,
            "weight_sync/write_s": self.write_s,
            "weight_sync/pause_s": self.pause_s,
            "weight_sync/update_s": self.update_s,
            "weight_sync/continue_s": self.continue_s,
        }


async def sync_weights(
    trainer,
    clients: list[EngineClient],
    method: str,
    pause_mode: PauseMode,
    weights_dir: Path,
    group: WeightUpdateGroup | None = None,
    tracer: Tracer | None = None,
    *,
    timeout_s: float | None = None,
) -> SyncResult:
    """Export the trainer's weights, then load them into every engine (`export_weights`, `load_weights`)."""
    export = await export_weights(trainer, method, weights_dir, tracer)
    return await load_weights(export, clients, method, pause_mode, weights_dir, group, tracer, timeout_s=timeout_s)


@dataclasses.dataclass(frozen=True)
class SyncExport:
    # tensor, distributed: the live parameters (do not train meanwhile); cuda_ipc: a device snapshot; disk: none
    weights: WeightsExport
    seconds: float  # the export itself
    started: float  # perf_counter and wall clock at its start: a sync lasts from there to the last engine
    started_wall: float
    written: asyncio.Task[float] | None  # disk: writing the snapshot folder (its seconds), begun at export


async def export_weights(trainer, method: str, weights_dir: Path, tracer: Tracer | None = None) -> SyncExport:
    """The trainer's weights in the form `method` sends. Once this returns, a disk export is a
    snapshot (on the trainer's device or host) whose folder is being written: the trainer may train
    on meanwhile, and the engines load it once written (load_weights waits for that). The snapshot's
    tensors are let go once written, so only a write in flight holds one. A cuda_ipc export is a
    complete device snapshot the trainer may train beside; the engines read it until they are loaded."""
    tracer = tracer or Tracer(None)
    started_wall, started = wall_clock(), time.perf_counter()
    span = "gather weights" if method in LIVE_METHODS else "snapshot weights"
    with tracer.span(span, SYNC_TRACK, version=trainer.version):
        export = await asyncio.to_thread(trainer.export_weights, method, weights_dir)
    written = None
    if method == "disk":
        written = asyncio.create_task(_write(functools.partial(trainer.write_export, export), export.version, tracer))
        export = export._replace(tensors={})
    return SyncExport(export, time.perf_counter() - started, started, started_wall, written)


async def _write(write: Callable[[], object], version: int, tracer: Tracer) -> float:
    seconds = {"write snapshot": 0.0}
    with _phase(tracer, "write snapshot", SYNC_TRACK, seconds, version=version):
        await asyncio.to_thread(write)
    return seconds["write snapshot"]


async def load_weights(
    export: SyncExport,
    clients: list[EngineClient],
    method: str,
    pause_mode: PauseMode,
    weights_dir: Path,
    group: WeightUpdateGroup | None = None,
    tracer: Tracer | None = None,
    *,
    timeout_s: float | None = None,
) -> SyncResult:
    """Once a disk export's folder is written, pause (pause_mode) -> update -> continue on every engine at once.

    `group` is the open broadcast_group, required by method distributed. Updates never ask the engine
    to flush its cache: SGLang asserts that a flush after an update succeeds, and with requests paused
    (retract, in_place) it cannot, so the server exits. Retracted and in-place requests therefore go
    on from KV computed by the old weights (what those modes mean); in abort mode nothing is left
    running, and the cache is flushed by a separate /flush_cache, which at worst answers 400.

    An engine that cannot be reached (dead, or restarting under the supervisor) misses this
    version instead of failing the sync (disk and tensor; a broadcast needs every rank): the
    workers route to it again only once it serves the trainer's version, and the next sync
    updates it. Each call to an engine (pause, update, continue) has the deadline `timeout_s` (the
    client's default if None); a missed deadline names the engine.
    """
    tracer = tracer or Tracer(None)
    version, path, tensors = export.weights
    write_s = await export.written if export.written is not None else 0.0
    send = None
    if method == "disk":
        update = lambda client: client.update_weights_from_disk(  # noqa: E731
            path, flush_cache=False, weight_version=str(version), timeout_s=timeout_s
        )
    elif method == "tensor":
        update = lambda client: client.update_weights_from_tensor(  # noqa: E731
            tensors, flush_cache=False, weight_version=str(version), timeout_s=timeout_s
        )
    elif method == "cuda_ipc":
        update = lambda client: client.update_weights_from_tensor(  # noqa: E731
            tensors, payload="cuda_ipc", flush_cache=False, weight_version=str(version), timeout_s=timeout_s
        )
    elif method == "distributed":
        if group is None:
            raise ValueError("weight_sync.method=distributed needs the open broadcast_group")
        buckets = flattened_buckets(tensors, BUCKET_BYTES)

        async def update(client: EngineClient) -> None:
            for index, names in enumerate(buckets):
                last = index == len(buckets) - 1  # the version comes with the last bucket, once every tensor is in
                await client.update_weights_from_distributed(
                    names,
                    [tensors[n].dtype for n in names],
                    [list(tensors[n].shape) for n in names],
                    group_name=GROUP_NAME,
                    flush_cache=False,
                    weight_version=str(version) if last else None,
                    load_format="flattened_bucket",
                    timeout_s=timeout_s,
                )

        send = lambda: _broadcast_buckets(group, tensors, buckets)  # noqa: E731
    else:
        raise ValueError(f"weight_sync.method={method!r} is not supported (use disk, tensor, distributed or cuda_ipc)")

    phases = [dict.fromkeys(PHASES, 0.0) for _ in clients]

    async def one(index: int, client: EngineClient) -> None:
        track, seconds = f"{SYNC_TRACK} engine-{index}", phases[index]
        with _phase(tracer, "pause", track, seconds, mode=pause_mode, version=version):
            await client.pause(pause_mode, timeout_s=timeout_s)
        try:
            with _phase(tracer, "update", track, seconds, method=method, version=version):
                await update(client)
                if pause_mode == "abort":
                    await _flush_prefix_cache(client)
        finally:
            with _phase(tracer, "continue", track, seconds, version=version):
                await client.continue_generation(timeout_s=timeout_s)

    missed: list[int] = []

    async def reachable(index: int, client: EngineClient) -> None:
        try:
            await one(index, client)
        except (EngineConnectionError, EngineTimeoutError) as exc:
            if method == "distributed":  # every rank of the broadcast must take part
                raise RuntimeError(f"weight sync of version {version} to engine {index} ({client.url}): {exc}") from exc
            log.warning("engine %d (%s) missed version %d: %s", index, client.url, version, exc)
            missed.append(index)

    async with asyncio.TaskGroup() as tasks:
        for index, client in enumerate(clients):
            tasks.create_task(reachable(index, client))
        if send is not None:  # the engines receive, in `names` order, while their update calls are in flight
            tasks.create_task(asyncio.to_thread(send))
    if method == "disk":
        _prune_snapshots(weights_dir, version)
    elapsed = time.perf_counter() - export.started
    tracer.complete(
        "weight sync",
        SYNC_TRACK,
        export.started_wall,
        export.started_wall + elapsed,
        version=version,
        method=method,
        pause_mode=pause_mode,
        engines=len(clients),
    )
    slowest = {name: max((p[name] for p in phases), default=0.0) for name in PHASES}
    return SyncResult(
        seconds=elapsed,
        path=path,
        export_s=export.seconds,
        write_s=write_s,
        pause_s=slowest["pause"],
        update_s=slowest["update"],
        continue_s=slowest["continue"],
        missed=tuple(sorted(missed)),
    )


async def _flush_prefix_cache(client: EngineClient) -> None:
    """Resumed partials must not reuse prefix KV of the old weights; a refused flush (a request
    slipped in) only costs that reuse, so it is logged, not raised."""
    try:
        await client.flush_cache()
    except EngineError as exc:
        log.warning("%s kept its prefix cache after the update: %s", client.url, exc.message)


@contextlib.contextmanager
def _phase(tracer: Tracer, name: str, track: str, seconds: dict[str, float], **args) -> Iterator[None]:
    """Time one engine's phase into `seconds[name]` and the trace (a failed phase is recorded too)."""
    start_wall, start = wall_clock(), time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = time.perf_counter() - start
        tracer.complete(name, track, start_wall, start_wall + seconds[name], **args)


def flattened_buckets(tensors: Mapping[str, torch.Tensor], limit: int) -> list[list[str]]:
    """Names in order, cut into buckets of at most `limit` bytes (a larger tensor alone in its own);
    a tensor whose bytes would start at an offset that is no multiple of its element size starts a
    new bucket, as the receiver views each tensor in place."""
    buckets: list[list[str]] = []
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if not buckets or (buckets[-1] and size + nbytes > limit) or size % tensor.element_size():
            buckets.append([])
            size = 0
        buckets[-1].append(name)
        size += nbytes
    return buckets


def _broadcast_buckets(group: WeightUpdateGroup, tensors: Mapping[str, torch.Tensor], buckets: list[list[str]]) -> None:
    from async_rl.dist_group import broadcast_flattened

    for names in buckets:
        broadcast_flattened(group, [tensors[name] for name in names])


def _prune_snapshots(weights_dir: Path, version: int) -> None:
    for folder in weights_dir.glob("v*"):
        suffix = folder.name[1:]
        if suffix.isdigit() and int(suffix) <= version - KEEP_SNAPSHOTS:
            shutil.rmtree(folder, ignore_errors=True)
