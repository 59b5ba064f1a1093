"""HF Llama/Qwen2 weights <-> megatron-core GPTModel (local layer spec) weights, and their TP shards.

Pure torch (no megatron import), so CI checks the round trip on CPU. Megatron fuses Q, K and V into
one `linear_qkv` laid out per query group ([q heads of the group, k, v] for each group, so a
contiguous split by tensor-parallel rank keeps whole groups together) and gate and up into one
`linear_fc1` ([gate; up], each split by rank on its own). Megatron's `_extra_state` entries carry
no weights and are not converted.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import torch

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


class Layout(NamedTuple):
    """What the conversion needs of an HF config."""

    layers: int
    hidden: int
    heads: int
    groups: int  # key/value heads
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    qkv_bias: bool


def layout_of(hf_config: Any) -> Layout:
    """The layout of an HF Llama/Qwen2 config; a clear ValueError for what GPTModel's local spec
    does not express (a bias on o_proj or the MLP, rope scaling, sliding-window attention)."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"trainer.backend='megatron' converts {SUPPORTED_MODEL_TYPES} models, not {model_type!r}")
    unsupported = {
        "mlp_bias": bool(getattr(hf_config, "mlp_bias", False)),
        "rope_scaling": _rope_scaling(hf_config) is not None,
        "use_sliding_window": bool(getattr(hf_config, "use_sliding_window", False)),
        "attention_bias": model_type == "llama" and bool(getattr(hf_config, "attention_bias", False)),
    }
    if any(unsupported.values()):
        names = ", ".join(name for name, on in unsupported.items() if on)
        raise ValueError(f"trainer.backend='megatron' does not convert {model_type} models with {names}")
    heads = int(hf_config.num_attention_heads)
    return Layout(
        layers=int(hf_config.num_hidden_layers),
        hidden=int(hf_config.hidden_size),
        heads=heads,
        groups=int(getattr(hf_config, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads),
        ffn=int(hf_config.intermediate_size),
        vocab=int(hf_config.vocab_size),
        tied=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
    )


def _rope_scaling(hf_config: Any) -> dict | None:
    """transformers 5 folds rope_theta into rope_parameters (rope_type 'default' = no scaling)."""
    scaling = getattr(hf_config, "rope_scaling", None) or getattr(hf_config, "rope_parameters", None)
    if not scaling or scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return None
    return scaling


def rope_theta(hf_config: Any) -> float:
    parameters = getattr(hf_config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def check_parallel_sizes(layout: Layout, tensor_parallel: int) -> None:
    """Tensor parallelism splits heads, key/value groups, the MLP and the vocabulary evenly."""
    for what, size in (("attention heads", layout.heads), ("key/value heads", layout.groups),
                       ("intermediate_size", layout.ffn), ("vocab_size", layout.vocab)):  # fmt: skip
        if size % tensor_parallel:
            raise ValueError(f"trainer.megatron.tensor_parallel={tensor_parallel} does not divide {what} ({size})")


# ------------------------------------------------------------------ names

_MCORE_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# One-to-one renames inside a layer (HF suffix -> megatron suffix).
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}
_TOP_RENAMES = {
    "model.embed_tokens.weight": "embedding.word_embeddings.weight",
    "model.norm.weight": "decoder.final_layernorm.weight",
    "lm_head.weight": "output_layer.weight",
}
_TOP_NAMES = frozenset(_TOP_RENAMES.values())


def hf_to_megatron(hf: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """Full (unsharded) megatron state from a full HF state (tied models: no output_layer)."""
    out = {mcore: hf[name] for name, mcore in _TOP_RENAMES.items() if name in hf}
    if layout.tied:
        out.pop("output_layer.weight", None)
    for i in range(layout.layers):
        prefix, mcore = f"model.layers.{i}.", f"decoder.layers.{i}."
        for suffix, target in _LAYER_RENAMES.items():
            out[mcore + target] = hf[prefix + suffix]
        attention = prefix + "self_attn."
        out[mcore + "self_attention.linear_qkv.weight"] = _fuse_qkv(
            [hf[f"{attention}{p}_proj.weight"] for p in "qkv"], layout
        )
        if layout.qkv_bias:
            out[mcore + "self_attention.linear_qkv.bias"] = _fuse_qkv(
                [hf[f"{attention}{p}_proj.bias"] for p in "qkv"], layout
            )
        out[mcore + "mlp.linear_fc1.weight"] = torch.cat(
            [hf[prefix + "mlp.gate_proj.weight"], hf[prefix + "mlp.up_proj.weight"]]
        )
    return out


def megatron_to_hf(mcore: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """Full HF state (tied models: no lm_head, as the engines load them) from a full megatron state."""
    out = {name: mcore[target] for name, target in _TOP_RENAMES.items() if target in mcore}
    back = {target: suffix for suffix, target in _LAYER_RENAMES.items()}
    for name, tensor in mcore.items():
        match = _MCORE_LAYER.match(name)
        if not match:
            if name not in _TOP_NAMES and not name.endswith("_extra_state"):
                raise KeyError(f"megatron weight {name!r} has no HF name")
            continue
        prefix, suffix = f"model.layers.{match[1]}.", match[2]
        if suffix in back:
            out[prefix + back[suffix]] = tensor
        elif suffix.startswith("self_attention.linear_qkv."):
            kind = suffix.rsplit(".", 1)[1]
            for p, part in zip("qkv", _split_qkv(tensor, layout), strict=True):
                out[f"{prefix}self_attn.{p}_proj.{kind}"] = part
        elif suffix == "mlp.linear_fc1.weight":
            out[prefix + "mlp.gate_proj.weight"], out[prefix + "mlp.up_proj.weight"] = tensor.chunk(2)
        elif not suffix.endswith("_extra_state"):
            raise KeyError(f"megatron weight {name!r} has no HF name")
    return out


def _fuse_qkv(qkv: list[torch.Tensor], layout: Layout) -> torch.Tensor:
    q, k, v = qkv
    per_group = layout.heads // layout.groups * layout.head_dim
    rest = q.shape[1:]
    parts = (
        q.reshape(layout.groups, per_group, *rest),
        k.reshape(layout.groups, layout.head_dim, *rest),
        v.reshape(layout.groups, layout.head_dim, *rest),
    )
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def _split_qkv(qkv: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    per_group = layout.heads // layout.groups * layout.head_dim
    rest = qkv.shape[1:]
    grouped = qkv.reshape(layout.groups, per_group + 2 * layout.head_dim, *rest)
    q, k, v = grouped.split([per_group, layout.head_dim, layout.head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


# ------------------------------------------------------------------ tensor-parallel shards


_VOCAB_PARALLEL = ("embedding.word_embeddings.weight", "output_layer.weight")


def _split_dim(name: str) -> int | None:
    """The dimension tensor parallelism splits `name` along; None = replicated."""
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight")) or name in _VOCAB_PARALLEL:
        return 0
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return 1
    return None


def tp_shard(name: str, tensor: torch.Tensor, tensor_parallel: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s shard of full megatron weight `name` (gate and up split on their own)."""
    dim = _split_dim(name)
    if dim is None or tensor_parallel == 1:
        return tensor
    if name.endswith("linear_fc1.weight"):
        gate, up = tensor.chunk(2)
        return torch.cat([gate.chunk(tensor_parallel)[rank], up.chunk(tensor_parallel)[rank]])
    return tensor.chunk(tensor_parallel, dim=dim)[rank]


def tp_merge(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full megatron weight `name` from every rank's shard, in rank order (inverse of tp_shard)."""
    dim = _split_dim(name)
    if dim is None or len(shards) == 1:
        return shards[0]
    if name.endswith("linear_fc1.weight"):
        halves = [shard.chunk(2) for shard in shards]
        return torch.cat([torch.cat([gate for gate, _ in halves]), torch.cat([up for _, up in halves])])
    return torch.cat(shards, dim=dim)
