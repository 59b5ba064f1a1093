"""The embedded engine's forward pass and slot cache, driven directly on CPU: a decode step padded to a
graph's bucket (padding rows writing to the scratch slot) gives the live rows' logits unchanged, and
the cache keeps rows across growth and moves."""

from __future__ import annotations

import pytest
import torch

from rollout_workers.engine.decoder import Decoder, unsupported
from rollout_workers.engine.kv_cache import SlotCache, batch_bucket, length_bucket
from rollout_workers.engine.model import create_tiny_model, load_model, tiny_config


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = create_tiny_model(tmp_path_factory.mktemp("m") / "gqa", "qwen2", hidden_size=64, num_key_value_heads=2)
    return load_model(folder).model


def prefilled(model, prompts: list[list[int]]) -> Decoder:
    decoder = Decoder(model, torch.device("cpu"))
    for slot, prompt in enumerate(prompts):
        decoder.prefill(torch.tensor([prompt]), slot, 0)
    return decoder


def test_padded_decode_step_leaves_live_rows_unchanged(model):
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    positions = torch.tensor([len(p) for p in prompts])
    tokens = torch.tensor([20, 21, 22])
    with torch.inference_mode():
        exact = prefilled(model, prompts).decode(tokens, positions, int(positions.max()) + 1)
        decoder = prefilled(model, prompts)
        bucket = batch_bucket(3)
        decoder.cache.reserve(bucket, length_bucket(8))
        padding = bucket - 3
        padded = decoder.decode_step(
            torch.cat([tokens, torch.zeros(padding, dtype=torch.long)]),
            torch.cat([positions, torch.zeros(padding, dtype=torch.long)]),
            torch.tensor([0, 1, 2] + [decoder.cache.scratch] * padding),
            decoder.cache.length,
        )
    assert torch.allclose(padded[:3], exact, atol=1e-5)


def test_slot_cache_keeps_rows_across_growth_and_moves():
    cache = SlotCache(layers=2, kv_heads=1, head_dim=4, dtype=torch.float32, device=torch.device("cpu"))
    cache.reserve(2, 10)
    assert (cache.slots, cache.length) == (2, 64)
    for layer in range(2):
        cache.keys[layer][:2, :, :10] = torch.arange(2 * 40, dtype=torch.float32).view(2, 1, 10, 4) + layer
    before = [k[:2, :, :10].clone() for k in cache.keys]
    generation = cache.generation
    cache.reserve(5, 100)
    assert (cache.slots, cache.length, cache.generation) == (8, 128, generation + 1)
    assert all(torch.equal(k[:2, :, :10], b) for k, b in zip(cache.keys, before, strict=True))
    cache.move([1], [4], 10)
    assert all(torch.equal(k[4, :, :10], b[1]) for k, b in zip(cache.keys, before, strict=True))


def test_models_the_decoder_cannot_run_are_named():
    assert unsupported(tiny_config("llama")) is None
    assert "sliding-window" in unsupported(tiny_config("qwen2", use_sliding_window=True))
    config = tiny_config("llama")
    config.model_type = "gpt2"
    assert "gpt2" in unsupported(config)
