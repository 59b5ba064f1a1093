"""Sample plans whose response lengths have a long tail (rollout.sample_plan).

Real reasoning rollouts have a few very long responses per batch; a tiny model on a
one-character task has none. This forces the lengths (ignore_eos, a log-normal
max_new_tokens per sample, capped by the recipe's rollout.max_new_tokens), so the
async-vs-sync and APRIL benchmarks see the long tail they are about. The worker keeps
each sample's forced max_new_tokens in the trajectory metadata, so a retracted sample
resumed later still stops at its own length.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

# Median length as a fraction of the cap, and the log-normal shape: ~5% of samples hit the cap.
MEDIAN_FRACTION = 0.125
SIGMA = 1.25

_rng = random.Random()
# Staggered plan: the groups' lengths step through 1/STEPS .. STEPS/STEPS of the cap, in turn.
STEPS = 12
_group_counter = itertools.count()


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


def staggered_lengths(sampling_params: dict[str, Any], group_size: int) -> list[dict[str, Any]]:
    """Every sample of a group runs to one length; successive groups step through STEPS lengths up to the cap.

    A tail by construction, without chance: of any STEPS consecutive groups the longest outlast the
    others by whole multiples of cap / STEPS tokens, so a round that closes on its shorter groups
    always finds the longer ones still generating (the log-normal draw may put several groups at the
    cap, which then finish together with the round's last accepted one).
    """
    cap = int(sampling_params.get("max_new_tokens", 128))
    length = max(1, cap * (next(_group_counter) % STEPS + 1) // STEPS)
    return [{**sampling_params, "max_new_tokens": length, "ignore_eos": True} for _ in range(group_size)]
