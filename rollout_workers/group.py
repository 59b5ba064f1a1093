"""One GRPO group in flight: its samples' progress, and the loop that drives them to the end.

Why a state object rather than one generate call: a group can be interrupted (a weight
sync in abort mode, an APRIL retraction, a failing engine) and continued later, on any
engine, even in a later rollout round. Every interruption keeps what was generated: a
sample's response is the concatenation of its segments, its behavior logprobs and per-token
versions likewise, so the versions record every policy that wrote it. A retracted group
travels through the buffer's partial pool as one partial Trajectory per member, carrying in
its metadata what resuming and scoring need (task prompt and metadata, per-sample sampling
params such as a forced length, round, attempt).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from async_rl.messages import LogprobArray, Timings, TokenArray, Trajectory
from rollout_workers.client import EngineClientError, EngineConnectionError, EngineError, EngineProtocolError
from rollout_workers.generate import Sample, continuation, extend, remaining_budget
from rollout_workers.reward import RewardResult
from rollout_workers.rollout_metrics import RolloutMetrics
from rollout_workers.tasks import TaskSample

log = logging.getLogger("rollout_worker")
MAX_BACKOFF_S = 5.0


@dataclass(eq=False)
class GroupRollout:
    group_id: str
    task: TaskSample
    prompt_ids: list[int]
    params: list[dict[str, Any]]  # one per sample: a forced length lives here
    samples: list[Sample | None]
    round: int = 0
    attempt: int = 1  # +1 per retraction: the pool keys partials by sample id @ attempt
    submitted: float = field(default_factory=time.time)
    engine_url: str = ""
    retracting: bool = False
    dropped: bool = False
    resumed: bool = False  # some sample has more than one segment
    live: tuple[int, list[str]] | None = None  # engine index and rids of the request in flight
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # its task returned (sent, parked or dropped)
    _requests: itertools.count = field(default_factory=itertools.count)

    @property
    def size(self) -> int:
        return len(self.samples)

    @property
    def unfinished(self) -> list[int]:
        return [i for i, s in enumerate(self.samples) if s is None or not s.finished]

    @property
    def complete(self) -> bool:
        return not self.unfinished

    @property
    def stopped(self) -> bool:
        return self.retracting or self.dropped

    @property
    def oldest_version(self) -> int | None:
        """The first policy that wrote any of its tokens (None before the first token): what staleness counts."""
        versions = [min(s.token_versions) for s in self.samples if s is not None and len(s.token_versions)]
        return min(versions) if versions else None

    @property
    def tokens(self) -> int:
        return sum(len(s.response_ids) for s in self.samples if s is not None)

    def metadata(self, index: int) -> dict[str, Any]:
        return {
            "task": self.task.metadata.get("task", ""),
            "prompt": self.task.prompt,
            "task_metadata": self.task.metadata,
            "sampling": self.params[index],
            "round": self.round,
        }

    def _member(self, i: int, sample: Sample, **fields: Any) -> Trajectory:
        """Sample i as a Trajectory: what a partial and a finished member share, plus `fields`."""
        return Trajectory(
            sample_id=f"{self.group_id}-{i}",
            group_id=self.group_id,
            group_size=self.size,
            prompt_ids=TokenArray(self.prompt_ids),
            response_ids=TokenArray(sample.response_ids),
            behavior_logprobs=LogprobArray(sample.behavior_logprobs),
            token_versions=TokenArray(sample.token_versions),
            finish_reason=sample.finish_reason,
            engine_id=self.engine_url,
            attempt=self.attempt,
            **fields,
        )

    def partial_trajectories(self) -> list[Trajectory]:
        """Every member with tokens, finished or not, so the group can be rebuilt whole from the pool.

        A member without a token yet has nothing to keep (and no version the pool could check):
        it is not sent; the others list its sampling params under "missing"."""
        missing = {str(i): self.params[i] for i, s in enumerate(self.samples) if s is None or not s.response_ids}
        return [
            self._member(
                i,
                sample,
                partial=True,
                timings=Timings(submitted=self.submitted),
                metadata={**self.metadata(i), "text": sample.text, "resumed": self.resumed, "missing": missing},
            )
            for i, sample in enumerate(self.samples)
            if sample is not None and sample.response_ids
        ]

    def finished_samples(self) -> list[Sample]:
        """The samples of a complete group (every one has been generated)."""
        samples = [s for s in self.samples if s is not None]
        assert len(samples) == len(self.samples), f"group {self.group_id} has samples not yet generated"
        return samples

    def response_texts(self, tokenizer: Any) -> list[str]:
        """What the reward reads: a resumed sample's text is decoded whole (segment texts may split a character)."""
        return [
            tokenizer.decode(s.response_ids, skip_special_tokens=True) if self.resumed else s.text
            for s in self.finished_samples()
        ]

    def finished_trajectories(
        self, rewards: list[RewardResult], *, finished: float, reward_done: float
    ) -> list[Trajectory]:
        """The one place a finished group becomes trajectories for the buffer (both rollout paths)."""
        return [
            self._member(
                i,
                sample,
                reward=reward.reward,
                loss_mask=None if sample.loss_mask is None else TokenArray(sample.loss_mask),
                timings=Timings(submitted=self.submitted, finished=finished, reward_done=reward_done),
                metadata={
                    "task": self.task.metadata.get("task", ""),
                    "round": self.round,
                    **({"reward_error": reward.error} if reward.error else {}),
                },
            )
            for i, (sample, reward) in enumerate(zip(self.finished_samples(), rewards, strict=True))
        ]

    @classmethod
    def from_partials(cls, members: list[Trajectory], round_: int) -> GroupRollout:
        """Rebuild a retracted group from its pool members (any order); ValueError if one is missing."""
        first = members[0]
        meta = first.metadata
        samples: list[Sample | None] = [None] * first.group_size
        params: list[dict[str, Any] | None] = [None] * first.group_size
        for index, sampling in meta.get("missing", {}).items():
            params[int(index)] = sampling
        for t in members:
            i = int(t.sample_id.rsplit("-", 1)[1])
            samples[i] = Sample(
                response_ids=list(t.response_ids),
                behavior_logprobs=list(t.behavior_logprobs),
                token_versions=list(t.token_versions),
                text=t.metadata.get("text", ""),
                finish_reason=t.finish_reason,
            )
            params[i] = t.metadata["sampling"]
        absent = [i for i, p in enumerate(params) if p is None]
        if absent:
            raise ValueError(f"partial group {first.group_id} lacks members {absent}")
        return cls(
            group_id=first.group_id,
            task=TaskSample(prompt=meta["prompt"], metadata=meta["task_metadata"]),
            prompt_ids=list(first.prompt_ids),
            params=[p for p in params if p is not None],  # all of them (none is absent)
            samples=samples,
            round=round_,
            attempt=first.attempt + 1,
            submitted=first.timings.submitted,
            engine_url=first.engine_id,
            resumed=bool(meta.get("resumed")),
        )


