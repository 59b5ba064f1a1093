"""Generate functions: turn one prompt into a group of sampled responses.

The worker calls `await generate(client, prompt_ids, sampling_params, group_size)`
for the function a recipe names under rollout.generate; a multi-turn or tool-using
function plugs in with the same signature and returns the same `Sample`s.
"""

from __future__ import annotations

from typing import Any

import msgspec

from rollout_workers.client import EngineClient


class Sample(msgspec.Struct, kw_only=True):
    response_ids: list[int]
    behavior_logprobs: list[float]
    token_versions: list[int]
    text: str
    finish_reason: str
    # 1 per response token the loss trains on; None = all (tool output would be 0).
    loss_mask: list[int] | None = None


class GenerationAborted(RuntimeError):
    """The engine aborted a request (a weight update in abort mode); the group is retried."""


def encode_prompt(tokenizer: Any, prompt: str, chat_template: bool) -> list[int]:
    """Token ids without the tokenizer's own BOS/EOS: the engine sees exactly what the trainer trains on."""
    if chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    return tokenizer(text, add_special_tokens=False).input_ids


async def single_turn(client: EngineClient, prompt_ids: list[int], sampling_params: dict[str, Any],
                      group_size: int) -> list[Sample]:
    """One /generate request with n = group_size; an aborted response aborts the group."""
    results = await client.generate_batch([prompt_ids], sampling_params={**sampling_params, "n": group_size},
                                          return_logprob=True)
    if len(results) != group_size:
        raise RuntimeError(f"engine returned {len(results)} responses for n={group_size}")
    if any(result.aborted for result in results):
        raise GenerationAborted("engine aborted the request")
    return [
        Sample(response_ids=r.output_ids, behavior_logprobs=r.output_logprobs, token_versions=r.token_versions(),
               text=r.text, finish_reason=r.finish_type or "length")
        for r in results
    ]
