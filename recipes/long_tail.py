"""A sample plan whose response lengths follow a heavy-tailed distribution (rollout.sample_plan).

Real reasoning rollouts have a few very long responses per batch; a tiny model on a
one-character task has none. This forces the lengths (ignore_eos, a log-normal
max_new_tokens per sample, capped by the recipe's rollout.max_new_tokens), so the
async-vs-sync and APRIL benchmarks see the long tail they are about. The worker keeps
each sample's forced max_new_tokens in the trajectory metadata, so a retracted sample
resumed later still stops at its own length.
"""

from __future__ import annotations

import math
import random
from typing import Any

# Median length as a fraction of the cap, and the log-normal shape: ~5% of samples hit the cap.
MEDIAN_FRACTION = 0.125
SIGMA = 1.25

_rng = random.Random()


def draw_length(rng: random.Random, cap: int) -> int:
    return max(1, min(cap, round(rng.lognormvariate(math.log(cap * MEDIAN_FRACTION), SIGMA))))


def forced_lengths(sampling_params: dict[str, Any], group_size: int) -> list[dict[str, Any]]:
    """One params dict per sample, each with its own forced length."""
    cap = int(sampling_params.get("max_new_tokens", 128))
    return [
        {**sampling_params, "max_new_tokens": draw_length(_rng, cap), "ignore_eos": True} for _ in range(group_size)
    ]


def answer_first(prompt: str, response: str, metadata: dict[str, Any]) -> float:
    """1.0 when the response starts with the answer: with forced lengths the rest is padding."""
    answer = str(metadata["answer"]).strip()
    return float(bool(answer) and response.lstrip().startswith(answer))
