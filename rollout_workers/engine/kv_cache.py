"""The running batch's KV cache: one preallocated slot per row, written in place.

Row i of the running batch keeps its keys and values in slot i of every layer's
(slots, kv_heads, length, head_dim) tensors, so a decode step reads the first B slots as a
view and writes one column per row: nothing is re-padded or concatenated. A row that
leaves is replaced by the batch's last row (one slot copied), which keeps the rows
contiguous. The last slot is scratch, where the padding rows of a CUDA graph write.
Capacity grows by whole buckets (so a graph's shapes stay valid until the next growth).
"""

from __future__ import annotations

import torch

# Rows a captured decode step is padded to; beyond the last one rows grow by 32.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)
MIN_LENGTH = 64


def batch_bucket(rows: int) -> int:
    for bucket in BATCH_BUCKETS:
        if rows <= bucket:
            return bucket
    return -(-rows // 32) * 32


def length_bucket(tokens: int) -> int:
    """Powers of two from MIN_LENGTH: attention reads at most twice the live columns."""
    bucket = MIN_LENGTH
    while bucket < tokens:
        bucket *= 2
    return bucket


def column_bucket(tokens: int) -> int:
    """Columns a captured decode step attends over: eighths of the power of two above `tokens`
    (from MIN_LENGTH), so attention reads at most a quarter more than the live columns, with four
    graphs per doubling."""
    step = max(MIN_LENGTH, length_bucket(tokens) // 8)
    return -(-tokens // step) * step


class SlotCache:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.shape = (kv_heads, head_dim)
        self.layers = layers
        self.dtype, self.device = dtype, device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.slots = 0  # usable slots; slot `self.slots` is scratch
        self.length = 0
        self.generation = 0  # bumped at every reallocation: graphs captured on older tensors are stale

    @property
    def scratch(self) -> int:
        return self.slots

    def reserve(self, slots: int, length: int) -> None:
        """Room for `slots` rows of `length` tokens each, keeping the rows already stored."""
        if slots <= self.slots and length <= self.length:
            return
        slots, length = max(batch_bucket(slots), self.slots), max(length_bucket(length), self.length)
        kv_heads, head_dim = self.shape
        kept = self.slots

        def grown(old: torch.Tensor | None) -> torch.Tensor:
            fresh = torch.zeros((slots + 1, kv_heads, length, head_dim), dtype=self.dtype, device=self.device)
            if old is not None:
                fresh[:kept, :, : old.shape[2]] = old[:kept]
            return fresh

        old_keys = self.keys or [None] * self.layers
        old_values = self.values or [None] * self.layers
        self.keys = [grown(old) for old in old_keys]
        self.values = [grown(old) for old in old_values]
        self.slots, self.length = slots, length
        self.generation += 1

    def move(self, source: list[int], target: list[int], length: int) -> None:
        """Copy the first `length` columns of slots `source` into slots `target` (disjoint)."""
        src = torch.tensor(source, device=self.device)
        dst = torch.tensor(target, device=self.device)
        for tensor in (*self.keys, *self.values):
            tensor[dst, :, :length] = tensor[src, :, :length]

    def clear(self) -> None:
        """Free the tensors (release_memory_occupation; a flush keeps them: slots hold no shared prefix)."""
        self.keys, self.values = [], []
        self.slots = self.length = 0
        self.generation += 1
