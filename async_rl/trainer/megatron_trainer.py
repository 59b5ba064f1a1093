"""The megatron-core trainer backend (trainer.backend = "megatron"): a GPTModel built from the HF
config (local layer spec: no TransformerEngine), HF weights converted in at start and back out for
every sync. Only the model, optimizer, gradient step and checkpoint format differ from the torch
backend: the batch, losses, advantages and metrics are Trainer's own code.

Tensor parallelism (trainer.megatron.tensor_parallel) splits every layer over that many ranks of
trainer.processes; the rest is data parallel (megatron's DDP, optionally its distributed optimizer).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from async_rl.logprobs import chunked_logprobs
from async_rl.trainer.batch import PaddedBatch
from async_rl.trainer.config import TrainerConfig, TrainerContext, megatron_unavailable
from async_rl.trainer.distributed import init_distributed
from async_rl.trainer.megatron_convert import check_parallel_sizes, layout_of
from async_rl.trainer.megatron_model import hf_tensors, load_gpt, transformer_config
from async_rl.trainer.trainer import Trainer, seed_everything

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel

_CHECKPOINT = "megatron"  # dist-checkpointing folder of model + optimizer, in the checkpoint's state dir


class MegatronTrainer(Trainer):
    def __init__(self, config: TrainerConfig, context: TrainerContext, *, weights_from: str | Path | None = None):
        from megatron.core import parallel_state
        from transformers import AutoConfig, GenerationConfig

        self.config, self.context = config, context
        self.rank, self.world_size, self.device = init_distributed(context.device)
        problem = megatron_unavailable(str(self.device), check_cuda=True)
        if problem:
            raise RuntimeError(problem)
        if not dist.is_initialized():  # megatron's parallel state lives in torch.distributed groups
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        tensor_parallel = config.megatron.tensor_parallel
        if not parallel_state.model_parallel_is_initialized():  # once per process (resume builds a second trainer)
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel)
        elif parallel_state.get_tensor_model_parallel_world_size() != tensor_parallel:
            raise RuntimeError("this process's megatron parallel state has another tensor_parallel size")
        self.tp_rank, self.tp_size = parallel_state.get_tensor_model_parallel_rank(), tensor_parallel
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_group = parallel_state.get_data_parallel_group()
        seed_everything(config.seed + self.dp_rank)
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(config.seed)

        self.weights_path = Path(weights_from or context.model_path)
        self.hf_config = AutoConfig.from_pretrained(self.weights_path)
        self.generation_config = (
            GenerationConfig.from_pretrained(self.weights_path)
            if (self.weights_path / "generation_config.json").is_file()
            else None
        )
        self.layout = layout_of(self.hf_config)
        check_parallel_sizes(self.layout, tensor_parallel)
        self.vocab_size = self.layout.vocab
        self.compute_dtype = torch.bfloat16 if context.compute_dtype == "bfloat16" else torch.float32
        self.transformer_config = transformer_config(
            self.hf_config, tensor_parallel, self.compute_dtype, recompute=config.gradient_checkpointing
        )
        self.model = self._wrap_ddp(self._load_gpt(self.weights_path))
        self.reference = None
        if config.loss.kl_coef > 0:
            self.reference = self._load_gpt(Path(context.model_path)).requires_grad_(False)
        self.optimizer = self._build_optimizer()
        self.version = 0

    # ----------------------------------------------------------------- model

    def _load_gpt(self, folder: Path) -> GPTModel:
        model = load_gpt(folder, self.transformer_config, self.hf_config, self.tp_size, self.tp_rank)
        return model.to(device=self.device, dtype=self.compute_dtype)

    def _wrap_ddp(self, model: GPTModel) -> Any:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=self.config.megatron.distributed_optimizer
        )
        return DistributedDataParallel(self.transformer_config, ddp_config, model)

    def _build_optimizer(self) -> Any:
        """megatron's AdamW (decoupled weight decay) with float32 master weights; clipping is ours
        (_apply_gradients), so a non-finite gradient skips the update as in the torch backend."""
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        c = self.config
        optimizer_config = OptimizerConfig(
            optimizer="adam",
            lr=self.lr_at(0),
            weight_decay=c.weight_decay,
            adam_beta1=c.adam_betas[0],
            adam_beta2=c.adam_betas[1],
            adam_eps=c.adam_eps,
            clip_grad=c.max_grad_norm,
            bf16=self.compute_dtype == torch.bfloat16,
            params_dtype=self.compute_dtype,
            use_distributed_optimizer=c.megatron.distributed_optimizer,
        )
        return get_megatron_optimizer(optimizer_config, [self.model])

    # ----------------------------------------------------------------- training

    def _token_logprobs(self, model: torch.nn.Module, part: PaddedBatch) -> torch.Tensor:
        """Causal attention over right-padded rows (padding never precedes a real token); the LM
        head is swapped for chunked vocab-parallel logprobs, as the torch backend does with HF's."""
        gpt = getattr(model, "module", model)
        head = gpt.output_layer
        input_ids = part.input_ids
        length = input_ids.shape[1]
        targets = input_ids[:, 1:].t().reshape(-1)  # megatron's hidden states are [sequence, batch, hidden]
        temperature = self.context.logprob_temperature

        def per_chunk(hidden: torch.Tensor, chunk_targets: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
            from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

            logits, _ = type(head).forward(head, hidden.unsqueeze(1), weight=weight, runtime_gather_output=False)
            logits = logits.squeeze(1).float()
            if temperature != 1.0:
                logits = logits / temperature
            return -vocab_parallel_cross_entropy(logits, chunk_targets)

        def logprobs_head(hidden: torch.Tensor, weight: torch.Tensor | None = None, **_: Any) -> tuple:
            flat = hidden[:-1].reshape(-1, hidden.shape[-1])
            run = functools.partial(per_chunk, weight=weight)
            logprobs = chunked_logprobs(flat, targets, self.config.logprob_chunk_tokens, run)
            return logprobs.view(length - 1, -1), None  # GPTModel returns it transposed: [batch, L-1]

        positions = torch.arange(length, device=input_ids.device).unsqueeze(0).expand_as(input_ids)
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).triu(1)[None, None]
        head.forward = logprobs_head  # an instance attribute, deleted below
        try:
            return model(input_ids, positions, causal)
        finally:
            del head.forward

    def _apply_gradients(self, loss_finite: bool) -> float:
        self.model.finish_grad_sync()
        optimizer = self.optimizer
        optimizer.prepare_grads()
        # As in the torch backend: the norm before clipping decides, and clipped non-finite gradients
        # are cleared unused.
        grad_norm = float(optimizer.clip_grad_norm(self.config.max_grad_norm))
        if loss_finite and math.isfinite(grad_norm):
            optimizer.step_with_ready_grads()
        self.model.zero_grad_buffer()
        optimizer.zero_grad()
        return grad_norm

    # ----------------------------------------------------------------- weights

    def named_tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor): a collective over the tensor-parallel group."""
        for name, tensor in hf_tensors(self.model.module, self.layout, self.tp_size).items():
            yield name, tensor if dtype is None else tensor.to(dtype)

    def _own_state(self) -> dict[str, torch.Tensor]:
        return dict(self.named_tensors())

    def _hf_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        state = {name: tensor.to("cpu", dtype, copy=True) for name, tensor in self.named_tensors()}
        return state if self.rank == 0 else {}

    # ----------------------------------------------------------------- checkpoints

    def _sharded_state(self, *, is_loading: bool) -> dict[str, Any]:
        """What dist-checkpointing saves, or the template it loads into (with the optimizer's state
        initialised, which a fresh optimizer does not have yet)."""
        model_state = self.model.module.sharded_state_dict()
        # megatron-LM's default format for the distributed optimizer (its older default,
        # fully_sharded_model_space, is refused by 0.16's dist-checkpointing).
        metadata = {"distrib_optim_sharding_type": "dp_reshardable"}
        optimizer_state = self.optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=metadata)
        return {"model": model_state, "optimizer": optimizer_state}

    def _save_optimizer(self, state_dir: Path) -> None:
        """Model and optimizer (float32 master weights included) with megatron's dist-checkpointing:
        every rank writes its shards; another data-parallel size can load them."""
        from megatron.core import dist_checkpointing

        folder = state_dir / _CHECKPOINT
        if self.rank == 0:
            folder.mkdir()
        self._barrier()
        dist_checkpointing.save(self._sharded_state(is_loading=False), str(folder))

    def _load_optimizer(self, state_dir: Path) -> None:
        from megatron.core import dist_checkpointing

        inner = self.optimizer.optimizer
        if not inner.state:
            # Without TransformerEngine or Apex, megatron's distributed optimizer reads every state's
            # "step" to build even the loading template, and a fresh torch AdamW has no state yet (its
            # assert fails): give it AdamW's own initial state, which the load then overwrites.
            for group in inner.param_groups:
                for param in group["params"]:
                    inner.state[param] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(param),
                        "exp_avg_sq": torch.zeros_like(param),
                    }
        state = dist_checkpointing.load(self._sharded_state(is_loading=True), str(state_dir / _CHECKPOINT))
        self.model.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
