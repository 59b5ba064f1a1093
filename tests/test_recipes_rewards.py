"""Reward functions score correctly; the Reward wrapper turns every failure into 0.0 + an error."""

from __future__ import annotations

import asyncio
import time

import pytest

from recipes.rewards import char_match, exact_match, math_answer
from rollout_workers.reward import Reward


def test_exact_and_partial_credit():
    assert exact_match("3+1=", " 4\n", {"answer": "4"}) == 1.0
    assert exact_match("3+1=", "44", {"answer": "4"}) == 0.0
    assert exact_match("", "12", {"answer": 12}) == 1.0
    assert char_match("", "12", {"answer": "12"}) == 1.0
    assert char_match("", "13", {"answer": "12"}) == 0.5
    assert char_match("", "1", {"answer": "12"}) == 0.5
    assert char_match("", "123", {"answer": "12"}) == pytest.approx(2 / 3)
    assert char_match("", "", {"answer": "12"}) == 0.0


@pytest.mark.parametrize(
    "response, answer, expected",
    [
        ("8 + 7 = 15", "15", 1.0),
        ("The answer is 11.", "12", 0.0),
        ("\\boxed{-19}", "-19", 1.0),
        ("-19", "19", 0.0),
        ("no idea", "7", 0.0),
        ("", "7", 0.0),
        ("it is 7", "seven", 0.0),
    ],
)
def test_math_answer(response, answer, expected):
    assert math_answer("What is ...?", response, {"answer": answer}) == expected


async def test_reward_wrapper_handles_sync_async_and_every_failure():
    async def async_exact(prompt, response, metadata):
        return exact_match(prompt, response, metadata)

    async def hangs(prompt, response, metadata):
        await asyncio.sleep(60)

    def blocks(prompt, response, metadata):
        time.sleep(0.3)
        return 1.0

    async with asyncio.timeout(10):
        assert (await Reward(exact_match)("", "4", {"answer": "4"})).reward == 1.0
        assert (await Reward(async_exact)("", "4", {"answer": "4"})).reward == 1.0
        from_spec = await Reward.from_spec("recipes.rewards:math_answer")("", "so 15", {"answer": "15"})
        assert from_spec.reward == 1.0 and from_spec.error is None and from_spec.elapsed_s >= 0

        failures = {
            "recipes.rewards:exact_match: KeyError: 'answer'": await Reward.from_spec("recipes.rewards:exact_match")(
                "", "4", {}
            ),
            "hangs: timed out after 0.1 s": await Reward(hangs, 0.1, name="hangs")("", "", {}),
            "blocks: timed out after 0.1 s": await Reward(blocks, 0.1, name="blocks")("", "", {}),
            "nan: returned non-finite nan": await Reward(lambda *a: float("nan"), name="nan")("", "", {}),
            "str: returned str, expected a float": await Reward(lambda *a: "1", name="str")("", "", {}),
            "bool: returned bool, expected a float": await Reward(lambda *a: True, name="bool")("", "", {}),
        }
    for error, result in failures.items():
        assert result.reward == 0.0 and result.error == error
