"""PyTorch trainer on an HF causal LM: one `train_step` per policy version.

A step takes a list of Trajectories sampled by policy versions <= t, computes
GRPO advantages and the configured off-policy objective, applies one or more
AdamW updates, and advances the version to t + 1 (the weights to publish).
Given the same (weights, optimizer state, batch, version) a step is
deterministic on CPU, so a replay of the batches an async run trained on is a
synchronous reference for it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, cast

import msgspec
import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from async_rl.logprobs import token_logprobs
from async_rl.messages import Trajectory
from async_rl.trainer import checkpoint
from async_rl.trainer.batch import (
    BatchError,
    PaddedBatch,
    pack_microbatches,
    pad_trajectories,
    split_minibatches,
    validate_trajectory,
)
from async_rl.trainer.config import TrainerConfig, TrainerContext
from async_rl.trainer.distributed import all_reduce_sum, full_tensor, init_distributed, shard_model
from async_rl.trainer.loss import aggregate_loss, group_advantages, kl_k1, kl_k3, policy_token_loss
from staleness.metrics import check_staleness_bound, staleness_histogram, staleness_summary

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Per-token quantities summed over valid tokens, then divided by the token count.
_TOKEN_SUMS = (
    "clip_frac",
    "is_weight/mean",
    "is_weight/capped_frac",
    "kl/behav_current_k1",
    "kl/behav_current_k3",
    "kl/current_ref_k3",
)
# Per-token quantities whose maximum over valid tokens is reported: the largest importance weight,
# and the largest |behaviour - current| logprob (0 on-policy when engine.trainer_logprobs is on).
_TOKEN_MAXIMA = ("is_weight/max", "logprob/behav_current_max_abs")


class WeightsExport(NamedTuple):
    version: int
    path: str  # disk: the HF folder engines load (once written); "" otherwise
    # disk: the snapshot to write there; cuda_ipc: the device snapshot engines read; otherwise the live tensors
    tensors: dict[str, torch.Tensor]


class StepResult(msgspec.Struct, kw_only=True):
    version: int  # the trainer's version after the step: the weights to publish
    metrics: dict[str, float]
    staleness_histogram: dict[int, int]
    skipped: bool = False  # True when a non-finite loss or gradient skipped an update
    skip_reason: str = ""


def trainer_class(config: TrainerConfig) -> type[Trainer]:
    """The trainer of `config.backend` (megatron-core is imported only when asked for)."""
    if config.backend == "megatron":
        from async_rl.trainer.megatron_trainer import MegatronTrainer

        return MegatronTrainer
    return Trainer


def load_model(path: str | Path, device: torch.device) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    if not Path(path, "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a local HF model folder (no config.json)")
    # transformers' @wraps(Module.to) loses the bound self: mypy takes `device` for it.
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device)
    _disable_dropout(model)
    return model


def _disable_dropout(model: torch.nn.Module) -> None:
    """Zero every dropout rate but stay in train mode, which gradient checkpointing needs.

    The trainer's log-probabilities must describe the policy the engines sample from.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    model.train()


