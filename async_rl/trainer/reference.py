"""Synchronous references the asynchronous trainer is checked against.

`reference_loss` is the on-policy objective written the plain way: one
sequence at a time, no padding, no micro-batches, so a test can compare the
trainer's loss and gradient with it. `synchronous_replay` trains a fresh
trainer on a sequence of batches in order: with eta = 0 an asynchronous run
that trained on the same batches must end with the same weights.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from async_rl.logprobs import token_logprobs
from async_rl.messages import Trajectory
from async_rl.trainer.config import LossConfig, TrainerConfig, TrainerContext
from async_rl.trainer.loss import aggregate_loss, group_advantages, policy_token_loss
from async_rl.trainer.trainer import Trainer


def reference_loss(model: torch.nn.Module, trajectories: list[Trajectory], config: LossConfig) -> torch.Tensor:
    groups = {gid: i for i, gid in enumerate(dict.fromkeys(t.group_id for t in trajectories))}
    rewards = torch.tensor([t.reward for t in trajectories])
    advantages = group_advantages(
        rewards,
        torch.tensor([groups[t.group_id] for t in trajectories]),
        std_norm=config.adv_std_norm,
        eps=config.adv_eps,
    )
    masks = [torch.tensor(t.loss_mask or [1] * len(t.response_ids), dtype=torch.bool) for t in trajectories]
    num_tokens = float(sum(int(m.sum()) for m in masks))
    num_seqs = float(sum(int(m.any()) for m in masks))
    device = next(model.parameters()).device
    total = torch.zeros((), device=device)
    for trajectory, advantage, mask in zip(trajectories, advantages, masks):
        ids = torch.tensor([trajectory.prompt_ids + trajectory.response_ids], device=device)
        cur = token_logprobs(model, ids, torch.ones_like(ids))[:, len(trajectory.prompt_ids) - 1 :]
        behav = torch.tensor([trajectory.behavior_logprobs], device=device)
        token_loss, _ = policy_token_loss(cur, behav, advantage.reshape(1).to(device), config)
        total = total + aggregate_loss(
            token_loss, mask[None].to(device), config.aggregation, num_tokens=num_tokens, num_seqs=num_seqs
        )
    return total


def synchronous_replay(config: TrainerConfig, context: TrainerContext, batches: Iterable[list[Trajectory]]) -> Trainer:
    """A fresh trainer that trained on `batches` one after another."""
    trainer = Trainer(config, context)
    for batch in batches:
        trainer.train_step(batch)
    return trainer
