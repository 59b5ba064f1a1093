"""Reshaping the running batch's KV cache when rows join or leave.

transformers' DynamicCache holds one (batch, heads, length, dim) tensor pair per
layer; the batch shares one left-padded length. A padded column is masked out by
the caller's attention mask, so joining only needs left-padding with zeros and
leaving only needs an index select. (A preallocated, in-place-growing layer was
measured no faster on CPU: SDPA then reads strided views.)
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def new_cache() -> DynamicCache:
    return DynamicCache()


def select_rows(cache: DynamicCache, rows: torch.Tensor, first_column: int) -> None:
    """Keep batch rows `rows` and columns from `first_column` on (dropping padding nobody needs)."""
    for layer in cache.layers:
        layer.keys = layer.keys[rows, :, first_column:]
        layer.values = layer.values[rows, :, first_column:]


def merge(cache: DynamicCache, other: DynamicCache) -> None:
    """Append `other`'s rows to `cache`, left-padding the shorter one with zeros."""
    for layer, extra in zip(cache.layers, other.layers, strict=True):
        length = max(layer.keys.shape[-2], extra.keys.shape[-2])
        layer.keys = torch.cat([_left_pad(layer.keys, length), _left_pad(extra.keys, length)])
        layer.values = torch.cat([_left_pad(layer.values, length), _left_pad(extra.values, length)])


def _left_pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - tensor.shape[-2]
    return torch.nn.functional.pad(tensor, (0, 0, missing, 0)) if missing else tensor
