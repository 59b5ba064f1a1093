"""The running batch: its rows in cache-slot order and their per-row state on the device.

Everything a decode step needs per row (next token, position, sampling settings, tokens
left, stop tokens) is a device tensor, so a step costs no per-row Python work beyond
appending each row's token; when rows leave, the last rows move into the holes (cache
slots and state together), and newcomers are appended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rollout_workers.engine.kv_cache import SlotCache

if TYPE_CHECKING:
    from rollout_workers.engine.core import Sequence


@dataclass
class RowState:
    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor  # 0: no top-k
    min_p: torch.Tensor
    remaining: torch.Tensor  # tokens each row may still generate
    stop_ids: torch.Tensor  # (rows, k), -1 padded
    all_greedy: bool
    needs_filter: bool

    @classmethod
    def of(cls, rows: list[Sequence], device: torch.device) -> RowState:
        width = max((len(row.stop_token_ids) for row in rows), default=0)
        stops = [sorted(row.stop_token_ids) + [-1] * (width - len(row.stop_token_ids)) for row in rows]
        return cls(
            temperature=torch.tensor([r.temperature for r in rows], dtype=torch.float32, device=device),
            top_p=torch.tensor([r.top_p for r in rows], dtype=torch.float32, device=device),
            top_k=torch.tensor([max(r.top_k, 0) for r in rows], dtype=torch.long, device=device),
            min_p=torch.tensor([r.min_p for r in rows], dtype=torch.float32, device=device),
            remaining=torch.tensor([r.remaining for r in rows], dtype=torch.long, device=device),
            stop_ids=torch.tensor(stops, dtype=torch.long, device=device).view(len(rows), width),
            **cls._flags(rows),
        )

    @staticmethod
    def _flags(rows: list[Sequence]) -> dict[str, bool]:
        return dict(
            all_greedy=all(r.temperature == 0 for r in rows),
            needs_filter=any(r.top_p < 1 or r.top_k > 0 or r.min_p > 0 for r in rows),
        )

    def select(self, index: torch.Tensor, rows: list[Sequence]) -> RowState:
        """The state of `rows`, which are this state's rows at `index`."""
        picked = {name: getattr(self, name).index_select(0, index) for name in self._tensors()}
        return RowState(**picked, **self._flags(rows))

    def extend(self, other: RowState, rows: list[Sequence]) -> RowState:
        width = max(self.stop_ids.shape[1], other.stop_ids.shape[1])
        joined = {
            name: torch.cat([getattr(self, name), getattr(other, name)])
            for name in self._tensors()
            if name != "stop_ids"
        }
        stops = [torch.nn.functional.pad(s, (0, width - s.shape[1]), value=-1) for s in (self.stop_ids, other.stop_ids)]
        return RowState(**joined, stop_ids=torch.cat(stops), **self._flags(rows))

    @staticmethod
    def _tensors() -> tuple[str, ...]:
        return ("temperature", "top_p", "top_k", "min_p", "remaining", "stop_ids")

    def finished(self, tokens: torch.Tensor) -> torch.Tensor:
        """Count `tokens` as generated; True where a row is done by length or a stop token
        (stop strings, which need text, are the host's)."""
        self.remaining -= 1
        return (self.remaining <= 0) | (self.stop_ids == tokens.unsqueeze(1)).any(dim=1)


class RunningBatch:
    """Rows being decoded; row i keeps its keys and values in cache slot i."""

    def __init__(self, rows: list[Sequence], lengths: list[int], last_tokens: torch.Tensor, state: RowState):
        self.rows = rows
        self.lengths = lengths  # host: tokens each row has in the cache (its next token's position)
        self.positions = torch.tensor(lengths, dtype=torch.long, device=last_tokens.device)
        self.last_tokens = last_tokens  # sampled, not yet in the cache
        self.state = state

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def longest(self) -> int:
        return max(self.lengths)

    def advance(self) -> None:
        """The last tokens went into the cache."""
        self.positions += 1
        self.lengths = [n + 1 for n in self.lengths]

    def keep(self, keep: list[bool], cache: SlotCache) -> None:
        """Drop rows; kept rows beyond the new size move into the holes (their slots too)."""
        size = sum(keep)
        holes = [i for i in range(size) if not keep[i]]
        movers = [i for i in range(size, len(keep)) if keep[i]]
        if movers:
            cache.move(movers, holes, self.longest)
        order = list(range(size))
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
        index = torch.tensor(order, dtype=torch.long, device=self.positions.device)
        self.rows = [self.rows[i] for i in order]
        self.lengths = [self.lengths[i] for i in order]
        self.positions = self.positions.index_select(0, index)
        self.last_tokens = self.last_tokens.index_select(0, index)
        self.state = self.state.select(index, self.rows)

    def extend(self, other: RunningBatch) -> None:
        """Append `other`, whose rows were prefilled into the slots after this batch's."""
        self.rows = self.rows + other.rows
        self.lengths = self.lengths + other.lengths
        self.positions = torch.cat([self.positions, other.positions])
        self.last_tokens = torch.cat([self.last_tokens, other.last_tokens])
        self.state = self.state.extend(other.state, self.rows)
