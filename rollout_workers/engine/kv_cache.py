"""Reshaping the running batch's KV cache when rows join or leave.

transformers' DynamicCache holds one (batch, heads, length, dim) tensor pair per
layer; the batch shares one left-padded length. A padded column is masked out by
the caller's attention mask, so joining only needs left-padding with zeros and
leaving only needs an index select. (A preallocated, in-place-growing layer was
measured no faster on CPU: SDPA then reads strided views.)
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import DynamicCache
from transformers.cache_utils import CacheLayerMixin


def new_cache() -> DynamicCache:
    return DynamicCache()


def select_rows(cache: DynamicCache, rows: torch.Tensor, first_column: int) -> None:
    """Keep batch rows `rows` and columns from `first_column` on (dropping padding nobody needs)."""
    for layer, keys, values in _filled_layers(cache):
        layer.keys = keys[rows, :, first_column:]
        layer.values = values[rows, :, first_column:]


def merge(cache: DynamicCache, other: DynamicCache) -> None:
    """Append `other`'s rows to `cache`, left-padding the shorter one with zeros."""
    for (layer, keys, values), (_, extra_keys, extra_values) in zip(
        _filled_layers(cache), _filled_layers(other), strict=True
    ):
        length = max(keys.shape[-2], extra_keys.shape[-2])
        layer.keys = torch.cat([_left_pad(keys, length), _left_pad(extra_keys, length)])
        layer.values = torch.cat([_left_pad(values, length), _left_pad(extra_values, length)])


def _filled_layers(cache: DynamicCache) -> Iterator[tuple[CacheLayerMixin, torch.Tensor, torch.Tensor]]:
    """Each layer with its keys and values: a DynamicCache made without a model config holds one
    attention layer per model layer, all filled once the batch's prefill has run."""
    for layer in cache.layers:
        assert isinstance(layer, CacheLayerMixin) and layer.keys is not None and layer.values is not None
        yield layer, layer.keys, layer.values


def _left_pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - tensor.shape[-2]
    return torch.nn.functional.pad(tensor, (0, 0, missing, 0)) if missing else tensor
