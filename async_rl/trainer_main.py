"""The trainer process: take a batch, train, sync the engines, publish, repeat.

    python -m async_rl.trainer_main --config RUN_DIR/config.json --model-dir DIR \
        --engines URL,URL --serve E --versions E

Exits 0 after trainer.total_steps versions (the supervisor then ends the run).
A restart resumes from the latest checkpoint, continuing the version count.
With the run's CURVE keys in its environment (zmq_auth.RunKeys: server and client variables both),
the versions PUB is a CURVE server and the buffer client a CURVE client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import time
from collections import Counter
from pathlib import Path

import msgspec

from async_rl import stacks, zmq_auth
from async_rl.config import RunConfig, read_run_config
from async_rl.messages import BatchResponse, Trajectory, WeightsPublished, encode, make_decoder
from async_rl.metrics import MetricsSink, read_metrics
from async_rl.supervisor import RESTARTS_ENV
from async_rl.trace import TRACE_DIR, Tracer
from async_rl.transport import BufferClient, VersionPublisher
from async_rl.weight_sync import LIVE_METHODS, broadcast_group, export_weights, load_weights
from rollout_workers.client import EngineClient, wait_until_healthy
from rollout_workers.engine_registry import follow_moved

log = logging.getLogger("trainer")
BATCH_WAIT_S = 30.0
TRACK = "trainer"
_batch_decoder = make_decoder(list[Trajectory])


def trainer_context(config: RunConfig, model_dir: Path):
    """What the run decides for the trainer; the recipe's [trainer] table is its TrainerConfig as is."""
    from async_rl.trainer.config import TrainerContext

    return TrainerContext(
        model_path=str(model_dir),
        ckpt_dir=str(config.output_path(config.trainer.ckpt_dir, "checkpoints")),
        device=config.trainer.device or config.model.device,
        compute_dtype="bfloat16" if config.model.dtype == "bfloat16" else "float32",
        max_staleness=config.staleness.eta,
        # Engines report logprobs of the distribution they sampled from: softmax(logits / T).
        logprob_temperature=config.rollout.temperature or 1.0,
        one_row_per_microbatch=config.engine.trainer_logprobs,
    )


async def get_batch(
    buffer: BufferClient, version: int, config: RunConfig, durable_version: int, refused_served: bool = False
) -> tuple[BatchResponse, Counter[str]]:
    """Block until the buffer serves a batch; a timeout only means generation is slower than training.

    Groups outside [0, eta] staleness are dropped with a warning rather than failing the step:
    after a restart from an older checkpoint the buffer can still hold samples from versions
    the resumed trainer has not reached. Returns the batch (possibly emptied by that) and the
    dropped samples per group.
    """
    from staleness.metrics import stale_samples

    while True:
        response = await buffer.get_batch(
            version,
            config.trainer.groups_per_step,
            config.staleness.eta,
            timeout=BATCH_WAIT_S,
            durable_version=durable_version,
            refused_served=refused_served,
        )
        refused_served = False
        dropped: Counter[str] = Counter(response.dropped_groups)  # the buffer's own stale drops
        if response.error or not response.trajectories:
            if dropped:  # announced at once: the workers need that budget back to fill a batch
                response.trajectories = []
                return response, dropped
            log.info("waiting for a batch at version %d: %s", version, response.error or "empty")
            continue
        offenders = set(stale_samples(response.trajectories, version, config.staleness.eta))
        if offenders:
            bad_groups = {t.group_id for t in response.trajectories if t.sample_id in offenders}
            log.warning(
                "dropped %d group(s) outside staleness [0, %d] at version %d",
                len(bad_groups),
                config.staleness.eta,
                version,
            )
            dropped.update(t.group_id for t in response.trajectories if t.group_id in bad_groups)
            response.trajectories = [t for t in response.trajectories if t.group_id not in bad_groups]
            response.dropped_stale += len(offenders)
        return response, dropped


TRAINED_NAME = "trained_samples.jsonl"


