"""Off-policy policy-gradient objectives as pure torch functions.

Three policies appear (token log-probabilities, shape [B, T], float32):
  behav — the engine's, recorded at generation time (maybe several versions old),
  prox  — the trainer's weights at the start of this step, recomputed without grad,
  cur   — the weights being optimised (carries the gradient).

Corrections (LossConfig.correction):
  "none"          PPO-clip with ratio cur/behav: on-policy PPO, treating behav as "old".
  "decoupled_ppo" AReaL's decoupled PPO: the trust region is taken around prox
                  (r = cur/prox, clipped) and the gap between behaviour and proximal
                  policies is corrected by w = pi_prox/pi_behav, capped. With
                  is_mode="truncate" this is also what verl/slime call PPO + TIS.
  "tis"           Truncated importance sampling in its policy-gradient form (Yao et al.):
                  no clipping, loss = -w * (cur/prox) * A, whose gradient at cur = prox
                  is -w * A * grad log pi.
w is a detached weight; every function returns per-token values and leaves
aggregation to `aggregate_loss`, so micro-batches can share one normaliser.
"""

from __future__ import annotations

import torch

from async_rl.trainer.config import Aggregation, LossConfig


def group_advantages(
    rewards: torch.Tensor, group_index: torch.Tensor, *, std_norm: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO: (r - mean_group) / (std_group + eps), unbiased std; a group whose rewards
    are all equal (or a singleton) gets 0: it carries no learning signal.

    `group_index` holds a small int per sample naming its group (0..G-1).
    """
    rewards = rewards.to(torch.float32)
    num_groups = int(group_index.max()) + 1 if group_index.numel() else 0
    counts = torch.bincount(group_index, minlength=num_groups).to(rewards.dtype)
    sums = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device).index_add_(0, group_index, rewards)
    centered = rewards - (sums / counts.clamp(min=1))[group_index]
    if not std_norm:
        return centered
    squares = torch.zeros_like(sums).index_add_(0, group_index, centered.square())
    std = torch.where(counts > 1, squares / (counts - 1).clamp(min=1), torch.zeros_like(counts)).sqrt()
    std = std[group_index]
    return torch.where(std > 0, centered / (std + eps), torch.zeros_like(centered))


def ppo_clip_token_loss(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_eps: float,
    clip_eps_high: float | None = None,
    dual_clip_c: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-min(r A, clip(r, 1-eps, 1+eps_high) A), optionally dual-clipped at -c A for A < 0.

    Returns (per-token loss, bool mask of tokens where a clip bound was active).
    """
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(
        ratio, 1.0 - clip_eps, 1.0 + (clip_eps_high if clip_eps_high is not None else clip_eps)
    )
    loss = torch.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped
    if dual_clip_c is not None:
        dual_bound = -advantages * dual_clip_c
        dual_active = (advantages < 0) & (loss > dual_bound)
        loss = torch.where(dual_active, dual_bound, loss)
        was_clipped = was_clipped | dual_active
    return loss, was_clipped


def behavior_weight(
    prox: torch.Tensor, behav: torch.Tensor, *, cap: float, mode: str = "truncate"
) -> tuple[torch.Tensor, torch.Tensor]:
    """w = pi_prox / pi_behav, detached; truncated to `cap` or zeroed above it.

    Returns (w, bool mask of tokens whose weight hit the cap).
    """
    raw = torch.exp((prox - behav).detach())
    over = raw > cap
    if mode == "truncate":
        return torch.clamp(raw, max=cap), over
    if mode == "mask":
        return torch.where(over, torch.zeros_like(raw), raw), over
    raise ValueError(f"unknown importance-weight mode {mode!r}")


def policy_token_loss(
    cur: torch.Tensor,
    behav: torch.Tensor,
    advantages: torch.Tensor,
    config: LossConfig,
    *,
    prox: torch.Tensor | None = None,
    ref: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss under `config.correction`, plus per-token diagnostics.

    `advantages` is [B] or [B, T]; `prox` defaults to cur.detach() (one update per
    batch: the step-start weights are the current ones). `ref` enables the
    k3 KL penalty towards a reference policy when config.kl_coef > 0.
    Diagnostics (float per token): "clipped", "is_weight", "is_capped", "kl_ref" (0 without a reference).
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(cur)
    prox = cur.detach() if prox is None else prox.detach()
    ones = torch.ones_like(cur)
    if config.correction == "none":
        loss, clipped = _ppo(cur - behav, advantages, config)
        weight, capped = ones, torch.zeros_like(clipped)
    elif config.correction == "decoupled_ppo":
        loss, clipped = _ppo(cur - prox, advantages, config)
        weight, capped = behavior_weight(prox, behav, cap=config.is_cap, mode=config.is_mode)
        loss = loss * weight
    elif config.correction == "tis":
        weight, capped = behavior_weight(prox, behav, cap=config.is_cap, mode=config.is_mode)
        loss = -weight * torch.exp(cur - prox) * advantages
        clipped = torch.zeros_like(capped)
    else:
        raise ValueError(f"unknown correction {config.correction!r}")
    kl_ref = torch.zeros_like(loss)
    if config.kl_coef > 0:
        if ref is None:
            raise ValueError("kl_coef > 0 needs reference log-probabilities")
        kl_ref = kl_k3(cur, ref.detach())
        loss = loss + config.kl_coef * kl_ref
    return loss, {
        "clipped": clipped.float(),
        "is_weight": weight,
        "is_capped": capped.float(),
        "kl_ref": kl_ref.detach(),
    }


def _ppo(log_ratio: torch.Tensor, advantages: torch.Tensor, config: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    return ppo_clip_token_loss(
        log_ratio,
        advantages,
        clip_eps=config.clip_eps,
        clip_eps_high=config.clip_eps_high,
        dual_clip_c=config.dual_clip_c,
    )


def aggregate_loss(
    token_loss: torch.Tensor,
    mask: torch.Tensor,
    mode: Aggregation = "token_mean",
    *,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
) -> torch.Tensor:
    """Reduce a [B, T] loss over valid tokens.

    token_mean: sum / number of valid tokens; seq_mean_token_mean: each sequence's
    token mean, averaged over sequences. Pass the whole batch's `num_tokens` /
    `num_seqs` when reducing one micro-batch of it, so the parts add up to the whole.
    Masked positions are selected out (not multiplied), so a NaN there cannot leak.
    """
    mask = mask.bool()
    masked = torch.where(mask, token_loss, torch.zeros_like(token_loss))
    if mode == "token_mean":
        denominator = num_tokens if num_tokens is not None else mask.sum().item()
        return masked.sum() / max(denominator, 1)
    if mode == "seq_mean_token_mean":
        per_seq = masked.sum(-1) / mask.sum(-1).clamp(min=1)
        denominator = num_seqs if num_seqs is not None else mask.any(-1).sum().item()
        return per_seq.sum() / max(denominator, 1)
    raise ValueError(f"unknown aggregation {mode!r}")


def kl_k1(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Per-token k1 estimate of KL(p || q) from samples of p: log p - log q (unbiased, noisy)."""
    return logp - logq


def kl_k3(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(p || q) from samples of p: (q/p - 1) - log(q/p) (>= 0, low variance)."""
    log_ratio = logq - logp
    return torch.exp(log_ratio) - 1.0 - log_ratio
