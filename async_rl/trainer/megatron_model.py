"""megatron-core's GPTModel for an HF Llama/Qwen2 folder: its TransformerConfig, the model holding
one tensor-parallel rank's shard of the HF weights, and the full HF-named weights back out.

Shared by the megatron trainer and the CPU tests (building a GPTModel and loading weights into it
needs no GPU; its forward pass does).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from async_rl.trainer.megatron_convert import (
    Layout,
    hf_to_megatron,
    layout_of,
    megatron_to_hf,
    rope_theta,
    tp_merge,
    tp_shard,
)

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel


def transformer_config(hf_config: Any, tensor_parallel: int, dtype: torch.dtype, *, recompute: bool) -> Any:
    """The TransformerConfig of an HF Llama/Qwen2 config (local layer spec: no fused kernels)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    layout = layout_of(hf_config)
    return TransformerConfig(
        num_layers=layout.layers,
        hidden_size=layout.hidden,
        num_attention_heads=layout.heads,
        num_query_groups=layout.groups,
        kv_channels=layout.head_dim,
        ffn_hidden_size=layout.ffn,
        normalization="RMSNorm",
        layernorm_epsilon=float(hf_config.rms_norm_eps),
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=layout.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tensor_parallel,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=True,  # the HF weights replace the init: no device memory twice
        # Fused kernels come from TransformerEngine or apex, which the local spec does without.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
    )


def load_gpt(folder: Path, config: Any, hf_config: Any, tensor_parallel: int, rank: int) -> GPTModel:
    """A GPTModel (on the host) holding tensor-parallel rank `rank`'s shard of the HF weights in `folder`."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from safetensors.torch import load_file

    layout = layout_of(hf_config)
    model = GPTModel(
        config,
        get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=layout.vocab,
        max_sequence_length=int(hf_config.max_position_embeddings),
        share_embeddings_and_output_weights=layout.tied,
        position_embedding_type="rope",
        rotary_base=int(rope_theta(hf_config)),
    )
    hf: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        hf.update(load_file(file))
    full = hf_to_megatron(hf, layout)
    mine = {name: tp_shard(name, tensor, tensor_parallel, rank) for name, tensor in full.items()}
    missing, unexpected = model.load_state_dict(mine, strict=False)
    missing = [name for name in missing if not name.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not fit the megatron model: missing {missing}, unexpected {unexpected}")
    return model


def hf_tensors(model: torch.nn.Module, layout: Layout, tensor_parallel: int) -> dict[str, torch.Tensor]:
    """The full HF-named weights of a GPTModel: shards gathered over the tensor-parallel group (a
    collective there), QKV and gate/up split back. Views of the parameters where no merge is needed."""
    from megatron.core import parallel_state

    full = {}
    for name, parameter in model.named_parameters():
        shard = parameter.detach()
        if tensor_parallel > 1:
            shards = [torch.empty_like(shard) for _ in range(tensor_parallel)]
            dist.all_gather(shards, shard.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            shard = tp_merge(name, shards)
        full[name] = shard
    return megatron_to_hf(full, layout)
