"""Reward functions and the wrapper that makes any of them safe to call.

A reward function is `f(prompt: str, response: str, metadata: dict) -> float`, or an
`async def` of the same shape, named in a recipe as "module:function". `Reward`
runs it with a timeout and turns every failure (exception, timeout, NaN, wrong
type) into reward 0.0 plus an error string, so one bad verifier call never stops
a rollout worker.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

RewardFunction = Callable[[str, str, dict[str, Any]], "float | Awaitable[float]"]


class RewardResult(msgspec.Struct, frozen=True, kw_only=True):
    reward: float
    error: str | None = None
    elapsed_s: float = 0.0


class Reward:
    """A resolved reward function with failure handling; `await reward(prompt, response, metadata)`.

    Synchronous functions run in a worker thread so a slow verifier does not stall the
    worker's event loop; on timeout the thread cannot be killed and finishes in the
    background, but its result is ignored.
    """

    def __init__(self, function: RewardFunction, timeout_s: float = 10.0, name: str | None = None):
        self.function = function
        self.timeout_s = timeout_s
        self.name = name or getattr(function, "__qualname__", repr(function))
        self._is_async = inspect.iscoroutinefunction(function)

    @classmethod
    def from_spec(cls, spec: str, timeout_s: float = 10.0) -> Reward:
        from async_rl.config import import_function

        return cls(import_function(spec), timeout_s, name=spec)

    async def __call__(self, prompt: str, response: str, metadata: dict[str, Any]) -> RewardResult:
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                if self._is_async:
                    value = await self.function(prompt, response, metadata)
                else:
                    value = await asyncio.to_thread(self.function, prompt, response, metadata)
            error = _invalid_reward(value)
        except TimeoutError:
            value, error = 0.0, f"timed out after {self.timeout_s:g} s"
        except Exception as exc:  # a user's verifier may raise anything; the sample still counts
            value, error = 0.0, f"{type(exc).__name__}: {exc}"
        elapsed = time.perf_counter() - start
        if error:
            return RewardResult(reward=0.0, error=f"{self.name}: {error}", elapsed_s=elapsed)
        return RewardResult(reward=float(value), elapsed_s=elapsed)


def _invalid_reward(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"returned {type(value).__name__}, expected a float"
    if not math.isfinite(value):
        return f"returned non-finite {value}"
    return None


# ---- reward functions -----------------------------------------------------------------------


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
