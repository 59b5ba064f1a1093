"""The wrapper that makes any reward function safe to call.

A reward function is `f(prompt: str, response: str, metadata: dict) -> float`, or an
`async def` of the same shape, named in a recipe as "module:function" (recipes/rewards.py
has the bundled ones). `Reward` runs it with a timeout and turns every failure (exception,
timeout, NaN, wrong type) into reward 0.0 plus an error string, so one bad verifier call
never stops a rollout worker.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

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
                # _is_async tells which of RewardFunction's two shapes this is; _invalid_reward checks the value.
                if self._is_async:
                    value = await cast(Awaitable[float], self.function(prompt, response, metadata))
                else:
                    sync_function = cast(Callable[[str, str, dict[str, Any]], float], self.function)
                    value = await asyncio.to_thread(sync_function, prompt, response, metadata)
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
