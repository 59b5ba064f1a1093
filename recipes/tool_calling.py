"""A multi-turn, tool-using generate function: the model writes, a calculator answers, the model goes on.

It shows the contract every custom rollout follows (rollout.generate =
"recipes.tool_calling:calculator"): return one Sample per group member whose
response holds every turn in order. Tokens the policy did not sample (here the
tool's reply) carry loss_mask 0, logprob 0.0 and the version of the turn before
them, so the trainer conditions on them but never learns to produce them, and
staleness is still measured from the oldest sampled token.

Turn 1: up to `THINK_TOKENS` tokens of the model's own. Tool: the arithmetic
expression of the prompt (e.g. "3+4=") is evaluated without eval() and
" [calc: 7] " is appended. Turn 2: the rest of the token budget.

The tool reply is tokenized with the engine's own tokenizer (found through
/get_model_info), so the worker must see the model folder, as it does on one host.
"""

from __future__ import annotations

import asyncio
import functools
import operator
import re
from typing import Any

from rollout_workers.client import EngineClient, GenerateResult
from rollout_workers.generate import GenerationAborted, Sample, load_tokenizer

THINK_TOKENS = 8
_EXPRESSION = re.compile(r"(-?\d+)\s*([-+*])\s*(-?\d+)")
_OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def calculate(text: str) -> str:
    """The tool: the first `a op b` in `text`, computed; '?' when there is none."""
    match = _EXPRESSION.search(text)
    if match is None:
        return "?"
    left, op, right = match.groups()
    return str(_OPERATORS[op](int(left), int(right)))


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    return load_tokenizer(path)


async def calculator(
    client: EngineClient, prompt_ids: list[int], sampling_params: dict[str, Any], group_size: int
) -> list[Sample]:
    info = await client.get_model_info()
    tokenizer = _tokenizer(info.tokenizer_path or info.model_path)
    tool_text = f" [calc: {calculate(tokenizer.decode(list(prompt_ids)))}] "
    tool_ids = tokenizer(tool_text, add_special_tokens=False).input_ids
    async with asyncio.TaskGroup() as group:
        conversations = [
            group.create_task(_conversation(client, list(prompt_ids), tool_ids, sampling_params))
            for _ in range(group_size)
        ]
    return [conversation.result() for conversation in conversations]


async def _conversation(
    client: EngineClient, prompt_ids: list[int], tool_ids: list[int], sampling_params: dict[str, Any]
) -> Sample:
    budget = int(sampling_params.get("max_new_tokens", 64))
    first = await _turn(client, prompt_ids, sampling_params, min(THINK_TOKENS, budget))
    ids, logprobs, versions, mask = (
        list(first.output_ids),
        list(first.output_logprobs),
        first.token_versions(),
        [1] * len(first.output_ids),
    )
    text, finish = first.text, first.finish_type
    remaining = budget - len(ids)
    if remaining > 0 and finish == "length":
        version = versions[-1] if versions else 0
        ids += tool_ids
        logprobs += [0.0] * len(tool_ids)
        versions += [version] * len(tool_ids)
        mask += [0] * len(tool_ids)
        second = await _turn(client, prompt_ids + ids, sampling_params, remaining)
        ids += second.output_ids
        logprobs += second.output_logprobs
        versions += second.token_versions()
        mask += [1] * len(second.output_ids)
        text, finish = text + second.text, second.finish_type  # the reward reads the model's own words
    return Sample(
        response_ids=ids,
        behavior_logprobs=logprobs,
        token_versions=versions,
        loss_mask=mask,
        text=text,
        finish_reason=finish or "length",
    )


async def _turn(
    client: EngineClient, input_ids: list[int], sampling_params: dict[str, Any], max_new_tokens: int
) -> GenerateResult:
    result = await client.generate(
        input_ids, sampling_params={**sampling_params, "max_new_tokens": max_new_tokens}, return_logprob=True
    )
    if result.aborted:
        raise GenerationAborted("engine aborted a turn")
    return result
