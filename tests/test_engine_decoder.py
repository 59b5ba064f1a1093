"""The embedded engine's forward pass and slot cache, driven directly on CPU: a decode step padded to a
graph's bucket (padding rows writing to the scratch slot) gives the live rows' logits unchanged, and
the cache keeps rows across growth and moves."""

from __future__ import annotations

import copy

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


def test_fused_projections_follow_weight_updates_and_moves(model):
    """The fused Q/K/V and gate/up tensors are the model's parameters: a state-dict update lands in them,
    and after the parameters are replaced (what moving the model between devices does) reset binds anew."""
    model = copy.deepcopy(model)
    prompt = [5, 6, 7, 8]

    def decoded_equals_full_forward(decoder: Decoder) -> bool:
        decoder.reset()
        with torch.inference_mode():
            decoder.prefill(torch.tensor([prompt[:-1]]), 0, 0)
            step = decoder.decode(torch.tensor(prompt[-1:]), torch.tensor([len(prompt) - 1]), len(prompt))
            full = model(torch.tensor([prompt])).logits[:, -1]
        return torch.allclose(step, full, atol=1e-4)

    decoder = Decoder(model, torch.device("cpu"))
    assert decoded_equals_full_forward(decoder)
    state = model.state_dict()
    generator = torch.Generator().manual_seed(1)
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        with torch.no_grad():
            state[name].copy_(torch.randn(state[name].shape, generator=generator))
    k_rows = slice(decoder.heads * decoder.head_dim, (decoder.heads + decoder.kv_heads) * decoder.head_dim)
    assert torch.equal(decoder.layers[0].qkv_weight[k_rows], state["model.layers.0.self_attn.k_proj.weight"])
    assert decoded_equals_full_forward(decoder)
    model._apply(lambda tensor: tensor.clone())  # new tensors for every parameter, as .to(device) makes
    assert not decoder.layers[0].is_bound()
    assert decoded_equals_full_forward(decoder)
    assert all(fused.is_bound() for fused in decoder.layers)