class TrainedLog:
    """RUN_DIR/trained_samples.jsonl: per step, the version trained at, the trainer start (restarts) and
    the sample ids. A resumed trainer writes its versions again; the last line of a version is the one
    the model's history holds. Read by benchmarks/soak.py and the fault-tolerance tests."""

    def __init__(self, path: Path):
        self.file = path.open("ab")

    def write(self, version: int, start: int, trajectories: list[Trajectory]) -> None:
        line = {"version": version, "start": start, "sample_ids": [t.sample_id for t in trajectories]}
        self.file.write(msgspec.json.encode(line) + b"\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def trained_history(path: Path) -> dict[int, list[str]]:
    """version -> the sample ids the final model's history trained on at that version: a line for a
    version already seen (a trainer resumed below where the last one got) replaces that version and
    every later one. A torn last line, from a crash while writing it, is skipped."""
    history: dict[int, list[str]] = {}
    newest = -1
    for line in read_metrics(path):  # a JSONL reader that skips a torn line
        version = line["version"]
        for later in range(version, newest + 1):
            history.pop(later, None)
        history[version] = line["sample_ids"]
        newest = version
    return history


async def train(
    config: RunConfig,
    model_dir: Path,
    engine_urls: list[str],
    serve: str,
    versions: str,
    *,
    curve_server: zmq_auth.CurveServer | None = None,
    curve_client: zmq_auth.CurveClient | None = None,
) -> None:
    """One trainer process, or one rank of several under torchrun (trainer.processes > 1, FSDP2):
    rank 0 leads (buffer, engines, metrics, versions) and hands each batch to the other ranks.
    `curve_server` secures the versions PUB it binds, `curve_client` its buffer connection."""
    from async_rl.trainer.trainer import trainer_class

    trainer = trainer_class(config.trainer).resume_or_new(config.trainer, trainer_context(config, model_dir))
    if trainer.rank == 0:
        await lead(trainer, config, engine_urls, serve, versions, curve_server, curve_client)
    else:
        await asyncio.to_thread(follow, trainer, config)


def share_batch(trainer, trajectories: list[Trajectory] | None) -> list[Trajectory]:
    """Rank 0's batch (given there, None elsewhere) on every rank: msgpack bytes over the trainer's
    process group, never pickle."""
    if trainer.world_size == 1:
        assert trajectories is not None
        return trajectories
    from async_rl.trainer.distributed import broadcast_bytes

    payload = broadcast_bytes(encode(trajectories) if trajectories is not None else None, trainer.device)
    return _batch_decoder.decode(payload)


class CheckpointClock:
    """When to checkpoint: every trainer.checkpoint_interval steps, every checkpoint_interval_s seconds
    since the last one, and at the last step. Every rank must agree (a checkpoint is a collective under
    FSDP): with several ranks and a time interval, rank 0's clock decides and broadcasts its answer."""

    def __init__(self, trainer, config: RunConfig):
        self.trainer = trainer
        self.config = config.trainer
        self.last = time.monotonic()

    def due(self, version: int) -> bool:
        interval, interval_s = self.config.checkpoint_interval, self.config.checkpoint_interval_s
        due = bool(interval and version % interval == 0) or version == self.config.total_steps
        due = due or bool(interval_s and time.monotonic() - self.last >= interval_s)
        if interval_s and self.trainer.world_size > 1:
            from async_rl.trainer.distributed import broadcast_bytes

            answer = (b"1" if due else b"0") if self.trainer.rank == 0 else None
            due = broadcast_bytes(answer, self.trainer.device) == b"1"
        if due:
            self.last = time.monotonic()
        return due


def follow(trainer, config: RunConfig) -> None:
    """Ranks > 0: train on rank 0's batches and take part in every collective rank 0 runs
    (the weight export of each sync, checkpoints), in the same order."""
    from async_rl.trainer.batch import BatchError

    weights_dir = config.output_path(config.weight_sync.dir, "weights")
    clock = CheckpointClock(trainer, config)
    while trainer.version < config.trainer.total_steps:
        try:
            step = trainer.train_step(share_batch(trainer, None))
        except BatchError:
            continue  # rank 0 refused the same batch
        trainer.export_weights(config.weight_sync.method, weights_dir)  # rank 0 does the same in sync_weights
        if clock.due(step.version):
            trainer.save_checkpoint()


async def lead(
    trainer,
    config: RunConfig,
    engine_urls: list[str],
    serve: str,
    versions: str,
    curve_server: zmq_auth.CurveServer | None = None,
    curve_client: zmq_auth.CurveClient | None = None,
) -> None:
    """Dropped samples (stale groups, a batch refused with BatchError) were already counted as
    accepted by the workers' admission, so notices hand them back in `dropped_groups`: the next
    version's notice carries every drop since the previous version's. A drop that leaves nothing
    to train is also announced at once, at the unchanged version (with eta = 0 the workers would
    otherwise wait for budget while the trainer waits for a batch). A group id can therefore
    arrive twice, and the publisher repeats its latest notice: workers credit each group id once.
    """
    from async_rl.trainer.batch import BatchError

    run_dir = Path(config.run.output_dir)
    weights_dir = config.output_path(config.weight_sync.dir, "weights")
    new_client = functools.partial(EngineClient, api_key=config.engine.api_key)
    clients = [new_client(url) for url in engine_urls]  # by engine index: one that moved is replaced
    publisher = VersionPublisher(versions, curve=curve_server)
    sink = MetricsSink(
        run_dir, wandb=config.run.wandb, wandb_project=config.run.wandb_project, config=msgspec.to_builtins(config)
    )
    # One file per start: a resumed run's trace keeps the stretch before the restart.
    restarts = int(os.environ.get(RESTARTS_ENV, "0"))  # a restart at the same version keeps the earlier file
    suffix = f"r{restarts}" if restarts else ""
    tracer = Tracer(run_dir / TRACE_DIR / f"trainer-v{trainer.version}{suffix}.json", process_name="trainer")
    sync_config = config.weight_sync
    method = sync_config.method
    total = config.trainer.total_steps
    dropped: Counter[str] = Counter()
    dropped_batches = 0
    clock = CheckpointClock(trainer, config)
    # The newest version a restarted trainer resumes at (its checkpoint, or with none kept its current
    # version): the buffer keeps every batch it served since, to serve each again after a crash.
    checkpoints = bool(trainer.context.ckpt_dir)
    durable = trainer.version
    trained_log = TrainedLog(run_dir / TRAINED_NAME)
    try:
        async with contextlib.AsyncExitStack() as stack:
            follow = functools.partial(follow_moved, clients, run_dir, new_client)  # an engine restarted elsewhere
            await wait_until_healthy(clients, config.engine.start_timeout_s, before_each=follow)
            buffer = await stack.enter_async_context(BufferClient(serve, curve=curve_client))
            group = None
            if method == "distributed":
                group = await stack.enter_async_context(broadcast_group(clients, trainer.device))

            async def load_into_engines(export):
                if method != "distributed":  # a broadcast group's engines are never restarted
                    await follow()
                return await load_weights(
                    export,
                    clients,
                    method,
                    sync_config.pause_mode,
                    weights_dir,
                    group,
                    tracer,
                    timeout_s=sync_config.timeout_s,
                )

            if trainer.version > 0:
                # Resumed: the engines may serve newer weights (a trainer that crashed after this
                # checkpoint synced them): they serve the checkpoint's again, then workers align to it.
                await load_into_engines(await export_weights(trainer, method, weights_dir, tracer))
                await publisher.publish(WeightsPublished(version=trainer.version, method=method))
            last = time.perf_counter()

            async def publish(step, batch: BatchResponse, export, dropped_now: dict[str, int], after) -> None:
                """The engines load the step's weights, then its notice goes out and its metrics line is
                written: meanwhile the trainer waits for the next batch (and with disk sync trains on it).
                Versions load in order: after `after`, the previous version's publish (its folder, with
                disk sync, is written meanwhile)."""
                nonlocal last
                if after is not None:
                    await after
                sync = await load_into_engines(export)
                await publisher.publish(
                    WeightsPublished(
                        version=step.version,
                        method=method,
                        path=sync.path,
                        sync_seconds=sync.seconds,
                        dropped_groups=dropped_now,
                    )
                )
                now = time.perf_counter()
                metrics = dict(step.metrics)
                metrics.update({f"staleness/hist/{k}": v for k, v in step.staleness_histogram.items()})
                metrics.update(sync.metrics())
                metrics.update(
                    {
                        "buffer/dropped_stale": batch.dropped_stale,
                        "trainer/dropped_batches": dropped_batches,
                        "throughput/samples_per_s": len(batch.trajectories) / (now - last),
                        "throughput/tokens_per_s": metrics.get("tokens_per_s", 0.0),
                    }
                )
                last = now
                if step.version % config.run.log_interval == 0 or step.version == total:
                    sink.log(step.version, metrics)

            async with asyncio.TaskGroup() as background:
                publishing: asyncio.Task | None = None
                writing: asyncio.Task | None = None  # disk: the newest snapshot's folder being written

                async def published() -> None:
                    """The newest step's notice is out (versions go out in order, one sync at a time)."""
                    nonlocal publishing
                    if publishing is not None:
                        await publishing
                        publishing = None

                refused = False  # the batch served for this version is never trained: ask for another
                while trainer.version < total:
                    with tracer.span("batch wait", TRACK, version=trainer.version) as span:
                        batch, stale = await get_batch(buffer, trainer.version, config, durable, refused)
                        refused = not batch.trajectories and bool(stale)  # a served batch wholly dropped
                        span["samples"] = len(batch.trajectories)
                    dropped.update(stale)
                    step = None
                    if batch.trajectories:
                        if method in LIVE_METHODS:
                            await published()
                        with tracer.span("train step", TRACK, step=trainer.version + 1) as span:
                            span["samples"] = len(batch.trajectories)
                            try:
                                shared = await asyncio.to_thread(share_batch, trainer, batch.trajectories)
                                step = await asyncio.to_thread(trainer.train_step, shared)
                            except BatchError as exc:  # a malformed trajectory: drop this batch, keep the run going
                                refused = True
                                span["dropped"] = str(exc)
                                dropped_batches += 1
                                dropped.update(t.group_id for t in batch.trajectories)
                                log.error(
                                    "dropped a batch of %d at version %d (%d dropped so far): %s",
                                    len(batch.trajectories),
                                    trainer.version,
                                    dropped_batches,
                                    exc,
                                )
                    if method != "disk" or step is None:
                        await published()
                    elif writing is not None:  # one snapshot written at a time; the engines may still load the last
                        await writing
                    if step is None:
                        await publisher.publish(
                            WeightsPublished(version=trainer.version, method=method, dropped_groups=dict(dropped))
                        )
                        continue
                    export = await export_weights(trainer, method, weights_dir, tracer)
                    writing = export.written
                    publishing = background.create_task(publish(step, batch, export, dict(dropped), publishing))
                    dropped.clear()
                    trained_log.write(step.version - 1, restarts, batch.trajectories)
                    if not checkpoints:
                        durable = step.version
                    if step.skipped:
                        log.warning("step %d skipped its update: %s", step.version, step.skip_reason)
                    if await asyncio.to_thread(clock.due, step.version):
                        with tracer.span("checkpoint", TRACK, step=step.version):
                            await asyncio.to_thread(trainer.save_checkpoint)
                        durable = step.version
                await published()
    finally:
        trained_log.close()
        tracer.close()
        sink.close()
        publisher.close()
        for client in clients:
            await client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--engines", required=True, help="comma-separated engine URLs")
    parser.add_argument("--serve", required=True, help="the buffer's serve endpoint")
    parser.add_argument("--versions", required=True, help="PUB endpoint for WeightsPublished")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stacks.install("trainer")
    config = read_run_config(args.config)
    run = train(
        config,
        args.model_dir,
        args.engines.split(","),
        args.serve,
        args.versions,
        curve_server=zmq_auth.server_keys_from_env(),  # read before the model loads: a bad key fails at once
        curve_client=zmq_auth.client_keys_from_env(),
    )
    asyncio.run(run)
    return 0


if __name__ == "__main__":
    from async_rl.process_exit import exit_now

    exit_now(main())
