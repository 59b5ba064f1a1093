"""Reward functions: `f(prompt, response, metadata) -> float` (or async), named in a recipe's
rollout.reward; the worker wraps them with rollout_workers.reward.Reward (timeouts, failures score 0)."""

from __future__ import annotations

import re
from typing import Any


def exact_match(prompt: str, response: str, metadata: dict[str, Any]) -> float:
    """1.0 when the response, stripped of surrounding whitespace, is exactly the answer."""
    return float(response.strip() == str(metadata["answer"]).strip())


def char_match(prompt: str, response: str, metadata: dict[str, Any]) -> float:
    """Partial credit: characters right in place, over the longer of answer and response.

    Gives a gradient where exact match is too sparse (multi-character answers from a
    random-init model); extra characters cost as much as missing ones.
    """
    answer, text = str(metadata["answer"]).strip(), response.strip()
    if not answer and not text:
        return 1.0
    return sum(a == b for a, b in zip(answer, text)) / max(len(answer), len(text))


_INTEGER = re.compile(r"-?\d+")


def math_answer(prompt: str, response: str, metadata: dict[str, Any]) -> float:
    """1.0 when math-verify finds the answer in the response (it reads "8 + 7 = 15",
    "\\boxed{15}", "The answer is 15."); if math-verify cannot decide, the last
    integer in the response is compared instead."""
    answer = str(metadata["answer"]).strip()
    try:
        from math_verify import parse, verify

        # Timeouts off: math-verify's are SIGALRM-based, which only works in the main
        # thread; Reward enforces the time limit instead.
        gold = parse(answer, parsing_timeout=None, raise_on_error=True)
        predicted = parse(response, parsing_timeout=None, raise_on_error=True)
        if gold and predicted:
            return float(verify(gold, predicted, timeout_seconds=None, raise_on_error=True))
    except Exception:  # math-verify missing or unable to parse: fall through to the integer check
        pass
    integers = _INTEGER.findall(response)
    return float(bool(integers) and _INTEGER.fullmatch(answer) is not None and int(integers[-1]) == int(answer))
