"""Generate functions: turn one prompt into a group of sampled responses.

The worker calls `await generate(client, prompt_ids, sampling_params, group_size)`
for the function a recipe names under rollout.generate; a multi-turn or tool-using
function plugs in with the same signature and returns the same `Sample`s.

A single-turn function can also be *resumable*: it says, through a `sample_params`
attribute (`(sampling_params, group_size) -> one params dict per sample`), how each
sample is asked for. The worker then drives the group itself, one batched request
per engine visit, and an interrupted sample (a weight sync in abort mode, an APRIL
retraction) is continued from prompt + partial response with the remaining budget
(`continuation`, `extend`) instead of being generated again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from rollout_workers.client import EngineClient, GenerateResult

SampleParams = Callable[[dict[str, Any], int], list[dict[str, Any]]]
FINISHED = ("length", "stop")


class Sample(msgspec.Struct, kw_only=True):
    response_ids: list[int]
    behavior_logprobs: list[float]
    token_versions: list[int]
    text: str
    finish_reason: str
    # 1 per response token the loss trains on; None = all (tool output would be 0).
    loss_mask: list[int] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason in FINISHED


class GenerationAborted(RuntimeError):
    """The engine aborted a request (a weight update in abort mode); the group is retried."""


def load_tokenizer(folder: str | Path) -> Any:
    """The model folder's tokenizer for processes that need nothing else of transformers.

    AutoTokenizer finds the tokenizer class through transformers' model registry, which imports
    torch (~3 s of CPU at every worker start); a folder with tokenizer.json loads the same fast
    tokenizer directly (tests/test_generate.py checks they encode, decode and template alike).
    """
    if (Path(folder) / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def encode_prompt(tokenizer: Any, prompt: str, chat_template: bool) -> list[int]:
    """Token ids without the tokenizer's own BOS/EOS: the engine sees exactly what the trainer trains on."""
    if chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    return tokenizer(text, add_special_tokens=False).input_ids


def sample_params_of(generate: Callable) -> SampleParams | None:
    """The per-sample request plan of a resumable generate function, None for any other."""
    return getattr(generate, "sample_params", None)


def continuation(prompt_ids: list[int], sample: Sample | None, params: dict[str, Any]) -> tuple[list[int], dict[str, Any]]:
    """Input ids and sampling params that generate the rest of `sample`: prompt + partial response in,
    `max_new_tokens` lowered by what the partial already holds (so the whole response keeps its budget)."""
    if sample is None or not sample.response_ids:
        return list(prompt_ids), params
    return list(prompt_ids) + list(sample.response_ids), {**params, "max_new_tokens": remaining_budget(sample, params)}


def remaining_budget(sample: Sample | None, params: dict[str, Any]) -> int:
    return int(params["max_new_tokens"]) - (0 if sample is None else len(sample.response_ids))


def extend(sample: Sample | None, result: GenerateResult) -> Sample:
    """The sample with one more segment appended: ids, behavior logprobs and per-token versions concatenated."""
    finish = result.finish_type or "length"
    if sample is None:
        return Sample(response_ids=list(result.output_ids), behavior_logprobs=list(result.output_logprobs),
                      token_versions=result.token_versions(), text=result.text, finish_reason=finish)
    return Sample(response_ids=list(sample.response_ids) + list(result.output_ids),
                  behavior_logprobs=list(sample.behavior_logprobs) + list(result.output_logprobs),
                  token_versions=list(sample.token_versions) + result.token_versions(),
                  text=sample.text + result.text, finish_reason=finish)


def same_params(sampling_params: dict[str, Any], group_size: int) -> list[dict[str, Any]]:
    return [dict(sampling_params) for _ in range(group_size)]


async def single_turn(client: EngineClient, prompt_ids: list[int], sampling_params: dict[str, Any],
                      group_size: int) -> list[Sample]:
    """One /generate request with n = group_size; an aborted response aborts the group."""
    results = await client.generate_batch([prompt_ids], sampling_params={**sampling_params, "n": group_size},
                                          return_logprob=True)
    if len(results) != group_size:
        raise RuntimeError(f"engine returned {len(results)} responses for n={group_size}")
    if any(result.aborted for result in results):
        raise GenerationAborted("engine aborted the request")
    return [extend(None, r) for r in results]


single_turn.sample_params = same_params