async def drive(group: GroupRollout, pool, metrics: RolloutMetrics) -> None:
    """Generate until every sample finished or the group is stopped (retracted or dropped).

    One batched request per engine visit carries every unfinished sample as prompt + partial
    response with its remaining budget. An aborted sample that nobody stopped (a weight sync
    in abort mode) is simply continued; a failing engine is avoided on the next try; a refused
    request (HTTP 400) drops the group.
    """
    avoid = None
    for failures in itertools.count():
        while True:
            for i in group.unfinished:
                sample = group.samples[i]
                if remaining_budget(sample, group.params[i]) <= 0:  # interrupted on its very last token
                    assert sample is not None  # params ask for >= 1 token: only a started sample can run out
                    sample.finish_reason = "length"
            pending = group.unfinished
            if not pending or group.stopped:
                return
            engine = pool.pick(avoid)
            requests = [continuation(group.prompt_ids, group.samples[i], group.params[i]) for i in pending]
            number = next(group._requests)
            # Prefix-free ("/" ends each): SGLang's abort_request aborts every rid that starts with the one given.
            rids = [f"{group.group_id}-{i}.{number}/" for i in pending]
            client = pool.clients[engine]
            group.live = (engine, rids)
            pool.load[engine] += 1
            metrics.request_started(engine)
            tokens = 0
            try:
                results = await client.generate_batch(
                    [ids for ids, _ in requests],
                    sampling_params=[params for _, params in requests],
                    rid=rids,
                    return_logprob=True,
                )
                if len(results) != len(pending):
                    raise EngineProtocolError(f"{len(results)} results for {len(pending)} inputs")
                tokens = sum(len(r.output_ids) for r in results)
                extended = [extend(group.samples[i], result) for i, result in zip(pending, results)]
            except EngineClientError as exc:
                if isinstance(exc, EngineError) and exc.status == 400:
                    # The request itself is refused (too long for the context, ids outside the vocabulary):
                    # every engine serves the same model and would refuse it again, so the group ends here.
                    log.error("group %s dropped: engine %d refused its request: %s", group.group_id, engine, exc)
                    group.dropped = True
                    metrics.counts["groups_refused"] += 1
                    return
                log.warning("group %s on engine %d failed (%d failures): %s", group.group_id, engine, failures + 1, exc)
                if isinstance(exc, EngineConnectionError):
                    pool.mark_down(engine, exc)
                avoid = engine
                break
            finally:
                group.live = None
                pool.load[engine] -= 1
                metrics.request_finished(engine, tokens)
            group.engine_url = client.url
            for i, result, extended_sample in zip(pending, results, extended):
                group.samples[i] = extended_sample
                if result.aborted:
                    group.resumed = True
                    if not group.dropped:  # kept to continue: recycled (a dropped group's tokens are waste)
                        metrics.counts["tokens_recycled"] += len(extended_sample.response_ids)
        await asyncio.sleep(min(0.1 * 2**failures, MAX_BACKOFF_S))


async def stop_group(group: GroupRollout, pool) -> None:
    """Drop a group: its request in flight is aborted (no pause needed for single rids), its task then ends."""
    if group.dropped:
        return
    group.dropped = True
    if group.live is not None:
        engine, rids = group.live
        await abort_requests(pool.clients[engine], rids)


async def abort_requests(client, rids: list[str]) -> None:
    """Abort each rid: a running request ends after its current step and returns what it made.
    Engine failures are logged, not raised: a dead engine returns its requests as errors anyway."""
    outcomes = await asyncio.gather(*(client.abort_request(rid) for rid in rids), return_exceptions=True)
    for rid, outcome in zip(rids, outcomes):
        if isinstance(outcome, EngineClientError):
            log.warning("abort of %s on %s failed: %s", rid, client.url, outcome)
        elif isinstance(outcome, BaseException):
            raise outcome