class Trainer:
    def __init__(self, config: TrainerConfig, context: TrainerContext, *, weights_from: str | Path | None = None):
        """Fresh trainer at version 0 on `context.model_path` (or on `weights_from`, as resume does)."""
        self.config = config
        self.context = context
        self.rank, self.world_size, self.device = init_distributed(context.device)
        # Data parallelism: ranks that train on different rows (all of them here; megatron's
        # tensor-parallel ranks share rows), reducing over `dp_group` (None: every rank).
        self.dp_rank, self.dp_size, self.dp_group = self.rank, self.world_size, None
        seed_everything(config.seed + self.rank)
        self.weights_path = Path(weights_from or context.model_path)
        self.model = load_model(self.weights_path, self.device)
        self.hf_config = self.model.config
        self.generation_config = getattr(self.model, "generation_config", None)
        self.vocab_size = int(self.model.config.vocab_size)
        if config.gradient_checkpointing:  # renamed in transformers 5.x; the old name still works
            enable = (
                getattr(self.model, "activation_checkpointing_enable", None) or self.model.gradient_checkpointing_enable
            )
            enable()
        self.compute_dtype = torch.bfloat16 if context.compute_dtype == "bfloat16" else torch.float32
        if self.world_size > 1:
            shard_model(self.model, self.compute_dtype)
        self.reference = None
        if config.loss.kl_coef > 0:
            self.reference = load_model(context.model_path, self.device).requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=self.lr_at(0),
            betas=config.adam_betas,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
        )
        self.version = 0

    # ----------------------------------------------------------------- training

    def lr_at(self, version: int) -> float:
        c = self.config
        if version < c.warmup_steps:
            return c.lr * (version + 1) / c.warmup_steps
        if c.lr_schedule == "constant":
            return c.lr
        progress = min((version - c.warmup_steps) / (c.total_steps - c.warmup_steps), 1.0)
        shape = 1.0 - progress if c.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return c.lr * (c.min_lr_ratio + (1.0 - c.min_lr_ratio) * shape)

    def train_step(self, trajectories: list[Trajectory]) -> StepResult:
        """Train on `trajectories` at version t and move to t + 1.

        Raises BatchError (bad trajectory) or StalenessBoundError before touching
        any state. A non-finite loss or gradient skips that update (weights and
        optimizer untouched) and is reported, but the version still advances:
        the batch was consumed, and admission control counts on one version per batch.
        """
        started = time.perf_counter()
        if not trajectories:
            raise BatchError("empty batch")
        for trajectory in trajectories:
            validate_trajectory(trajectory, self.vocab_size)
        if self.context.max_staleness is not None:
            check_staleness_bound(trajectories, self.version, self.context.max_staleness)
        histogram = staleness_histogram(trajectories, self.version)

        loss_config = self.config.loss
        batch = pad_trajectories(trajectories, self.device)
        advantages = group_advantages(
            batch.rewards, batch.group_index, std_norm=loss_config.adv_std_norm, eps=loss_config.adv_eps
        )
        minibatches = split_minibatches(batch.size, self.config.num_minibatches)
        # One update per batch: the step-start weights are the current ones, so the
        # loss uses cur.detach() as proximal and this extra forward is not needed.
        prox = (
            self._logprobs_no_grad(self.model, batch)
            if loss_config.correction != "none" and len(minibatches) > 1
            else None
        )
        ref = self._logprobs_no_grad(self.reference, batch) if self.reference is not None else None

        lr = self.lr_at(self.version)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums = torch.zeros(len(_TOKEN_SUMS) + 1, dtype=torch.float64, device=self.device)  # + token count
        maxima = torch.zeros(len(_TOKEN_MAXIMA), dtype=torch.float32, device=self.device)
        losses, grad_norms, skip_reasons = [], [], []
        for rows in minibatches:
            loss, grad_norm, update_maxima = self._update(batch, rows, advantages, prox, ref, sums)
            losses.append(loss)
            grad_norms.append(grad_norm)
            maxima = torch.maximum(maxima, update_maxima)
            if not math.isfinite(loss) or not math.isfinite(grad_norm):
                skip_reasons.append(f"non-finite {'loss' if not math.isfinite(loss) else 'gradient'}")
        self.version += 1

        sums = all_reduce_sum(sums, self.dp_group)
        if dist.is_initialized() and self.dp_size > 1:
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=self.dp_group)
        elapsed = time.perf_counter() - started
        tokens = max(float(sums[-1]), 1.0)
        metrics = {name: float(sums[i]) / tokens for i, name in enumerate(_TOKEN_SUMS)}
        metrics.update(zip(_TOKEN_MAXIMA, maxima.tolist(), strict=True))
        metrics.update(staleness_summary(histogram))
        metrics.update(
            {
                "loss": float(np.mean(losses)),
                "grad_norm": float(np.mean(grad_norms)),
                "reward/mean": float(batch.rewards.mean()),
                "reward/std": float(batch.rewards.std(unbiased=False)),
                "advantage/abs_mean": float(advantages.abs().mean()),
                "response_tokens": float(sums[-1]),
                "samples": float(batch.size),
                "lr": lr,
                "skipped_updates": float(len(skip_reasons)),
                "step_seconds": elapsed,
                "tokens_per_s": sum(batch.lengths) / elapsed,
                "version": float(self.version),
            }
        )
        return StepResult(
            version=self.version,
            metrics=metrics,
            staleness_histogram=histogram,
            skipped=bool(skip_reasons),
            skip_reason="; ".join(skip_reasons),
        )

    def _update(
        self,
        batch: PaddedBatch,
        rows: list[int],
        advantages: torch.Tensor,
        prox: torch.Tensor | None,
        ref: torch.Tensor | None,
        sums: torch.Tensor,
    ) -> tuple[float, float, torch.Tensor]:
        """One optimizer update on minibatch `rows`, skipped if the loss or gradient is not finite.

        Returns (loss over all ranks, gradient norm, the _TOKEN_MAXIMA); adds token sums to `sums`.
        """
        loss_config = self.config.loss
        num_tokens = int(batch.loss_mask[rows].sum())
        num_seqs = int(batch.loss_mask[rows].any(-1).sum())
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        maxima = torch.zeros(len(_TOKEN_MAXIMA), dtype=torch.float32, device=self.device)
        for micro, weight in self._microbatches_of_this_rank(rows, batch.lengths):
            part = batch.rows(micro)
            cur = self._token_logprobs(self.model, part)
            token_loss, diagnostics = policy_token_loss(
                cur,
                part.behav,
                advantages[micro],
                loss_config,
                prox=_take(prox, micro, cur.shape[1]),
                ref=_take(ref, micro, cur.shape[1]),
            )
            loss = aggregate_loss(
                token_loss, part.loss_mask, loss_config.aggregation, num_tokens=num_tokens, num_seqs=num_seqs
            )
            # FSDP and megatron's DDP average gradients over ranks; each rank's loss is its share of the sum.
            (loss * (weight * self.dp_size)).backward()
            if weight:
                total += loss.detach().double()
                maxima = torch.maximum(maxima, self._accumulate(sums, cur.detach(), part, diagnostics))
        total_loss = float(all_reduce_sum(total, self.dp_group))
        return total_loss, self._apply_gradients(math.isfinite(total_loss)), maxima

    def _apply_gradients(self, loss_finite: bool) -> float:
        """Clip to max_grad_norm and step unless the loss or the gradient is not finite; clear the
        gradients. Returns the gradient norm before clipping."""
        grad_norm = float(
            full_tensor(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm))
        )
        if loss_finite and math.isfinite(grad_norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _token_logprobs(self, model: torch.nn.Module, part: PaddedBatch) -> torch.Tensor:
        """[rows, L-1] float32 logprobs of `part`'s tokens under `model` (the policy or the reference)."""
        with self._autocast():
            return token_logprobs(
                model,
                part.input_ids,
                part.attention_mask,
                self.context.logprob_temperature,
                self.config.logprob_chunk_tokens,
            )

    def _accumulate(self, sums: torch.Tensor, cur: torch.Tensor, part: PaddedBatch, diagnostics: dict) -> torch.Tensor:
        """Add this micro-batch's masked token sums; return its _TOKEN_MAXIMA."""
        mask = part.loss_mask
        values = (
            diagnostics["clipped"],
            diagnostics["is_weight"],
            diagnostics["is_capped"],
            kl_k1(part.behav, cur),
            kl_k3(part.behav, cur),
            diagnostics["kl_ref"],
        )
        for i, value in enumerate(values):
            sums[i] += torch.where(mask, value, torch.zeros_like(value)).sum().double()
        sums[-1] += mask.sum()
        zero = torch.zeros_like(cur)
        gap = (part.behav - cur).abs()
        return torch.stack([torch.where(mask, v, zero).max() for v in (diagnostics["is_weight"], gap)]).float()

    def _microbatches_of_this_rank(self, rows: list[int], lengths: list[int]) -> list[tuple[list[int], float]]:
        """This rank's share of the micro-batches, as (rows, weight).

        FSDP needs every rank to run the same number of forward/backward passes,
        so a rank short of work repeats one micro-batch with weight 0.
        """
        budget = 1 if self.context.one_row_per_microbatch else self.config.max_tokens_per_microbatch
        packs = pack_microbatches(rows, lengths, budget)
        mine = [(pack, 1.0) for pack in packs[self.dp_rank :: self.dp_size]]
        return mine + [(packs[0], 0.0)] * (math.ceil(len(packs) / self.dp_size) - len(mine))

    @torch.no_grad()
    def _logprobs_no_grad(self, model: torch.nn.Module, batch: PaddedBatch) -> torch.Tensor:
        """[B, L-1] log-probabilities of every row under `model` as it is now, on every rank."""
        result = torch.zeros_like(batch.behav)
        for micro, weight in self._microbatches_of_this_rank(list(range(batch.size)), batch.lengths):
            logprobs = self._token_logprobs(model, batch.rows(micro))
            if weight:
                result[micro, : logprobs.shape[1]] = logprobs
        return all_reduce_sum(result, self.dp_group)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.compute_dtype == torch.float32 or self.world_size > 1:  # FSDP's mixed-precision policy casts instead
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    # ----------------------------------------------------------------- weights

    def named_tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF parameter name, full tensor) for a weight sync; tied weights appear once.

        A collective under FSDP: every rank must iterate it to the end.
        """
        for name, parameter in self.model.named_parameters():
            tensor = full_tensor(parameter.detach())
            yield name, tensor if dtype is None else tensor.to(dtype)

    def export_weights(self, method: str, weights_dir: str | Path) -> WeightsExport | None:
        """The weights the engines load next, in the form weight sync `method` sends: for disk a
        snapshot of the state that training does not touch (write_export writes it to
        weights_dir/v{version}, beside the next step), for cuda_ipc that snapshot complete on the GPU,
        whole tensors otherwise. A collective under
        FSDP: every rank calls it, rank 0 gets the export, the others None."""
        if method not in ("disk", "tensor", "distributed", "cuda_ipc"):
            raise ValueError(
                f"weight_sync.method={method!r} is not supported (use disk, tensor, distributed or cuda_ipc)"
            )
        if method == "disk":
            path, tensors = str(Path(weights_dir) / f"v{self.version}"), self._snapshot()
        elif method == "cuda_ipc":
            path, tensors = "", self._device_snapshot()
        else:
            path, tensors = "", dict(self.named_tensors())
        return WeightsExport(version=self.version, path=path, tensors=tensors) if self.rank == 0 else None

    def write_export(self, export: WeightsExport) -> Path:
        """Write a disk export as the HF folder an engine loads (rank 0; safe while training goes on:
        a device snapshot comes to the host here, in the sync task's thread)."""
        path = Path(export.path)
        self._replace_folder(path, self._on_host(export.tensors))
        return path

    def _on_host(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A device snapshot's host crossing, beside the next step: asynchronous copies on the copy
        stream into page-locked buffers kept from one version to the next (the run writes one snapshot
        at a time), then one wait; a synchronous copy per tensor into fresh pageable memory costs
        several times more."""
        if not any(tensor.is_cuda for tensor in tensors.values()):
            return tensors
        buffers = self._pinned_buffers
        with torch.cuda.stream(self._copy_stream):
            for name, tensor in tensors.items():
                buffer = buffers.get(name)
                if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
                    buffer = buffers[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                buffer.copy_(tensor, non_blocking=True)
        self._copy_stream.synchronize()
        return {name: buffers[name] for name in tensors}

    def state_dict_for_sync(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return dict(self.named_tensors(dtype))

    def save_weights_for_engine(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write an HF model folder an engine can load (update_weights_from_disk); replaced atomically."""
        path = Path(path)
        state = self._hf_state_dict(dtype)
        if self.rank == 0:
            self._replace_folder(path, state)
        self._barrier()
        return path

    def _replace_folder(self, path: Path, state: dict[str, torch.Tensor]) -> None:
        tmp = path.parent / f".{path.name}.tmp"
        self._write_hf_folder(tmp, state)
        old = path.parent / f".{path.name}.old"
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        if old.exists():
            shutil.rmtree(old)

    def _snapshot(self) -> dict[str, torch.Tensor]:
        """The full state, apart from the parameters the optimizer updates in place, in the compute
        dtype (the engines serve model.dtype: bfloat16 halves what is written and read). One rank
        copies it where it lives: on CUDA a device copy ordered before the next step's kernels (the
        trainer does not wait for the host crossing, write_export makes it); gathered FSDP shards
        are already a host copy."""
        if self.world_size > 1:
            return self._hf_state_dict(self.compute_dtype)
        state = self._own_state()
        if self.device.type != "cuda":
            return {name: t.detach().to(self.compute_dtype, copy=True) for name, t in state.items()}
        # On a stream of its own, after the step that made the weights and before the next step's
        # in-place update: GPU-side waits, the trainer never blocks; write_export's host crossing
        # then runs on that stream beside the next step instead of behind it.
        training, copies = torch.cuda.current_stream(self.device), self._copy_stream
        copies.wait_stream(training)
        with torch.cuda.stream(copies):
            snapshot = {name: t.detach().to(self.compute_dtype, copy=True) for name, t in state.items()}
        training.wait_stream(copies)
        return snapshot

    def _device_snapshot(self) -> dict[str, torch.Tensor]:
        """cuda_ipc: the snapshot, complete on the GPU on return (the engine reads it from another
        process, which no stream of this one orders); earlier snapshots an engine held by IPC are
        given back to the allocator first."""
        if self.world_size > 1 or self.device.type != "cuda":
            raise ValueError(
                f"weight_sync.method = 'cuda_ipc' needs one trainer rank on a CUDA device "
                f"(this trainer: {self.world_size} rank(s) on {self.device})"
            )
        torch.cuda.ipc_collect()
        snapshot = self._snapshot()
        self._copy_stream.synchronize()
        return snapshot

    @functools.cached_property
    def _copy_stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(self.device)

    @functools.cached_property
    def _pinned_buffers(self) -> dict[str, torch.Tensor]:
        """_on_host's page-locked buffers by name (created on first use, by every backend)."""
        return {}

    def _hf_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Full state dict on rank 0 (empty elsewhere) without tied duplicates, on the host."""
        # A model's state dict holds tensors only (the declared value type also covers optimizer states).
        state = cast(dict[str, torch.Tensor], get_model_state_dict(self.model, options=_FULL))
        return {k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in self._untied(state).items()}

    def _own_state(self) -> dict[str, torch.Tensor]:
        """One rank's state dict where it lives (its tensors are the parameters), without tied duplicates."""
        return self._untied(self.model.state_dict())

    def _untied(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keep = {name for name, _ in self.model.named_parameters()} | {
            name for name, _ in self.model.named_buffers() if name in state
        }
        return {k: v for k, v in state.items() if k in keep}

    def _write_hf_folder(self, folder: Path, state: dict[str, torch.Tensor]) -> None:
        from huggingface_hub import save_torch_state_dict

        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        save_torch_state_dict(state, folder)
        self.hf_config.save_pretrained(folder)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(folder)
        checkpoint.copy_tokenizer_files(self.weights_path, folder)

    # ----------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path:
        """Save weights, optimizer, version and RNG states to ckpt_dir/step_{version}/."""
        if not self.context.ckpt_dir:
            raise ValueError("TrainerContext.ckpt_dir is empty: nowhere to checkpoint")
        final = checkpoint.step_dir(self.context.ckpt_dir, self.version)
        tmp = final.parent / f".{final.name}.tmp"
        model_state = self._hf_state_dict()
        if self.rank == 0:
            self._write_hf_folder(tmp, model_state)
            (tmp / checkpoint.STATE_DIR).mkdir()
        self._barrier()
        self._save_optimizer(tmp / checkpoint.STATE_DIR)
        torch.save(checkpoint.capture_rng(), tmp / checkpoint.STATE_DIR / f"rng_rank{self.rank}.pt")
        self._barrier()
        if self.rank == 0:
            checkpoint.write_meta(
                tmp, {"version": self.version, "world_size": self.world_size, "seed": self.config.seed}
            )
            checkpoint.publish(tmp, final)
            checkpoint.prune(self.context.ckpt_dir, self.config.keep_checkpoints)
        self._barrier()
        return final

    @classmethod
    def resume(cls, config: TrainerConfig, context: TrainerContext, path: str | Path | None = None) -> Trainer:
        """A trainer continuing exactly where checkpoint `path` (default: ckpt_dir's latest) stopped.

        Bit-exact with the same number of ranks; another rank count also resumes (weights and
        optimizer state are saved whole), only the per-rank RNG states are then not restored.
        """
        path = Path(path) if path is not None else checkpoint.latest_checkpoint(context.ckpt_dir)
        if path is None:
            raise FileNotFoundError(f"no checkpoint under {context.ckpt_dir!r}")
        state_dir = path / checkpoint.STATE_DIR
        meta = checkpoint.read_meta(path)
        trainer = cls(config, context, weights_from=path)
        trainer._load_optimizer(state_dir)
        trainer.version = int(meta["version"])
        rng_file = state_dir / f"rng_rank{trainer.rank}.pt"
        if rng_file.is_file():
            checkpoint.restore_rng(torch.load(rng_file, weights_only=True))
        else:  # weights and optimizer state are full tensors, so a different rank count can resume
            log.warning(
                "%s was saved by %d ranks: rank %d keeps its fresh RNG state", path, meta["world_size"], trainer.rank
            )
        return trainer

    @classmethod
    def resume_or_new(cls, config: TrainerConfig, context: TrainerContext) -> Trainer:
        if context.ckpt_dir and checkpoint.latest_checkpoint(context.ckpt_dir) is not None:
            return cls.resume(config, context)
        return cls(config, context)

    def _save_optimizer(self, state_dir: Path) -> None:
        """A collective: the whole optimizer state, written by rank 0 (any rank count can resume it)."""
        optimizer_state = get_optimizer_state_dict(self.model, self.optimizer, options=_FULL)
        if self.rank == 0:
            torch.save(optimizer_state, state_dir / "optimizer.pt")

    def _load_optimizer(self, state_dir: Path) -> None:
        optimizer_state = torch.load(state_dir / "optimizer.pt", map_location="cpu", weights_only=True)
        set_optimizer_state_dict(
            self.model, self.optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True)
        )

    def _barrier(self) -> None:
        if dist.is_initialized() and self.world_size > 1:
            dist.barrier()


def _take(tensor: torch.Tensor | None, rows: list[int], width: int) -> torch.Tensor | None:
    return None if tensor is None else tensor[rows, :width]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
