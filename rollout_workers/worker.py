"""The rollout worker process: keeps the engines busy within the staleness budget.

K group tasks run concurrently; each waits for admission (so nothing is generated
that would finish staler than eta), generates a GRPO group on the least-loaded
engine, scores it, and sends the trajectories to the buffer. A failing engine or
reward never stops the worker: the group is retried elsewhere, the reward scores 0.

    python -m rollout_workers.worker --config RUN_DIR/config.json --model-dir DIR \
        --engines URL,URL --submit E --versions E [--start-version T]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import msgspec

from async_rl.config import RunConfig, import_function
from async_rl.messages import Timings, Trajectory
from async_rl.transport import TrajectorySender, VersionSubscriber
from recipes.rewards import Reward
from recipes.tasks import TaskSample, task_samples
from rollout_workers.client import EngineClient, EngineClientError
from rollout_workers.generate import GenerationAborted, encode_prompt
from staleness.admission import AdmissionController
from staleness.config import StalenessConfig

log = logging.getLogger("rollout_worker")
MAX_BACKOFF_S = 5.0


class EnginePool:
    """Least-loaded choice over the engines; ties go round-robin."""

    def __init__(self, urls: list[str]):
        self.clients = [EngineClient(url) for url in urls]
        self.load = [0] * len(urls)
        self._turn = itertools.count()

    def pick(self, avoid: int | None = None) -> int:
        start = next(self._turn)
        order = [(start + i) % len(self.clients) for i in range(len(self.clients))]
        if avoid is not None and len(order) > 1:
            order.remove(avoid)
        return min(order, key=lambda i: self.load[i])

    async def close(self) -> None:
        for client in self.clients:
            await client.close()


class RolloutWorker:
    def __init__(self, config: RunConfig, model_dir: Path, engine_urls: list[str], start_version: int,
                 worker_index: int = 0):
        from transformers import AutoTokenizer

        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.generate = import_function(config.rollout.generate)
        self.reward = Reward.from_spec(config.rollout.reward, config.rollout.reward_timeout_s)
        self.pool = EnginePool(engine_urls)
        # Each of W workers owns 1/W of every batch, so together they keep the global bound.
        share = config.batch_size // config.rollout.workers
        staleness = StalenessConfig(eta=config.staleness.eta, batch_size=share,
                                    max_in_flight=config.staleness.max_in_flight)
        # Everything before the start version was trained on; in-buffer leftovers are re-generated.
        self.admission = AdmissionController.from_counts(staleness, version=start_version, accepted=start_version * share)
        # Workers draw different prompts: each offsets the task seed by its index.
        self.samples: Iterator[TaskSample] = task_samples(msgspec.structs.replace(config.task, seed=config.task.seed + worker_index))
        self.group_ids = (f"w{worker_index}-v{start_version}-g{i}" for i in itertools.count())
        self.counts = Counter()
        rollout = config.rollout
        self.sampling_params = {"max_new_tokens": rollout.max_new_tokens, "temperature": rollout.temperature,
                                "top_p": rollout.top_p}

    @property
    def concurrency(self) -> int:
        """Enough group tasks to fill this worker's admission budget: its share of eta + 1 batches."""
        return (self.config.staleness.eta + 1) * self.config.trainer.groups_per_step // self.config.rollout.workers

    async def run(self, submit: str, versions: str) -> None:
        subscriber = VersionSubscriber(versions)
        try:
            async with TrajectorySender(submit) as sender, asyncio.TaskGroup() as tasks:
                tasks.create_task(self._follow_versions(subscriber))
                for _ in range(self.concurrency):
                    tasks.create_task(self._group_loop(sender))
        finally:
            subscriber.close()
            await self.pool.close()

    async def _follow_versions(self, subscriber: VersionSubscriber) -> None:
        while True:
            notice = await subscriber.next()
            if notice.version > self.admission.version:
                self.admission.on_version(notice.version)
            if notice.version % 10 == 0:
                log.info("version %d: %s %s", notice.version, dict(self.counts), self.admission.snapshot())

    async def _group_loop(self, sender: TrajectorySender) -> None:
        group_size = self.config.rollout.group_size
        while True:
            await self.admission.admit(group_size)
            task = next(self.samples, None)
            if task is None:
                log.info("the task source is exhausted: this group task stops")
                self.admission.on_dropped(group_size)
                return
            group_id = next(self.group_ids)
            trajectories = await self._rollout_group(task, group_id)
            for trajectory in trajectories:
                await sender.send(trajectory)
            self.admission.on_finished(group_size)
            self.counts["groups"] += 1

    async def _rollout_group(self, task: TaskSample, group_id: str) -> list[Trajectory]:
        """Generate and score one group, retrying on another engine with backoff until it succeeds."""
        rollout = self.config.rollout
        prompt_ids = encode_prompt(self.tokenizer, task.prompt, rollout.chat_template)
        avoid = None
        for attempt in itertools.count(1):
            engine = self.pool.pick(avoid)
            self.pool.load[engine] += 1
            submitted = time.time()
            try:
                samples = await self.generate(self.pool.clients[engine], prompt_ids, self.sampling_params, rollout.group_size)
            except (EngineClientError, GenerationAborted, RuntimeError) as exc:
                self.counts["engine_errors"] += 1
                log.warning("group %s attempt %d on engine %d failed: %s", group_id, attempt, engine, exc)
                avoid = engine
                await asyncio.sleep(min(0.1 * 2 ** (attempt - 1), MAX_BACKOFF_S))
                continue
            finally:
                self.pool.load[engine] -= 1
            finished = time.time()
            rewards = await asyncio.gather(*(self.reward(task.prompt, s.text, task.metadata) for s in samples))
            reward_done = time.time()
            return [
                Trajectory(
                    sample_id=f"{group_id}-{i}", group_id=group_id, group_size=rollout.group_size,
                    prompt_ids=prompt_ids, response_ids=s.response_ids, behavior_logprobs=s.behavior_logprobs,
                    token_versions=s.token_versions, reward=r.reward, finish_reason=s.finish_reason,
                    loss_mask=s.loss_mask, engine_id=self.pool.clients[engine].url,
                    attempt=attempt,
                    timings=Timings(submitted=submitted, finished=finished, reward_done=reward_done),
                    metadata={"task": task.metadata.get("task", ""), **({"reward_error": r.error} if r.error else {})},
                )
                for i, (s, r) in enumerate(zip(samples, rewards))
            ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--engines", required=True, help="comma-separated engine URLs")
    parser.add_argument("--submit", required=True)
    parser.add_argument("--versions", required=True)
    parser.add_argument("--start-version", type=int, default=0)
    parser.add_argument("--worker-index", type=int, default=0, help="keeps group ids unique across workers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = msgspec.json.decode(args.config.read_bytes(), type=RunConfig)
    worker = RolloutWorker(config, args.model_dir, args.engines.split(","), args.start_version, args.worker_index)
    asyncio.run(worker.run(args.submit, args.versions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
