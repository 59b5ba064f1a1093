"""The trainer's settings: a recipe's [trainer] and [trainer.loss] tables, and what the run decides.

`TrainerConfig` is what a user writes and the trainer reads, one class for both; `TrainerContext`
holds what no recipe sets because the run derives it (the model folder, the resolved device, the
staleness bound from [staleness], the rollout temperature). Torch-free: config loading imports it.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import msgspec

from async_rl.checks import check_device, check_field

Correction = Literal["decoupled_ppo", "tis", "none"]
Aggregation = Literal["token_mean", "seq_mean_token_mean"]


class LossConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """[trainer.loss] Policy objective and off-policy correction (async_rl/trainer/loss.py)."""

    correction: Correction = "decoupled_ppo"
    """decoupled_ppo (AReaL; with is_mode truncate also verl/slime's PPO + TIS) | tis | none (PPO vs behaviour)."""
    clip_eps: float = 0.2
    """PPO clip range: ratios outside [1 - eps, 1 + eps] get no gradient."""
    clip_eps_high: float | None = None
    """Upper clip bound 1 + clip_eps_high (DAPO "clip-higher"); None = symmetric."""
    dual_clip_c: float | None = None
    """Dual-clip constant c > 1 bounding the loss of negative-advantage tokens; None = off."""
    is_cap: float = 5.0
    """Cap C on the behaviour importance weight pi_prox / pi_behav."""
    is_mode: Literal["truncate", "mask"] = "truncate"
    """truncate: w = min(w, C) (TIS); mask: tokens with w > C get weight 0 (AReaL)."""
    aggregation: Aggregation = "token_mean"
    """How token losses become one number: over all tokens, or per sequence then over sequences."""
    adv_std_norm: bool = True
    """GRPO advantages (r - mean_group) / (std_group + eps); False = Dr.GRPO (no std division)."""
    adv_eps: float = 1e-6
    """The eps of the advantage normalisation."""
    kl_coef: float = 0.0
    """KL(current || initial policy) penalty, k3 estimator; 0 = no reference model is kept."""

    def __post_init__(self) -> None:
        check_field(self.clip_eps > 0, "clip_eps", self.clip_eps, "> 0")
        check_field(self.clip_eps_high is None or self.clip_eps_high > 0, "clip_eps_high", self.clip_eps_high, "> 0")
        check_field(self.dual_clip_c is None or self.dual_clip_c > 1, "dual_clip_c", self.dual_clip_c, "> 1")
        check_field(self.is_cap >= 1, "is_cap", self.is_cap, ">= 1")
        check_field(self.adv_eps >= 0, "adv_eps", self.adv_eps, ">= 0")
        check_field(self.kl_coef >= 0, "kl_coef", self.kl_coef, ">= 0")


class MegatronConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """[trainer.megatron] Parallelism of the megatron-core backend (trainer.backend = "megatron")."""

    tensor_parallel: int = 1
    """Ranks each layer is split over (divides trainer.processes; the rest is data parallel)."""
    distributed_optimizer: bool = True
    """Shard the optimizer state and float32 master weights over data-parallel ranks (ZeRO-1)."""

    def __post_init__(self) -> None:
        check_field(self.tensor_parallel >= 1, "tensor_parallel", self.tensor_parallel, ">= 1")


def megatron_unavailable(device: str, *, check_cuda: bool) -> str | None:
    """Why the megatron backend cannot run on `device` here, or None (megatron-core's layers need
    CUDA); check_cuda=False where the trainer runs elsewhere (on a Ray node) and "auto" may be a GPU."""
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        return "trainer.backend = 'megatron' needs megatron-core: pip install 'async-rl[megatron]'"
    if device == "cpu" or (check_cuda and not (device.startswith("cuda") and _cuda_available())):
        return (
            f"trainer.backend = 'megatron' needs a CUDA device (megatron-core runs on GPUs); the trainer's is {device}"
        )
    return None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class TrainerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """[trainer] The optimiser loop."""

    lr: float = 1e-6
    """Peak learning rate of AdamW."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Decay after warm-up, over total_steps; a function of the version alone, so resume needs no scheduler state."""
    warmup_steps: int = 0
    """Steps of linear warm-up from 0 to lr."""
    min_lr_ratio: float = 0.0
    """Where linear and cosine decay end, as a fraction of lr."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's beta1, beta2."""
    adam_eps: float = 1e-8
    """AdamW's eps."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global norm."""
    groups_per_step: int = 8
    """GRPO groups per optimizer step: a batch is groups_per_step x rollout.group_size samples."""
    num_minibatches: int = 1
    """Optimizer updates per step (one version); > 1 makes decoupled PPO's proximal policy differ from the current one."""
    max_tokens_per_microbatch: int = 16384
    """Padded tokens (rows x longest row) per forward pass; bounds activation memory."""
    logprob_chunk_tokens: int = 1024
    """Positions per LM-head chunk when computing token logprobs (recomputed in backward): memory for
    logits is chunk x vocabulary instead of micro-batch x vocabulary; 0 = the whole micro-batch at once."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    total_steps: int = 100
    """The run ends after this many published versions."""
    seed: int = 0
    """Seeds torch, numpy and random on every rank (rank r: seed + r)."""
    ckpt_dir: str = ""
    """Checkpoints go to ckpt_dir/step_{version}/; "" = <run.output_dir>/checkpoints."""
    checkpoint_interval: int = 100
    """Steps between checkpoints (atomic: written aside, then renamed); 0 = none by step count.
    A crash loses at most this many steps (or checkpoint_interval_s, whichever comes first)."""
    checkpoint_interval_s: float = 1800.0
    """Seconds since the last checkpoint after which the next step saves one; 0 = none by time.
    There is always one at the last step."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints are kept."""
    device: str | None = None
    """auto | cpu | cuda | cuda:N; None = model.device."""
    processes: int = 1
    """Data-parallel ranks (FSDP2, one per GPU; cpu uses gloo) launched under torchrun; rank 0 talks to
    the buffer and the engines."""
    backend: Literal["torch", "megatron"] = "torch"
    """torch: the HF model (FSDP2 across processes) | megatron: megatron-core's GPTModel built from the HF
    config (tensor and data parallel; needs CUDA and megatron-core); both train with the same losses."""
    megatron: MegatronConfig = msgspec.field(default_factory=MegatronConfig)
    """[trainer.megatron]."""
    loss: LossConfig = msgspec.field(default_factory=LossConfig)
    """[trainer.loss]."""

    def __post_init__(self) -> None:
        check_device("device", self.device)
        check_field(self.processes >= 1, "processes", self.processes, ">= 1")
        check_field(
            self.processes == 1 or not (self.device or "").startswith("cuda:"),
            "device",
            self.device,
            "cuda, cpu or auto when processes > 1 (rank r takes cuda:r)",
        )
        check_field(
            self.processes % self.megatron.tensor_parallel == 0,
            "processes",
            self.processes,
            f"a multiple of megatron.tensor_parallel ({self.megatron.tensor_parallel})",
        )
        check_field(
            self.backend == "megatron" or self.megatron == MegatronConfig(),
            "megatron",
            self.megatron,
            'left at its defaults unless backend = "megatron"',
        )
        check_field(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, ">= 1")
        check_field(self.lr >= 0, "lr", self.lr, ">= 0")
        check_field(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0")
        check_field(
            self.lr_schedule == "constant" or self.total_steps > self.warmup_steps,
            "total_steps",
            self.total_steps,
            f"> warmup_steps for a {self.lr_schedule} schedule",
        )
        check_field(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        check_field(self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm, "> 0")
        check_field(self.groups_per_step >= 1, "groups_per_step", self.groups_per_step, ">= 1")
        check_field(self.num_minibatches >= 1, "num_minibatches", self.num_minibatches, ">= 1")
        check_field(
            self.max_tokens_per_microbatch >= 1, "max_tokens_per_microbatch", self.max_tokens_per_microbatch, ">= 1"
        )
        check_field(self.logprob_chunk_tokens >= 0, "logprob_chunk_tokens", self.logprob_chunk_tokens, ">= 0")
        check_field(self.total_steps >= 1, "total_steps", self.total_steps, ">= 1")
        check_field(self.checkpoint_interval >= 0, "checkpoint_interval", self.checkpoint_interval, ">= 0")
        check_field(self.checkpoint_interval_s >= 0, "checkpoint_interval_s", self.checkpoint_interval_s, ">= 0")


class TrainerContext(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What the run decides for the trainer (async_rl.trainer_main builds it from the whole recipe)."""

    model_path: str
    """A local HF model folder (config.json + safetensors); never a hub id."""
    ckpt_dir: str = ""
    """Resolved checkpoint folder; "" = no checkpoints."""
    device: str = "auto"
    """Resolved device: auto | cpu | cuda | cuda:N."""
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    """Master weights are float32; bfloat16 computes forward/backward in bf16 (autocast / FSDP mixed precision)."""
    max_staleness: int | None = None
    """Refuse a batch holding a sample staler than this (staleness.eta); None = no check."""
    logprob_temperature: float = 1.0
    """The rollout temperature: logprobs are of softmax(logits / T), the distribution the engines sampled from."""
    one_row_per_microbatch: bool = False
    """Every forward sees one unpadded sequence, as an engine computing the trainer's logprobs does
    (engine.trainer_logprobs): the same shapes, so the same kernels and sums."""

    def __post_init__(self) -> None:
        check_field(bool(self.model_path), "model_path", self.model_path, "a local HF model folder")
        check_device("device", self.device)
        check_field(self.max_staleness is None or self.max_staleness >= 0, "max_staleness", self.max_staleness, ">= 0")
        check_field(self.logprob_temperature > 0, "logprob_temperature", self.logprob_temperature, "> 0")
