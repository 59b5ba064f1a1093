"""Token logprobs of an HF causal LM, as the trainer computes them: one function for the trainer and
for an embedded engine that reports the trainer's own numbers (engine.trainer_logprobs)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint as recompute_in_backward


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = 0,
) -> torch.Tensor:
    """log p(token at j+1 | tokens <= j) under softmax(logits / temperature), in float32: [B, L-1].

    With chunk_tokens > 0 the LM head runs on that many positions at a time and each chunk's
    logits are recomputed in the backward pass, so full-vocabulary float32 logits never exist for
    more than one chunk (a 150k vocabulary makes them ~0.6 MB per token). The head is swapped for
    the call only, inside the model's own forward, so FSDP's hooks gather its weight as usual.
    """
    head = model.get_output_embeddings()
    targets = input_ids[:, 1:]

    def logprobs_head(hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        per_chunk = functools.partial(_chunk_logprobs, weight=head.weight, bias=head.bias, temperature=temperature)
        return chunked_logprobs(flat, targets.reshape(-1), chunk_tokens, per_chunk).view(targets.shape)

    head.forward = logprobs_head  # an instance attribute, deleted below
    try:
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    finally:
        del head.forward


def chunked_logprobs(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int,
    per_chunk: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """per_chunk(hidden rows, their targets) -> their logprobs, over `chunk_tokens` rows at a time
    (recomputed in backward); chunk_tokens 0 = all rows at once."""
    n = hidden.shape[0]
    step = chunk_tokens if 0 < chunk_tokens < n else n
    run = per_chunk if step == n else functools.partial(recompute_in_backward, per_chunk, use_reentrant=False)
    return torch.cat([run(hidden[i : i + step], targets[i : i + step]) for i in range(0, n, step)])


def _chunk_logprobs(
    hidden: torch.Tensor, targets: torch.Tensor, *, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
