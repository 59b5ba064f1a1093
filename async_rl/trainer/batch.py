"""Trajectories -> padded tensors, and the split into minibatches and micro-batches.

Rows are prompt + response, right-padded. Per-token tensors are indexed by
*target* position j = the token at input position j + 1, which is what the
logits at position j predict: response token k of a row with prompt length P
sits at target position P - 1 + k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from async_rl.messages import Trajectory


class BatchError(ValueError):
    """A trajectory the trainer cannot use; names the sample so it can be dropped upstream."""


def validate_trajectory(trajectory: Trajectory, vocab_size: int) -> None:
    t = trajectory
    n = len(t.response_ids)
    problems = []
    if not t.prompt_ids:
        problems.append("empty prompt")
    if n == 0:
        problems.append("empty response")
    if len(t.behavior_logprobs) != n or len(t.token_versions) != n:
        problems.append(
            f"{n} response tokens but {len(t.behavior_logprobs)} logprobs and {len(t.token_versions)} versions"
        )
    if t.loss_mask is not None and (len(t.loss_mask) != n or not np.isin(_numpy(t.loss_mask), (0, 1)).all()):
        problems.append("loss_mask must be 0/1 per response token")
    tokens = np.concatenate([_numpy(t.prompt_ids), _numpy(t.response_ids)])
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        problems.append(f"token id outside vocabulary [0, {vocab_size})")
    if not np.isfinite(_numpy(t.behavior_logprobs)).all():
        problems.append("non-finite behavior logprob")
    if not math.isfinite(t.reward):
        problems.append(f"non-finite reward {t.reward}")
    if problems:
        raise BatchError(f"trajectory {t.sample_id!r}: " + "; ".join(problems))


def _numpy(values) -> np.ndarray:
    """A zero-copy view of a per-token array (lists, from hand-built tests, are copied)."""
    return (
        np.frombuffer(values, dtype=np.float32 if values.typecode == "f" else np.int32)
        if hasattr(values, "typecode")
        else np.asarray(values)
    )


@dataclass
class PaddedBatch:
    input_ids: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor  # [B, L] long
    loss_mask: torch.Tensor  # [B, L-1] bool, target positions trained on
    behav: torch.Tensor  # [B, L-1] float32 behaviour logprobs at target positions (0 elsewhere)
    rewards: torch.Tensor  # [B] float32
    group_index: torch.Tensor  # [B] long, 0..G-1 in order of first appearance
    lengths: list[int]  # real tokens per row

    @property
    def size(self) -> int:
        return len(self.lengths)

    def rows(self, index: list[int]) -> PaddedBatch:
        """Sub-batch of `index` rows, trimmed to its longest row."""
        width = max(self.lengths[i] for i in index)
        rows = torch.tensor(index, device=self.input_ids.device)
        return PaddedBatch(
            input_ids=self.input_ids[rows, :width],
            attention_mask=self.attention_mask[rows, :width],
            loss_mask=self.loss_mask[rows, : width - 1],
            behav=self.behav[rows, : width - 1],
            rewards=self.rewards[rows],
            group_index=self.group_index[rows],
            lengths=[self.lengths[i] for i in index],
        )


def pad_trajectories(trajectories: list[Trajectory], device: torch.device | str = "cpu") -> PaddedBatch:
    lengths = [len(t.prompt_ids) + len(t.response_ids) for t in trajectories]
    width = max(lengths)
    input_ids = torch.zeros(len(trajectories), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    loss_mask = torch.zeros(len(trajectories), width - 1, dtype=torch.bool)
    behav = torch.zeros(len(trajectories), width - 1, dtype=torch.float32)
    groups: dict[str, int] = {}
    for row, t in enumerate(trajectories):
        prompt_len, length = len(t.prompt_ids), lengths[row]
        input_ids[row, :prompt_len] = torch.from_numpy(_numpy(t.prompt_ids))
        input_ids[row, prompt_len:length] = torch.from_numpy(_numpy(t.response_ids))
        attention_mask[row, :length] = 1
        targets = slice(prompt_len - 1, length - 1)
        loss_mask[row, targets] = torch.from_numpy(_numpy(t.loss_mask)).bool() if t.loss_mask is not None else True
        behav[row, targets] = torch.from_numpy(_numpy(t.behavior_logprobs))
        groups.setdefault(t.group_id, len(groups))
    return PaddedBatch(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        loss_mask=loss_mask.to(device),
        behav=behav.to(device),
        rewards=torch.tensor([t.reward for t in trajectories], dtype=torch.float32, device=device),
        group_index=torch.tensor([groups[t.group_id] for t in trajectories], dtype=torch.long, device=device),
        lengths=lengths,
    )


def split_minibatches(size: int, num_minibatches: int) -> list[list[int]]:
    """Contiguous, near-equal row ranges (fewer if there are fewer rows than minibatches)."""
    parts = min(num_minibatches, size)
    bounds = [round(i * size / parts) for i in range(parts + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(parts)]


def pack_microbatches(rows: list[int], lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Greedy packing, longest first, so rows x longest row stays within `max_tokens`.

    A single row longer than the budget still gets its own micro-batch.
    """
    order = sorted(rows, key=lambda r: (-lengths[r], r))
    packs: list[list[int]] = []
    for row in order:
        if packs and (len(packs[-1]) + 1) * lengths[packs[-1][0]] <= max_tokens:
            packs[-1].append(row)
        else:
            packs.append([row])
    return packs
