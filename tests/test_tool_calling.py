"""The multi-turn example against a real engine process, and the trainer honouring its loss mask."""

from __future__ import annotations

import asyncio

import pytest

from async_rl.messages import Trajectory
from recipes.tool_calling import THINK_TOKENS, calculate, calculator
from rollout_workers.client import EngineClient
from rollout_workers.engine.model import resolve_model_spec


def test_the_calculator_computes_without_eval():
    assert calculate("3+4=") == "7" and calculate("12 * -3") == "-36" and calculate("__import__('os')") == "?"


@pytest.fixture(scope="module")
def engine(start_engine):
    return start_engine(extra_args=["--weight-version", "3"])


async def test_turns_and_the_tool_reply_form_one_masked_response(engine):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_spec("tiny:llama")))
    prompt_ids = tokenizer("3+4=", add_special_tokens=False).input_ids
    tool_ids = tokenizer(" [calc: 7] ", add_special_tokens=False).input_ids
    async with EngineClient(engine.url) as client, asyncio.timeout(60):
        samples = await calculator(client, prompt_ids, {"max_new_tokens": 20, "ignore_eos": True}, group_size=2)
    for sample in samples:
        assert len(sample.response_ids) == 20 + len(tool_ids)
        assert sample.response_ids[THINK_TOKENS : THINK_TOKENS + len(tool_ids)] == tool_ids
        assert sample.loss_mask == [1] * THINK_TOKENS + [0] * len(tool_ids) + [1] * (20 - THINK_TOKENS)
        assert sample.behavior_logprobs[THINK_TOKENS : THINK_TOKENS + len(tool_ids)] == [0.0] * len(tool_ids)
        assert set(sample.token_versions) == {3}
        trajectory = Trajectory(
            sample_id="s",
            group_id="g",
            group_size=2,
            prompt_ids=prompt_ids,
            response_ids=sample.response_ids,
            behavior_logprobs=sample.behavior_logprobs,
            token_versions=sample.token_versions,
            loss_mask=sample.loss_mask,
        )
        assert sum(trajectory.loss_mask) == 20


def test_the_trainer_learns_only_from_sampled_tokens(tmp_path):
    from async_rl.trainer.config import TrainerConfig, TrainerContext
    from async_rl.trainer.trainer import Trainer

    trainer = Trainer(
        TrainerConfig(),
        TrainerContext(model_path=str(resolve_model_spec("tiny:llama")), ckpt_dir=str(tmp_path), device="cpu"),
    )
    mask = [1, 1, 0, 0, 1]
    batch = [
        Trajectory(
            sample_id=f"s{i}",
            group_id="g",
            group_size=2,
            prompt_ids=[5, 6],
            response_ids=[7, 8, 9, 10, 11],
            behavior_logprobs=[-1.0] * 5,
            token_versions=[0] * 5,
            loss_mask=mask,
            reward=float(i),
        )
        for i in range(2)
    ]
    step = trainer.train_step(batch)
    assert step.metrics["response_tokens"] == 2 * sum(mask)
