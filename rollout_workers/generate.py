"""The two rollout plug-ins a recipe names under [rollout], and what both build on.

- `sample_plan` `(sampling_params, group_size) -> one params dict per sample`: the worker drives the
  group itself (rollout_workers/group.py), one batched request per engine visit, and an interrupted
  sample (a weight sync in abort mode, an APRIL retraction) is continued from prompt + partial
  response with the remaining budget (`continuation`, `extend`). The default is `same_params`.
- `generate` `async (client, prompt_ids, sampling_params, group_size) -> list[Sample]`: a custom
  rollout (multi-turn, tools, recipes/tool_calling.py) that makes the whole group; the worker retries
  an interrupted group from the start.
`RolloutPlugins.from_config` resolves exactly one of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from rollout_workers.client import EngineClient, GenerateResult

if TYPE_CHECKING:
    from async_rl.config import RolloutConfig

SamplePlan = Callable[[dict[str, Any], int], list[dict[str, Any]]]
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
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt
    return tokenizer(text, add_special_tokens=False).input_ids


def continuation(
    prompt_ids: list[int], sample: Sample | None, params: dict[str, Any]
) -> tuple[list[int], dict[str, Any]]:
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
        return Sample(
            response_ids=list(result.output_ids),
            behavior_logprobs=list(result.output_logprobs),
            token_versions=result.token_versions(),
            text=result.text,
            finish_reason=finish,
        )
    return Sample(
        response_ids=list(sample.response_ids) + list(result.output_ids),
        behavior_logprobs=list(sample.behavior_logprobs) + list(result.output_logprobs),
        token_versions=list(sample.token_versions) + result.token_versions(),
        text=sample.text + result.text,
        finish_reason=finish,
    )


def same_params(sampling_params: dict[str, Any], group_size: int) -> list[dict[str, Any]]:
    return [dict(sampling_params) for _ in range(group_size)]


class GenerateFunction(Protocol):
    async def __call__(
        self, client: EngineClient, prompt_ids: list[int], sampling_params: dict[str, Any], group_size: int
    ) -> list[Sample]: ...


@dataclass(frozen=True)
class RolloutPlugins:
    """Exactly one is set: the worker drives each group by `plan`, or `generate` makes whole groups."""

    plan: SamplePlan | None
    generate: GenerateFunction | None

    @classmethod
    def from_config(cls, rollout: RolloutConfig) -> RolloutPlugins:
        from async_rl.config import import_function

        if rollout.generate is not None:
            return cls(plan=None, generate=import_function(rollout.generate))
        return cls(plan=import_function(rollout.sample_plan) if rollout.sample_plan else same_params, generate=None)
