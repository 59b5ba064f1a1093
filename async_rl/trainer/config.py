"""Trainer configuration (decodes from a recipe's [trainer] table with msgspec.convert)."""

from __future__ import annotations

from typing import Literal

import msgspec

from staleness.config import LossConfig, check_field


class TrainerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Local HF model folder (config.json + safetensors); never a hub id.
    model_path: str
    # Checkpoints go to ckpt_dir/step_{version}/ with ckpt_dir/latest naming the newest; "" = none.
    ckpt_dir: str = ""
    keep_checkpoints: int = 2
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Master weights are float32; "bfloat16" computes forward/backward in bf16 (autocast / FSDP mixed precision).
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0
    lr: float = 1e-6
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    # Decay horizon for linear/cosine; the lr is a function of the version alone, so resume needs no scheduler state.
    total_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    # Optimizer updates per train_step (one version): >1 makes decoupled PPO's proximal policy differ from the current one.
    num_minibatches: int = 1
    # Padded tokens (rows x longest row) per forward; bounds activation memory.
    max_tokens_per_microbatch: int = 16384
    gradient_checkpointing: bool = False
    # Refuse a batch holding a sample staler than this (the staleness bound eta); None = no check.
    max_staleness: int | None = None
    # The rollout temperature: logprobs are of softmax(logits / T), the distribution the engines sampled from.
    logprob_temperature: float = 1.0
    loss: LossConfig = msgspec.field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        check_field(bool(self.model_path), "model_path", self.model_path, "a local HF model folder")
        check_field(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, ">= 1")
        check_field(self.lr >= 0, "lr", self.lr, ">= 0")
        check_field(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0")
        check_field(self.lr_schedule == "constant" or self.total_steps > self.warmup_steps, "total_steps",
                 self.total_steps, f"> warmup_steps for a {self.lr_schedule} schedule")
        check_field(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        check_field(self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm, "> 0")
        check_field(self.num_minibatches >= 1, "num_minibatches", self.num_minibatches, ">= 1")
        check_field(self.max_tokens_per_microbatch >= 1, "max_tokens_per_microbatch", self.max_tokens_per_microbatch, ">= 1")
        check_field(self.max_staleness is None or self.max_staleness >= 0, "max_staleness", self.max_staleness, ">= 0")
        check_field(self.logprob_temperature > 0, "logprob_temperature", self.logprob_temperature, "> 0")
