"""Model folders: tiny random models with their tokenizer, the model spec strings, SmolLM2 from GGUF."""

from __future__ import annotations

import pytest
import torch

from rollout_workers.engine import model as engine_model
from rollout_workers.engine.model import (
    QWEN2_0_5B,
    create_tiny_model,
    load_model,
    resolve_model_spec,
    save_smollm2,
    tiny_config,
)


@pytest.mark.parametrize("family, model_class", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")])
def test_tiny_model_folder_loads_with_matching_tokenizer(tmp_path, family, model_class):
    path = create_tiny_model(tmp_path / family, family, hidden_size=32, num_layers=2, num_heads=2, seed=3)
    loaded = load_model(path)
    config, tokenizer = loaded.model.config, loaded.tokenizer
    assert type(loaded.model).__name__ == model_class
    assert config.vocab_size == len(tokenizer) and config.hidden_size == 32
    assert config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("</s>")
    assert tokenizer.pad_token == "<pad>" and tokenizer.bos_token == "<s>"
    text = "What is 12*3 + 4/2?\nAnswer: x=-7.5, ok"
    ids = tokenizer.encode(text + "</s>")
    assert len(ids) == len(text) + 1 and ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # Same seed, same weights: folders are reproducible.
    again = load_model(create_tiny_model(tmp_path / "again", family, hidden_size=32, num_layers=2, num_heads=2, seed=3))
    first = loaded.model.state_dict()
    assert all(torch.equal(first[name], tensor) for name, tensor in again.model.state_dict().items())


def test_qwen2_0_5b_shape_and_bf16_load(tmp_path):
    config = tiny_config("qwen2", vocab_size=151936, **QWEN2_0_5B)
    assert (
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.intermediate_size,
        config.vocab_size,
    ) == (896, 24, 14, 2, 4864, 151936)
    loaded = load_model(create_tiny_model(tmp_path / "m", "qwen2"), dtype="bfloat16")
    assert loaded.model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        load_model(tmp_path / "m", dtype="float8")


def test_model_specs(tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNC_RL_MODEL_CACHE", str(tmp_path / "cache"))
    tiny = resolve_model_spec("tiny:qwen2")
    assert (tiny / "config.json").exists() and resolve_model_spec("tiny:qwen2") == tiny
    assert resolve_model_spec(str(tiny)) == tiny
    with pytest.raises(FileNotFoundError, match="tiny:llama"):
        resolve_model_spec(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="family"):
        resolve_model_spec("tiny:gpt5")


@pytest.mark.slow
def test_smollm2_gguf_converts_to_a_safetensors_folder(tmp_path):
    """Q4_1 weights are dequantized by transformers (needs the gguf and accelerate packages)."""
    assert engine_model.smollm2_gguf_path().exists()
    path = save_smollm2(tmp_path / "smollm2")
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    loaded = load_model(path)
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and loaded.model.config.num_hidden_layers == 30
    assert "quantization_config" not in loaded.model.config.to_dict()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = loaded.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = loaded.model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in loaded.tokenizer.decode(output[0, prompt["input_ids"].shape[1] :])
