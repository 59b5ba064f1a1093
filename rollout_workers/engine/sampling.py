"""Batched token sampling for a running batch whose rows have different sampling settings."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from rollout_workers.engine.batch import RowState

# SGLang's switch, same meaning: report logprobs of the raw (temperature-1) logits instead.
RETURN_ORIGINAL_LOGPROB = os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in ("1", "true")


def sample(
    logits: torch.Tensor, rows: RowState, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (token ids, logprobs of those tokens).

    The logprob is from the temperature-scaled, unfiltered distribution of the float32
    logits (temperature 0 counts as 1), as SGLang reports it: the behaviour policy's
    logprob, which the trainer recomputes at the same temperature.
    """
    logits = logits.float()
    greedy_tokens = logits.argmax(dim=-1)
    if rows.all_greedy:
        tokens = greedy_tokens
        reported = torch.log_softmax(logits, dim=-1)
    else:
        scale = torch.where(rows.temperature > 0, rows.temperature, torch.ones_like(rows.temperature))
        tempered = torch.log_softmax(logits / scale.unsqueeze(1), dim=-1)
        # rows at temperature 0 sample from the temperature-1 distribution, then take the greedy token
        probs = tempered.exp()
        if rows.needs_filter:
            tokens = _sample_filtered(probs, rows, generator)
        else:
            tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        tokens = torch.where(rows.temperature == 0, greedy_tokens, tokens)
        reported = torch.log_softmax(logits, dim=-1) if RETURN_ORIGINAL_LOGPROB else tempered
    return tokens, reported.gather(1, tokens.unsqueeze(1)).squeeze(1)


def _sample_filtered(probs: torch.Tensor, rows: RowState, generator: torch.Generator | None) -> torch.Tensor:
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
