"""Data parallelism with FSDP2 (torch.distributed.fsdp.fully_shard) when launched by torchrun.

Every rank receives the same trajectory list and trains on rows rank::world;
loss normalisers are computed over the whole list, so the sharded sum equals
the single-process loss (FSDP2 averages gradients, hence `grad_scale`).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def init_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); joins the process group torchrun describes, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and device != "cpu" else "gloo")
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = 0, 1
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    return rank, world_size, torch.device(device)


def shard_units(model: torch.nn.Module) -> list[str]:
    """Names of the submodules sharded on their own: the HF model's `_no_split_modules` blocks
    (its decoder layers); the root takes the rest (embeddings, final norm, lm_head)."""
    block_types = set(getattr(model, "_no_split_modules", None) or [])
    return [name for name, module in model.named_modules() if type(module).__name__ in block_types]


def shard_model(model: torch.nn.Module, compute_dtype: torch.dtype) -> torch.nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    units = shard_units(model)
    if not units:
        raise ValueError(f"{type(model).__name__} declares no _no_split_modules to shard by")
    for name in units:
        fully_shard(model.get_submodule(name), mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for sharded parameters)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def broadcast_bytes(payload: bytes | None, device: torch.device) -> bytes:
    """Rank 0's `payload` on every rank (others pass None): a length, then the bytes as uint8."""
    length = torch.tensor([len(payload) if payload is not None else 0], dtype=torch.long, device=device)
    dist.broadcast(length, src=0)
    data = (
        torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
        if payload
        else torch.empty(int(length), dtype=torch.uint8, device=device)
    )
    if int(length):
        dist.broadcast(data, src=0)
    return data.cpu().numpy().tobytes()


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """In place over `group` (None: every rank)."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor
