"""Batched token sampling for a running batch whose rows have different sampling settings."""

from __future__ import annotations

import os

import torch

# SGLang's switch, same meaning: report logprobs of the raw (temperature-1) logits instead.
RETURN_ORIGINAL_LOGPROB = os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in ("1", "true")


class RowSettings:
    """Per-row sampling settings as tensors, rebuilt only when the batch's membership changes."""

    def __init__(self, temperatures: list[float], top_ps: list[float], top_ks: list[int], min_ps: list[float], device):
        self.temperature = torch.tensor(temperatures, dtype=torch.float32, device=device)
        self.top_p = torch.tensor(top_ps, dtype=torch.float32, device=device)
        self.top_k = torch.tensor([k if k > 0 else 0 for k in top_ks], dtype=torch.long, device=device)
        self.min_p = torch.tensor(min_ps, dtype=torch.float32, device=device)
        self.all_greedy = all(t == 0 for t in temperatures)
        self.needs_filter = any(p < 1 for p in top_ps) or any(k > 0 for k in top_ks) or any(m > 0 for m in min_ps)


def sample(
    logits: torch.Tensor, rows: RowSettings, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (token ids, logprobs of those tokens).

    The logprob is from the temperature-scaled, unfiltered distribution of the float32
    logits (temperature 0 counts as 1), as SGLang reports it: the behaviour policy's
    logprob, which the trainer recomputes at the same temperature.
    """
    logits = logits.float()
    if RETURN_ORIGINAL_LOGPROB or rows.all_greedy:
        logprobs = torch.log_softmax(logits, dim=-1)
    else:
        scale = torch.where(rows.temperature > 0, rows.temperature, torch.ones_like(rows.temperature))
        logprobs = torch.log_softmax(logits / scale.unsqueeze(1), dim=-1)
    greedy_tokens = logits.argmax(dim=-1)
    if rows.all_greedy:
        tokens = greedy_tokens
    else:
        probs = torch.softmax(logits / rows.temperature.clamp_min(1e-6).unsqueeze(1), dim=-1)
        if rows.needs_filter:
            tokens = _sample_filtered(probs, rows, generator)
        else:
            tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        tokens = torch.where(rows.temperature == 0, greedy_tokens, tokens)
    return tokens, logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)


def _sample_filtered(probs: torch.Tensor, rows: RowSettings, generator: torch.Generator | None) -> torch.Tensor:
    """top-k, top-p and min-p in one sort; the most likely token always survives."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(probs.shape[1], device=probs.device).unsqueeze(0)
    drop = (rows.top_k.unsqueeze(1) > 0) & (rank >= rows.top_k.unsqueeze(1))
    drop |= (sorted_probs.cumsum(dim=-1) - sorted_probs) > rows.top_p.unsqueeze(1)
    drop |= sorted_probs < rows.min_p.unsqueeze(1) * sorted_probs[:, :1]
    drop[:, 0] = False
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    picked = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(1, picked).squeeze(1)
