"""A private process group for broadcasting weights from the trainer to engines.

Built from its own TCPStore and a ProcessGroupGloo/ProcessGroupNCCL object rather
than the default process group, which the trainer may already use for FSDP.
The trainer is rank 0 (it hosts the store); engine k joins as rank `rank_offset`.
The same module runs on both sides, so the rendezvous can never disagree.
"""

from __future__ import annotations

import datetime
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
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_address, master_port, world_size, rank == 0, timeout=timeout, wait_for_workers=True)
    prefixed = dist.PrefixStore(group_name, store)
    if backend == "gloo":
        process_group = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    else:
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        process_group = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
    # A first collective completes the rendezvous, so the call returns only when every rank is connected.
    probe = torch.zeros(1, device=_device_for(backend))
    broadcast_raw(process_group, probe, 0)
    return WeightUpdateGroup(group_name, rank, world_size, backend, process_group, store)


def broadcast(group: WeightUpdateGroup, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In place: rank `src` sends `tensor`, every other rank receives into it."""
    broadcast_raw(group.process_group, tensor, src)
    return tensor


def broadcast_raw(process_group, tensor: torch.Tensor, src: int) -> None:
    options = dist.BroadcastOptions()
    options.rootRank = src
    process_group.broadcast([tensor], options).wait()


def destroy(group: WeightUpdateGroup) -> None:
    shutdown = getattr(group.process_group, "shutdown", None)
    if shutdown is not None:
        shutdown()


def _device_for(backend: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def torch_dtype_from_name(name: str) -> torch.dtype:
    """'bfloat16' and 'torch.bfloat16' both work: senders stringify dtypes either way."""
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype
