"""A private process group for broadcasting weights from the trainer to engines.

Not the default process group, which the trainer may already use for FSDP. The trainer is rank 0
(it hosts the store); engine k joins as rank `rank_offset`. The rendezvous is SGLang's own, key for
key: a tcp:// store under a PrefixStore of the group name, then torch's process-group helper (which
adds "<group>/" and "<device>/" prefixes per backend); any other layout never meets an SGLang engine
(measured: the join hangs). No collective runs at set-up: the first broadcast is the first weight.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

BACKENDS = ("gloo", "nccl")


@dataclass
class WeightUpdateGroup:
    name: str
    rank: int
    world_size: int
    backend: str
    process_group: Any
    store: Any  # kept alive: rank 0's store serves the others
    staging: torch.Tensor | None = None  # flattened buckets' buffer, kept: fresh host memory faults in on every sync

    @property
    def device(self) -> torch.device:
        return _device_for(self.backend)


def init_weight_update_group(
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    backend: str = "gloo",
    group_name: str = "weight_update_group",
    timeout_s: float = 300.0,
) -> WeightUpdateGroup:
    """Blocks until all `world_size` ranks have joined (or raises after timeout_s)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    from torch.distributed.distributed_c10d import (
        Backend,
        GroupName,
        PrefixStore,
        _new_process_group_helper,
        _world,
    )
    from torch.distributed.rendezvous import rendezvous

    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world_size = next(
        rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=timeout)
    )
    store.set_timeout(timeout)
    process_group, _ = _new_process_group_helper(
        world_size,
        rank,
        [],
        Backend(backend),
        PrefixStore(group_name, store),
        group_name=GroupName(group_name),
        timeout=timeout,
    )
    _world.pg_group_ranks[process_group] = {i: i for i in range(world_size)}
    return WeightUpdateGroup(group_name, rank, world_size, backend, process_group, store)


def broadcast(group: WeightUpdateGroup, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In place: rank `src` sends `tensor`, every other rank receives into it."""
    broadcast_raw(group.process_group, tensor, src)
    return tensor


def broadcast_raw(process_group, tensor: torch.Tensor, src: int) -> None:
    options = dist.BroadcastOptions()
    options.rootRank = src
    process_group.broadcast([tensor], options).wait()


def broadcast_flattened(group: WeightUpdateGroup, tensors: list[torch.Tensor]) -> None:
    """Rank 0: send `tensors` as one broadcast of their bytes, back to back in order (SGLang's
    load_format "flattened_bucket": one collective instead of one per tensor)."""
    parts = [tensor.detach().to(group.device).contiguous().reshape(-1).view(torch.uint8) for tensor in tensors]
    flat = _staging(group, sum(part.numel() for part in parts))
    torch.cat(parts, out=flat)
    broadcast_raw(group.process_group, flat, 0)


def receive_flattened(
    group: WeightUpdateGroup, dtypes: list[torch.dtype], shapes: list[list[int]]
) -> list[torch.Tensor]:
    """The other ranks: one broadcast_flattened, as views of the group's staging buffer (valid until
    the next receive). Received first, then checked, as SGLang does: the group stays in step either way."""
    sizes = [math.prod(shape) * dtype.itemsize for dtype, shape in zip(dtypes, shapes)]
    flat = _staging(group, sum(sizes))
    broadcast_raw(group.process_group, flat, 0)
    views, offset = [], 0
    for index, (dtype, shape, size) in enumerate(zip(dtypes, shapes, sizes)):
        if offset % dtype.itemsize:
            raise ValueError(
                f"flattened bucket: tensor {index} starts at byte {offset}, no multiple of its element size "
                f"{dtype.itemsize} (the sender must start a new bucket there)"
            )
        views.append(flat[offset : offset + size].view(dtype).reshape(shape))
        offset += size
    return views


def _staging(group: WeightUpdateGroup, nbytes: int) -> torch.Tensor:
    if group.staging is None or group.staging.numel() < nbytes:
        group.staging = None  # the old buffer goes before the larger one is allocated
        group.staging = torch.empty(nbytes, dtype=torch.uint8, device=group.device)
    return group.staging[:nbytes]


def destroy(group: WeightUpdateGroup) -> None:
    group.staging = None
    dist.destroy_process_group(group.process_group)


def _device_for(backend: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def torch_dtype_from_name(name: str) -> torch.dtype:
    """'bfloat16' and 'torch.bfloat16' both work: senders stringify dtypes either way."""
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype
