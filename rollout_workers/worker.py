"""The rollout worker process: keeps the engines busy within the staleness budget.

Plain async: K group tasks run concurrently; each waits for admission (so nothing is
generated that would finish staler than eta), generates a GRPO group on the least-loaded
engine, scores it, and sends the trajectories to the buffer. With april.enabled the
APRIL controller (rollout_workers/april.py) decides instead when groups start, and
retracts and recycles the long tail. A failing engine or reward never stops the worker:
the group is retried elsewhere, the reward scores 0. With a resumable generate function
(rollout_workers/generate.py) an interrupted request keeps its tokens in both modes; in
flight, a group that can no longer meet eta is dropped at once and counted as waste.

    python -m rollout_workers.worker --config RUN_DIR/config.json --model-dir DIR \
        --engines URL,URL --submit E --versions E [--serve E] [--start-version T]

With the run's client keys in its environment (zmq_auth.RunKeys.client_env) every socket it opens
(submit, serve, versions) is a CURVE client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import logging
import math
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import msgspec

from async_rl import stacks, zmq_auth
from async_rl.config import RunConfig, read_run_config
from async_rl.messages import Trajectory
from async_rl.supervisor import RESTARTS_ENV
from async_rl.trace import TRACE_DIR, Tracer
from async_rl.transport import BufferClient, TrajectorySender, VersionSubscriber
from rollout_workers.april import AprilController, AprilPlan
from rollout_workers.client import EngineClient, EngineClientError, EngineConnectionError, wait_until_healthy
from rollout_workers.engine.model import vocab_size_of
from rollout_workers.engine_registry import follow_moved
from rollout_workers.generate import GenerationAborted, RolloutPlugins, Sample, encode_prompt, load_tokenizer
from rollout_workers.group import MAX_BACKOFF_S, GroupRollout, drive, stop_group
from rollout_workers.reward import Reward
from rollout_workers.rollout_metrics import RolloutMetrics
from rollout_workers.tasks import TaskSample, task_samples
from staleness.admission import AdmissionController

log = logging.getLogger("rollout_worker")


REALIGN_WAIT_S = 3.0  # three of the publisher's repeats
RESTART_TO_REALIGN = 75  # the exit code of a worker that restarts to align to a restarted trainer


class TrainerWentBack(RuntimeError):
    """The trainer restarted from an older checkpoint: the worker's counts no longer hold."""


class EnginePool:
    """Least-loaded choice over the engines that are up; ties go round-robin.

    An engine a request could not reach is down: no request goes to it until it answers /health
    again and serves the trainer's current version (a restarted engine starts from older weights
    and gets the current ones at the next sync), so its tokens never come from a policy the
    trainer has moved past while it was away.
    """

    REPROBE_S = 0.5

    def __init__(
        self, urls: list[str], api_key: str | None = None, vocab_size: int | None = None, run_dir: Path | None = None
    ):
        self._new_client = functools.partial(EngineClient, api_key=api_key, vocab_size=vocab_size)
        self.clients = [self._new_client(url) for url in urls]
        self.run_dir = run_dir  # where the run's engine registry says where a restarted engine listens
        self.load = [0] * len(urls)
        self.down: set[int] = set()
        self.version = 0  # the trainer's newest announced version
        self._turn = itertools.count()
        self._probes: dict[int, asyncio.Task] = {}

    def pick(self, avoid: int | None = None) -> int:
        start = next(self._turn)
        order = [(start + i) % len(self.clients) for i in range(len(self.clients))]
        up = [i for i in order if i not in self.down] or order  # all down: fail fast, retry with backoff
        if avoid is not None and len(up) > 1 and avoid in up:
            up.remove(avoid)
        return min(up, key=lambda i: self.load[i])

    def note_version(self, version: int) -> None:
        """Every engine that is up serves `version` or newer (the trainer announces a version once they are updated)."""
        self.version = max(self.version, version)
        for i, client in enumerate(self.clients):
            if i not in self.down:
                client.note_version(version)

    def mark_down(self, engine: int, reason: object) -> None:
        if engine in self.down:
            return
        log.warning("engine %d (%s) is down: %s; routing around it", engine, self.clients[engine].url, reason)
        self.down.add(engine)
        self._probes[engine] = asyncio.create_task(self._await_up(engine), name=f"probe-engine-{engine}")

    async def follow(self) -> list[int]:
        """Replace the clients of engines the run's registry puts elsewhere now; their indices."""
        moved = await follow_moved(self.clients, self.run_dir, self._new_client) if self.run_dir else []
        for engine in moved:
            log.info("engine %d moved to %s", engine, self.clients[engine].url)
        return moved

    async def _await_up(self, engine: int) -> None:
        while True:
            await asyncio.sleep(self.REPROBE_S)
            await self.follow()
            client = self.clients[engine]
            if not await client.is_healthy():
                continue
            try:
                serving = int(await client.get_weight_version())
            except (EngineClientError, ValueError):
                continue
            if serving >= self.version:
                break
        log.info("engine %d (%s) is back at version %d", engine, client.url, serving)
        client.note_version(serving)
        self.down.discard(engine)
        del self._probes[engine]

    async def close(self) -> None:
        for probe in self._probes.values():
            probe.cancel()
        for client in self.clients:
            await client.close()


class RolloutWorker:
    def __init__(
        self,
        config: RunConfig,
        model_dir: Path,
        engine_urls: list[str],
        start_version: int,
        worker_index: int = 0,
        curve: zmq_auth.CurveClient | None = None,
    ):
        self.config = config
        self.index = worker_index
        self.curve = curve  # for every socket to the buffer and the trainer
        # Group ids are the prompt's place in this worker's task stream (the same on every start):
        # a restarted worker asks the buffer which it has, and generates the others (run()).
        self.restarts = int(os.environ.get(RESTARTS_ENV, "0"))
        start = f"v{start_version}" + (f"r{self.restarts}" if self.restarts else "")
        self.tokenizer = load_tokenizer(model_dir)
        self.plugins = RolloutPlugins.from_config(config.rollout)
        self.reward = Reward.from_spec(config.rollout.reward, config.rollout.reward_timeout_s)
        self.pool = EnginePool(
            engine_urls, config.engine.api_key, vocab_size_of(model_dir), run_dir=Path(config.run.output_dir)
        )
        self.pool.note_version(start_version)  # engines start at the trainer's version
        self.april = config.april.enabled  # the config refuses APRIL with a custom generate function
        # Each of W workers owns 1/W of every batch, so together they keep the global bound.
        self.share = config.trainer.groups_per_step // config.rollout.workers
        # APRIL over-provisions by ceil(alpha * b) groups beyond AReaL's limit (rollout_workers/april.py).
        extra = math.ceil(config.april.alpha) if self.april else 0
        staleness = msgspec.structs.replace(config.staleness, eta=config.staleness.eta + extra)
        batch = self.share * config.rollout.group_size
        self.admission = AdmissionController.from_counts(
            staleness, batch, version=start_version, accepted=start_version * batch
        )  # until run() has asked the buffer
        self.tasks: Iterator[tuple[str, TaskSample]] = self._task_stream(set())
        self.counts: Counter[str] = Counter()
        rollout = config.rollout
        self.sampling_params = {
            "max_new_tokens": rollout.max_new_tokens,
            "temperature": rollout.temperature,
            "top_p": rollout.top_p,
        }
        run_dir = Path(config.run.output_dir)
        self.tracer = Tracer(
            run_dir / TRACE_DIR / f"worker{worker_index}-{start}.json",
            process_name=f"rollout worker {worker_index}",
        )
        self.metrics = RolloutMetrics(run_dir, worker_index, len(engine_urls), self.share, self.tracer)
        self.active: dict[str, GroupRollout] = {}
        self.credited: set[str] = set()  # dropped group ids already given back (notices repeat)
        self.controller: AprilController | None = None
        # Set by run(), for as long as it runs:
        self.sender: TrajectorySender
        self.buffer: BufferClient  # with APRIL only
        self._tasks: asyncio.TaskGroup

    def _task_stream(self, done: set[str]) -> Iterator[tuple[str, TaskSample]]:
        """(group id, prompt) in this worker's order, without the groups in `done`. Workers draw
        different prompts: each offsets the task seed by its index."""
        seed = self.config.task.seed + self.index
        for n, task in enumerate(task_samples(msgspec.structs.replace(self.config.task, seed=seed))):
            if (group_id := f"w{self.index}-g{n}") not in done:
                yield group_id, task

    async def _trainer_version(self, subscriber: VersionSubscriber) -> int:
        """A restarted worker starts from the trainer's current version (the publisher repeats its
        latest notice), not from the version the run began at."""
        try:
            async with asyncio.timeout(REALIGN_WAIT_S):
                notice = await subscriber.next()
        except TimeoutError:  # nothing published yet: the trainer is still at the start version
            return self.admission.version
        log.info("restart %d: aligned to the trainer's version %d", self.restarts, notice.version)
        return notice.version

    async def _recover(self, serve: str, version: int) -> None:
        """Resume from what the buffer holds of this worker's groups: its admission counts every sample
        trained or waiting, its prompt stream skips the groups done and generates the rest again (one
        in flight at a crash, or with only some members stored, whose stored members are deduplicated)."""
        async with BufferClient(serve, curve=self.curve) as buffer:
            recovery = await buffer.recover_worker(f"w{self.index}-", self.config.rollout.group_size)
        self.admission = AdmissionController.from_counts(
            self.admission.config, self.admission.batch_size, version=version, accepted=recovery.accepted_samples
        )
        self.pool.note_version(version)
        self.tasks = self._task_stream(set(recovery.done_groups))
        if recovery.done_groups or recovery.open_groups:
            log.info(
                "recovered from the buffer at version %d: %d samples accepted, %d groups done, %d to finish",
                version,
                recovery.accepted_samples,
                len(recovery.done_groups),
                len(recovery.open_groups),
            )

    @property
    def concurrency(self) -> int:
        """Enough group tasks to fill this worker's admission budget: its share of eta + 1 batches."""
        return (self.config.staleness.eta + 1) * self.share

    async def run(self, submit: str, versions: str, serve: str | None = None) -> None:
        subscriber = VersionSubscriber(versions, curve=self.curve)
        try:
            await wait_until_healthy(
                self.pool.clients, self.config.engine.start_timeout_s, before_each=self.pool.follow
            )
            version = await self._trainer_version(subscriber) if self.restarts else self.admission.version
            if serve is not None:
                await self._recover(serve, version)
            async with contextlib.AsyncExitStack() as stack:
                self.sender = await stack.enter_async_context(TrajectorySender(submit, curve=self.curve))
                if self.april:
                    if serve is None:
                        raise ValueError("april.enabled needs the buffer's serve endpoint (--serve)")
                    self.buffer = await stack.enter_async_context(BufferClient(serve, curve=self.curve))
                self._tasks = await stack.enter_async_context(asyncio.TaskGroup())
                self._tasks.create_task(self._follow_versions(subscriber))
                if self.april:
                    self.controller = self._april_controller()
                    self._tasks.create_task(self.controller.run())
                    self.controller.wake()
                else:
                    loop = self._group_loop if self.plugins.plan is not None else self._custom_generate_loop
                    for _ in range(self.concurrency):
                        self._tasks.create_task(loop())
        finally:
            self.metrics.write(self.admission.version)  # the final line
            self.tracer.close()
            subscriber.close()
            await self.pool.close()

    def _april_controller(self) -> AprilController:
        april, eta = self.config.april, self.config.staleness.eta
        return AprilController(
            AprilPlan(share=self.share, alpha=april.alpha, eta=eta),
            self.pool,
            self.tracer,
            host=self,
            group_size=self.config.rollout.group_size,
        )

    # ---- what the APRIL controller asks of its worker (april.GroupHost) ------
    def start_group(self, group: GroupRollout) -> None:
        """Run `group` to its end in the worker's task group."""
        self._tasks.create_task(self._run_group(group))

    # ---- versions -----------------------------------------------------------
    async def _follow_versions(self, subscriber: VersionSubscriber) -> None:
        while True:
            notice = await subscriber.next()
            if notice.version < self.admission.version:
                raise TrainerWentBack(
                    f"the trainer went back from version {self.admission.version} to {notice.version} "
                    "(restarted from a checkpoint): this worker restarts to align its admission to it"
                )
            self._credit_dropped(getattr(notice, "dropped_groups", {}))
            if notice.version > self.admission.version:
                self.pool.note_version(notice.version)
                self.admission.on_version(notice.version)
                await self._drop_stale(notice.version)
                self.metrics.write(notice.version)
                if self.controller is not None:
                    self.controller.wake()
                if notice.version % 10 == 0:
                    log.info(
                        "version %d: %s %s %s",
                        notice.version,
                        dict(self.counts),
                        dict(self.metrics.counts),
                        self.admission.snapshot(),
                    )

    def _credit_dropped(self, dropped_groups: dict[str, int]) -> None:
        """Samples of this worker's groups the trainer dropped will never be trained: give the budget back."""
        prefix = f"w{self.index}-"
        for group_id, n in dropped_groups.items():
            if group_id.startswith(prefix) and group_id not in self.credited and n > 0:
                self.credited.add(group_id)
                self.admission.on_dropped(min(n, self.admission.accepted), accepted=True)
        if self.controller is not None:
            self.controller.wake()

    async def _drop_stale(self, version: int) -> None:
        """Groups in flight whose oldest token is older than version - eta can never be trained: stop them now."""
        for group in list(self.active.values()):
            oldest = group.oldest_version
            if oldest is not None and oldest < version - self.config.staleness.eta:
                log.info("dropping group %s: oldest token v%d is too stale at v%d", group.group_id, oldest, version)
                await stop_group(group, self.pool)

    # ---- resumable groups (plain async and APRIL) ---------------------------
    async def _group_loop(self) -> None:
        while (group := await self.new_group(0)) is not None:
            self.active[group.group_id] = group
            await self._run_group(group)
        log.info("the task source is exhausted: this group task stops")

    async def _admitted_task(self) -> tuple[str, TaskSample] | None:
        """Admit a group's samples (waits for budget) and draw its (group id, prompt); None once the tasks run out."""
        group_size = self.config.rollout.group_size
        await self.admission.admit(group_size)
        task = next(self.tasks, None)
        if task is None:
            self.admission.on_dropped(group_size)
        return task

    async def new_group(self, round_: int) -> GroupRollout | None:
        """Admit (waits for budget) and return a fresh group; None once the task source is exhausted."""
        drawn = await self._admitted_task()
        if drawn is None:
            return None
        group_id, task = drawn
        group_size = self.config.rollout.group_size
        prompt_ids = encode_prompt(self.tokenizer, task.prompt, self.config.rollout.chat_template)
        plan = self.plugins.plan
        assert plan is not None, "resumable groups come from a sample plan"
        return GroupRollout(
            group_id=group_id,
            task=task,
            prompt_ids=prompt_ids,
            params=plan(self.sampling_params, group_size),
            samples=[None] * group_size,
            round=round_,
        )

    async def _run_group(self, group: GroupRollout) -> None:
        self.metrics.group_started()
        try:
            await drive(group, self.pool, self.metrics)
            if group.dropped:
                self.account_drop(group)
            elif group.complete:
                await self._submit(group)
            else:  # retracted: its partial responses wait in the buffer's pool for the next round
                for trajectory in group.partial_trajectories():
                    await self.sender.send(trajectory)
        finally:
            self.active.pop(group.group_id, None)
            self.metrics.group_ended()
            if self.controller is not None:
                self.controller.group_ended(group)
            group.ended.set()

    def account_drop(self, group: GroupRollout, *, partial: bool = False, admitted: bool = True) -> None:
        """`group` will never be trained: its budget back (if it was admitted), its tokens counted as waste."""
        if admitted:
            self.admission.on_dropped(group.size)
        self.metrics.counts["tokens_wasted"] += group.tokens
        if partial:
            self.metrics.counts["partials_dropped_stale"] += group.size

    async def _submit(self, group: GroupRollout) -> None:
        """Score a finished group and send its trajectories; admission counts it as accepted."""
        finished = time.time()
        rewards = await asyncio.gather(
            *(
                self.reward(group.task.prompt, text, group.task.metadata)
                for text in group.response_texts(self.tokenizer)
            )
        )
        for trajectory in group.finished_trajectories(rewards, finished=finished, reward_done=time.time()):
            await self.sender.send(trajectory)
        self.admission.on_finished(group.size)
        self.metrics.counts["groups_completed"] += 1
        self.metrics.counts["samples_completed"] += group.size

    async def take_partials(self, max_n: int, min_version: int) -> list[GroupRollout]:
        """Whole retracted groups back from the pool, once every partial sent so far is durable there."""
        await self.sender.flush()
        trajectories = await self.buffer.take_partials(max_n, min_version, group_prefix=f"w{self.index}-")
        members: dict[str, list[Trajectory]] = {}
        for trajectory in trajectories:
            members.setdefault(trajectory.group_id, []).append(trajectory)
        groups = []
        for group_members in members.values():
            try:
                groups.append(GroupRollout.from_partials(group_members, round_=0))
            except ValueError as exc:  # a member was too stale for the pool: the whole group is
                log.info("%s: dropped", exc)
        return groups

    # ---- a custom generate function (multi-turn, tools): no resumption --------
    async def _custom_generate_loop(self) -> None:
        while (drawn := await self._admitted_task()) is not None:
            self.metrics.group_started()
            try:
                group = await self._generate_group(drawn[1], drawn[0])
            finally:
                self.metrics.group_ended()
            await self._submit(group)
        log.info("the task source is exhausted: this group task stops")

    async def _generate_group(self, task: TaskSample, group_id: str) -> GroupRollout:
        """One call of the custom generate function, retried on another engine with backoff until it succeeds."""
        rollout = self.config.rollout
        prompt_ids = encode_prompt(self.tokenizer, task.prompt, rollout.chat_template)
        generate = self.plugins.generate
        assert generate is not None, "whole groups come from a custom generate function"
        avoid, attempt = None, 0
        while True:
            attempt += 1
            engine = self.pool.pick(avoid)
            self.pool.load[engine] += 1
            self.metrics.request_started(engine)
            submitted = time.time()
            samples: list[Sample] = []
            try:
                samples = await generate(
                    self.pool.clients[engine], prompt_ids, self.sampling_params, rollout.group_size
                )
            except (EngineClientError, GenerationAborted, RuntimeError) as exc:
                self.counts["engine_errors"] += 1
                log.warning("group %s attempt %d on engine %d failed: %s", group_id, attempt, engine, exc)
                if isinstance(exc, EngineConnectionError):
                    self.pool.mark_down(engine, exc)
                avoid = engine
                await asyncio.sleep(min(0.1 * 2 ** (attempt - 1), MAX_BACKOFF_S))
                continue
            finally:
                self.pool.load[engine] -= 1
                self.metrics.request_finished(engine, sum(len(s.response_ids) for s in samples))
            return GroupRollout(
                group_id=group_id,
                task=task,
                prompt_ids=prompt_ids,
                params=[dict(self.sampling_params) for _ in samples],
                samples=list(samples),
                attempt=attempt,
                submitted=submitted,
                engine_url=self.pool.clients[engine].url,
            )


