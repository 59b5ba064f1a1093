"""A generate function whose response lengths follow a heavy-tailed distribution.

Real reasoning rollouts have a few very long responses per batch; a tiny model on a
one-character task has none. This forces the lengths (ignore_eos, a log-normal
max_new_tokens per sample, capped by the recipe's rollout.max_new_tokens), so the
async-vs-sync and APRIL benchmarks see the long tail they are about.

The function is resumable (`forced_lengths` is its per-sample plan): the worker keeps
each sample's forced max_new_tokens in the trajectory metadata, so a retracted sample
resumed later still stops at its own length.
"""

from __future__ import annotations

import asyncio
import math
import random
from typing import Any

from rollout_workers.client import EngineClient
from rollout_workers.generate import Sample, single_turn

# Median length as a fraction of the cap, and the log-normal shape: ~5% of samples hit the cap.
MEDIAN_FRACTION = 0.125
SIGMA = 1.25

_rng = random.Random()


def draw_length(rng: random.Random, cap: int) -> int:
    return max(1, min(cap, round(rng.lognormvariate(math.log(cap * MEDIAN_FRACTION), SIGMA))))


def forced_lengths(sampling_params: dict[str, Any], group_size: int) -> list[dict[str, Any]]:
    """One params dict per sample, each with its own forced length."""
    cap = int(sampling_params.get("max_new_tokens", 128))
    return [{**sampling_params, "max_new_tokens": draw_length(_rng, cap), "ignore_eos": True} for _ in range(group_size)]


async def lognormal_lengths(client: EngineClient, prompt_ids: list[int], sampling_params: dict[str, Any],
                            group_size: int) -> list[Sample]:
    """One request per sample, each with its own forced length."""
    async with asyncio.TaskGroup() as group:
        requests = [group.create_task(single_turn(client, prompt_ids, params, 1))
                    for params in forced_lengths(sampling_params, group_size)]
    return [request.result()[0] for request in requests]


lognormal_lengths.sample_params = forced_lengths


def answer_first(prompt: str, response: str, metadata: dict[str, Any]) -> float:
    """1.0 when the response starts with the answer: with forced lengths the rest is padding."""
    answer = str(metadata["answer"]).strip()
    return float(bool(answer) and response.lstrip().startswith(answer))