async def _run_until_signalled(worker: RolloutWorker, args: argparse.Namespace) -> None:
    """SIGTERM/SIGINT cancel the run, so the worker still writes its final metrics line and closes its trace."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    await worker.run(args.submit, args.versions, args.serve)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--engines", required=True, help="comma-separated engine URLs")
    parser.add_argument("--submit", required=True)
    parser.add_argument("--versions", required=True)
    parser.add_argument("--serve", help="the buffer's serve endpoint (APRIL takes partial rollouts from it)")
    parser.add_argument("--start-version", type=int, default=0)
    parser.add_argument("--worker-index", type=int, default=0, help="keeps group ids unique across workers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stacks.install(f"worker{args.worker_index}")
    config = read_run_config(args.config)
    curve = zmq_auth.client_keys_from_env()
    engines = args.engines.split(",")
    worker = RolloutWorker(config, args.model_dir, engines, args.start_version, args.worker_index, curve=curve)
    try:
        asyncio.run(_run_until_signalled(worker, args))
    except asyncio.CancelledError:
        pass
    except ExceptionGroup as errors:  # from the worker's task group
        went_back = errors.subgroup(TrainerWentBack)
        if went_back is None:
            raise
        log.warning("%s", went_back.exceptions[0])
        return RESTART_TO_REALIGN
    return 0


if __name__ == "__main__":
    from async_rl.process_exit import exit_now

    exit_now(main())
