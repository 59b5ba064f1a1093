"""`async-rl run RECIPE`: start a whole run as separate processes and watch it.

Engines, the buffer service, the trainer and the rollout worker(s) each run as
their own OS process under the Supervisor, which stops them all together on
Ctrl-C, on the wall-clock limit, or when one crashes (reported with its log tail).
Progress is read back from metrics.jsonl, the same file a user inspects later.
With --ray-address the same processes run on a Ray cluster's nodes (async_rl/ray_cluster.py):
only where each one runs and the address it binds differ.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from async_rl import stacks
from async_rl.config import ConfigError, RunConfig, import_function, load_config

if TYPE_CHECKING:
    from async_rl.supervisor import ProcessSpec
    from rollout_workers.launcher import EngineSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="recipe TOML path or bundled recipe name (e.g. tiny)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set trainer.total_steps=50 (repeatable)",
    )
    parser.add_argument("--sync", action="store_true", help="strictly on-policy baseline: staleness.eta = 0")
    parser.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="run the components as actors on this Ray cluster (host:port, or 'auto'), placed as [cluster] says",
    )


def main(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + (["run.sync=true", "staleness.eta=0"] if args.sync else [])
    try:
        config = load_config(args.config, overrides)
        if args.ray_address:
            config = for_cluster(config)
        check_supported(config, on_cluster=bool(args.ray_address))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(run(config, args.ray_address))


def for_cluster(config: RunConfig) -> RunConfig:
    """What a run on Ray settles before it starts: an absolute run folder (every node resolves it
    alike), devices from the bundles' GPUs instead of "auto" (the driver's node may have none), and
    an engine API key generated for this run unless the recipe sets one."""
    import secrets

    replace = msgspec.structs.replace
    cluster = config.cluster
    auto = lambda gpus: "cuda" if gpus else "cpu"  # noqa: E731
    model_device = config.model.device
    return replace(
        config,
        run=replace(config.run, output_dir=str(Path(config.run.output_dir).resolve())),
        engine=replace(
            config.engine,
            api_key=config.engine.api_key or secrets.token_urlsafe(24),
            device=config.engine.device or (auto(cluster.engine_gpus) if model_device == "auto" else None),
        ),
        trainer=replace(
            config.trainer,
            device=config.trainer.device or (auto(cluster.trainer_gpus) if model_device == "auto" else None),
        ),
    )


def run_argv(
    recipe: str, output_dir: str | os.PathLike[str], overrides: Sequence[str] = (), *, sync: bool = False
) -> list[str]:
    """The command line of `async-rl run RECIPE` into `output_dir`, for tools that start runs as processes."""
    argv = [sys.executable, "-m", "async_rl.cli", "run", str(recipe), "--set", f"run.output_dir={str(output_dir)!r}"]
    for override in overrides:
        argv += ["--set", override]
    return argv + (["--sync"] if sync else [])


def _aborts_waiting_requests(config: RunConfig) -> bool:
    """Whether every sync aborts requests while they wait in an engine's queue with tokens made (an
    abort-mode sync is a retract, then abort_all): SGLang must then hand over every token (2.68x slower
    generation, benchmarks/RESULTS.md) or each sync would cut up to 49 tokens off every request. An APRIL
    retraction that happens to land in a retract-mode pause costs at most those tokens of the requests
    it aborts (their returned prefix stays consistent and the rest is generated again on resume), so it
    does not pay for every-token hand-over all run long."""
    return config.weight_sync.pause_mode == "abort"


def check_supported(config: RunConfig, on_cluster: bool = False) -> None:
    """What `async-rl run` refuses before starting anything (the sweep checks every point with it too)."""
    if config.trainer.groups_per_step % config.rollout.workers:
        raise ConfigError(
            f"trainer.groups_per_step={config.trainer.groups_per_step} must be a multiple of "
            f"rollout.workers={config.rollout.workers}: each worker owns an equal share of every batch"
        )
    # Fail before starting anything, not as a worker's traceback a minute later.
    for spec in (config.rollout.generate, config.rollout.sample_plan, config.rollout.reward, config.task.generator):
        if spec is not None:
            import_function(spec)
    if on_cluster:
        _check_cluster_devices(config)
    else:
        _check_broadcast_devices(config)
        _check_ipc_devices(config)
        if config.cluster.trainer_nodes > 1:
            raise ConfigError("cluster.trainer_nodes > 1 spreads the trainer over Ray nodes: run with --ray-address")
    if config.trainer.backend == "megatron":
        from async_rl.trainer.config import megatron_unavailable

        trainer_device = config.trainer.device or config.model.device
        problem = megatron_unavailable(
            trainer_device if on_cluster else _device(trainer_device), check_cuda=not on_cluster
        )
        if problem:
            raise ConfigError(problem)


def check_context(config: RunConfig, model_dir: Path) -> None:
    """Refuse a response budget the engines' context cannot hold with a prompt: both engines answer
    every such request with HTTP 400, which the workers would retry for the whole run."""
    model_config = json.loads((model_dir / "config.json").read_text())
    context, source = model_config.get("max_position_embeddings"), f"max_position_embeddings in {model_dir}/config.json"
    args = config.engine.extra_args
    if config.engine.kind == "sglang" and "--context-length" in args[:-1]:
        context, source = int(args[args.index("--context-length") + 1]), "--context-length in engine.extra_args"
    if context is not None and config.rollout.max_new_tokens >= context:
        raise ConfigError(
            f"rollout.max_new_tokens={config.rollout.max_new_tokens} leaves no room for a prompt in the model's "
            f"context of {context} tokens ({source}): lower it below {context}"
        )


def _check_cluster_devices(config: RunConfig) -> None:
    """On Ray a component sees only its bundle's GPUs: a CUDA device needs GPUs in the bundle, and an
    NCCL broadcast needs whole GPUs on both sides (separate bundles never share one)."""
    if config.weight_sync.method == "cuda_ipc":
        raise ConfigError(
            'weight_sync.method = "cuda_ipc" shares the trainer\'s GPU memory with engines on that GPU, '
            "which separate Ray bundles never are: use disk or distributed on Ray"
        )
    cluster = config.cluster
    engine = config.engine.device or config.model.device
    trainer = config.trainer.device or config.model.device
    for role, device, gpus in (("engine", engine, cluster.engine_gpus), ("trainer", trainer, cluster.trainer_gpus)):
        if device.startswith("cuda") and not gpus:
            raise ConfigError(f"{role} device {device} on Ray needs cluster.{role}_gpus > 0 (its bundle's GPUs)")
    nccl = config.weight_sync.method == "distributed" and trainer.startswith("cuda")
    if nccl and (cluster.engine_gpus < 1 or cluster.trainer_gpus < 1):
        raise ConfigError(
            'weight_sync.method = "distributed" over NCCL needs whole GPUs per engine and per trainer rank: '
            f"cluster.engine_gpus = {cluster.engine_gpus:g}, cluster.trainer_gpus = {cluster.trainer_gpus:g}"
        )


def _check_broadcast_devices(config: RunConfig) -> None:
    """NCCL connects one process per GPU: a broadcast group with two ranks on one GPU fails at set-up."""
    if config.weight_sync.method != "distributed":
        return
    trainer = _device(config.trainer.device or config.model.device)
    if not trainer.startswith("cuda"):
        return  # gloo: any placement
    default = "cuda:0" if config.engine.kind == "sglang" else config.model.device
    engine = _device(config.engine.device or default)
    if config.engine.count > 1 and engine.startswith("cuda"):
        raise ConfigError(
            f'weight_sync.method = "distributed" over NCCL needs every engine on its own GPU, but all '
            f"{config.engine.count} engines use {engine}: set engine.count = 1 or use disk sync"
        )
    if engine.startswith("cuda") and _gpu(engine) == _gpu(trainer):
        raise ConfigError(
            f'weight_sync.method = "distributed" over NCCL needs the trainer and the engines on '
            f"different GPUs, both are on {_gpu(trainer)}: set trainer.device / engine.device "
            f"(e.g. cuda:1 and cuda:0) or use disk sync"
        )


def _check_ipc_devices(config: RunConfig) -> None:
    """CUDA IPC hands the engines handles of the trainer's GPU memory: they must serve on that GPU."""
    if config.weight_sync.method != "cuda_ipc":
        return
    trainer = _gpu(_device(config.trainer.device or config.model.device))
    engine = _gpu(_device(config.engine.device or "cuda:0"))  # SGLang's default GPU is 0
    if not trainer.startswith("cuda") or engine != trainer:
        raise ConfigError(
            f'weight_sync.method = "cuda_ipc" needs the trainer and the engines on one GPU, but the trainer is '
            f"on {trainer} and the engines on {engine}: set trainer.device and engine.device, or use disk sync"
        )


def _gpu(device: str) -> str:
    return f"{device}:0" if device == "cuda" else device


def _device(configured: str) -> str:
    if configured != "auto":
        return configured
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


HUNG_GRACE_S = 2.0


async def _wait_unless_hung(supervisor, config: RunConfig, stacks_dir: Path):
    """supervisor.wait(), unless the watchdog finds the run stalled first (then its report, and the
    run ends as hung unless run.watchdog_wait)."""
    from async_rl.supervisor import RunOutcome
    from async_rl.watchdog import Watchdog
    from buffer.service import WAL_NAME

    ending = asyncio.ensure_future(supervisor.wait(config.run.max_wall_s))
    if not config.run.watchdog_s:
        return await ending
    run_dir = Path(config.run.output_dir)
    progress = [
        run_dir / "metrics.jsonl",
        run_dir / "rollout_metrics.jsonl",
        config.output_path(config.buffer.dir, "buffer") / WAL_NAME,
    ]
    watchdog = Watchdog(progress, stacks_dir, config.run.watchdog_s)
    while True:
        stalled = asyncio.ensure_future(watchdog.stalled())
        await asyncio.wait({ending, stalled}, return_when=asyncio.FIRST_COMPLETED)
        if ending.done():
            stalled.cancel()
            return ending.result()
        report = stalled.result()
        print(f"watchdog: {report}", flush=True)
        if not config.run.watchdog_wait:
            ending.cancel()
            supervisor.grace_s = HUNG_GRACE_S  # a stuck process will not act on SIGTERM anyway
            return RunOutcome(status="hung", message=report.splitlines()[0])


def _newest_weights(config: RunConfig, model_dir: Path) -> tuple[Path, int]:
    """The newest complete weights a (re)starting engine can load: the trainer's latest disk snapshot
    (weight_sync.dir/vN) or its latest checkpoint, whichever is newer, else the base model at 0."""
    newest = _resume_point(config, model_dir)
    weights_dir = config.output_path(config.weight_sync.dir, "weights")
    for folder in weights_dir.glob("v*") if weights_dir.is_dir() else ():
        if folder.name[1:].isdigit() and int(folder.name[1:]) > newest[1]:
            newest = folder, int(folder.name[1:])
    return newest


def _pinned_newest_weights(config: RunConfig, model_dir: Path, name: str) -> tuple[Path, int]:
    """`_newest_weights`, hard-linked into RUN_DIR/restart/NAME first: the trainer prunes old snapshots
    while a restarted engine may still be loading one."""
    import shutil

    for _ in range(3):
        source, version = _newest_weights(config, model_dir)
        if version == 0:
            return source, version
        pinned = Path(config.run.output_dir) / "restart" / name
        staging = pinned.with_name(f".{name}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            for file in source.iterdir():
                if file.is_file():  # a checkpoint's optimizer state is a folder the engine does not read
                    os.link(file, staging / file.name)
        except FileNotFoundError:  # pruned meanwhile: a newer one exists now
            continue
        shutil.rmtree(pinned, ignore_errors=True)
        staging.rename(pinned)
        return pinned, version
    return _resume_point(config, model_dir)


def _resume_point(config: RunConfig, model_dir: Path) -> tuple[Path, int]:
    """The weights engines must serve and their version: the latest checkpoint's, or the base model at 0."""
    from async_rl.trainer import checkpoint

    latest = checkpoint.latest_checkpoint(config.output_path(config.trainer.ckpt_dir, "checkpoints"))
    if latest is None:
        return model_dir, 0
    return latest, int(checkpoint.read_meta(latest)["version"])


class LocalPlacement:
    """Every component a child process of this one, bound to loopback (the engines to engine.host)."""

    def __init__(self, engine_host: str):
        from async_rl.supervisor import spawn_local

        self.engine_host = engine_host
        self.spawn = spawn_local

    def address(self, name: str) -> str:
        return self.engine_host if name.startswith("engine") else "127.0.0.1"

    async def free_port(self, name: str) -> int:
        from rollout_workers.launcher import free_port

        return free_port(self.address(name))

    async def moved(self, name: str) -> bool:
        return False  # a child restarts where it ran

    def close(self) -> None:
        pass


@contextlib.asynccontextmanager
async def _placement(config: RunConfig, ray_address: str | None, run_dir: Path) -> AsyncIterator:
    """Where the components run: here, or on the Ray cluster at `ray_address` (which must see run_dir)."""
    if ray_address is None:
        yield LocalPlacement(config.engine.host)
        return
    from async_rl.ray_cluster import RayPlacement

    placement = await RayPlacement.create(config, ray_address)
    try:
        for shared in {run_dir, Path.cwd(), config.output_path(config.weight_sync.dir, "weights")}:
            shared.mkdir(parents=True, exist_ok=True)
            await placement.check_shared(shared)
        print("placement", "  ".join(f"{name}@{node}" for name, node in placement.nodes.items()), flush=True)
        yield placement
    finally:
        placement.close()


async def run(config: RunConfig, ray_address: str | None = None) -> int:
    from async_rl.private_files import write_private
    from rollout_workers.engine.model import resolve_model_spec

    run_dir = Path(config.run.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before anything runs
    config_path = run_dir / "config.json"
    write_private(config_path, config.to_json())  # it may hold the engines' API key
    try:
        model_dir = resolve_model_spec(config.model.spec)
    except FileNotFoundError as exc:
        print(f"error: model.spec: {exc}", file=sys.stderr)
        return 2
    try:
        check_context(config, model_dir)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        engine_weights, start_version = _resume_point(config, model_dir)
    except FileNotFoundError as exc:  # checkpoints, none intact: never a silent fresh start
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if start_version >= config.trainer.total_steps:
        print(
            f"{run_dir} already holds a checkpoint at version {start_version} >= trainer.total_steps: nothing to "
            f"train (set run.output_dir to start afresh, or raise trainer.total_steps to continue)",
            flush=True,
        )
        return 0
    try:
        async with _placement(config, ray_address, run_dir) as placement:
            return await _run_placed(config, placement, config_path, model_dir, engine_weights, start_version)
    except RuntimeError as exc:  # the cluster cannot place or host the run
        print(f"run failed: {exc}", file=sys.stderr, flush=True)
        return 1


async def _run_placed(
    config: RunConfig, placement, config_path: Path, model_dir: Path, engine_weights: Path, start_version: int
) -> int:
    from async_rl.engine_monitor import monitor_engines
    from async_rl.metrics import ProgressDisplay
    from async_rl.prometheus import RunCollector
    from async_rl.supervisor import ProcessSpec, RestartPolicy, RunEnded, Supervisor
    from async_rl.zmq_auth import RunKeys
    from rollout_workers.engine_registry import write_engine_urls
    from rollout_workers.launcher import engine_command, engine_env
    from rollout_workers.rollout_metrics import METRICS_NAME as ROLLOUT_METRICS_NAME

    run_dir = config_path.parent
    python = sys.executable  # installed at the same path on every node of a cluster
    secrets_dir = run_dir / "secrets"
    cwd = str(Path.cwd())  # relative paths of the recipe resolve alike on every node
    # Beyond loopback every ZMQ socket is CURVE-secured, with keys of this run handed over in the
    # children's environment (never argv or a file); the engines' API key is in config.json (0600).
    keys = RunKeys.generate() if not isinstance(placement, LocalPlacement) else None
    server_env, client_env = (keys.server_env(), keys.client_env()) if keys else ({}, {})
    curve = keys.client() if keys else None
    stacks_dir = run_dir / "stacks"
    for stale in stacks_dir.glob("*.pid"):  # registrations of an earlier start of this run
        stale.unlink()
    env = {
        **thread_env(config.engine.count),
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        stacks.STACKS_ENV: str(stacks_dir),
    }
    # Every component's restart policy; engines get none under distributed sync (see run.max_restarts).
    restart = RestartPolicy(
        max_restarts=config.run.max_restarts,
        backoff_s=config.run.restart_backoff_s,
        window_s=config.run.restart_window_s,
    )
    engine_restart_policy = (
        msgspec.structs.replace(restart, max_restarts=0) if config.weight_sync.method == "distributed" else restart
    )

    def engine_process(i: int, port: int, weights: Path, version: int) -> ProcessSpec:
        spec = engine_spec(config, weights, version, i, host=placement.address(f"engine{i}"))
        return ProcessSpec(
            name=f"engine{i}",
            argv=engine_command(spec, port, python, secrets_dir),
            env={**env, **engine_env(spec)},
            restart=engine_restart_policy,
            cwd=cwd,
        )

    def engine_restart(i: int, port: int) -> Callable[[], Awaitable[ProcessSpec]]:
        """A restarted engine starts from the newest weights on disk, at their version; one that Ray
        re-placed on another node listens on a port free there, which the registry tells the others."""

        async def respec() -> ProcessSpec:
            nonlocal port
            if await placement.moved(f"engine{i}"):
                port = await placement.free_port(f"engine{i}")
                engine_urls[i] = f"http://{placement.address(f'engine{i}')}:{port}"
                write_engine_urls(run_dir, engine_urls)
            return engine_process(i, port, *_pinned_newest_weights(config, model_dir, f"engine{i}"))

        return respec

    engine_names = [f"engine{i}" for i in range(config.engine.count)]
    engine_ports = [await placement.free_port(name) for name in engine_names]
    engine_urls = [f"http://{placement.address(name)}:{port}" for name, port in zip(engine_names, engine_ports)]
    write_engine_urls(run_dir, engine_urls)

    async def endpoint(name: str) -> str:
        return f"tcp://{placement.address(name)}:{await placement.free_port(name)}"

    submit, serve, versions = await endpoint("buffer"), await endpoint("buffer"), await endpoint("trainer")

    def common() -> list[str]:  # the engines where they listen now (a restart follows a moved engine)
        return ["--config", str(config_path), "--model-dir", str(model_dir), "--engines", ",".join(engine_urls)]

    async def trainer_process() -> ProcessSpec:
        """One process per trainer node (the first runs global rank 0). Several nodes rendezvous on the
        first's address, at a port picked anew for every start; the others bind nothing, so they may
        follow a move of their own bundle."""
        names = config.cluster.trainer_node_names()
        rendezvous = None
        if len(names) > 1:
            for name in names[1:]:
                await placement.moved(name)
            rendezvous = (placement.address("trainer"), await placement.free_port("trainer"))
        launchers = [
            _trainer_launcher(python, config.trainer.processes, len(names), rank, rendezvous)
            for rank in range(len(names))
        ]
        first, *others = [
            ProcessSpec(
                name=name,
                finishes_run=True,
                env=env | server_env | client_env,  # it publishes versions and asks the buffer
                cwd=cwd,
                restart=restart,  # it resumes from its latest checkpoint; the workers follow
                argv=[*launcher, *common(), "--serve", serve, "--versions", versions],
            )
            for name, launcher in zip(names, launchers, strict=True)
        ]
        return msgspec.structs.replace(first, members=others)

    def worker_process(w: int) -> ProcessSpec:
        return ProcessSpec(
            name=f"worker{w}",
            env=env | client_env,
            cwd=cwd,
            stop_early=True,
            restart=restart,  # it aligns to the trainer's version at start
            argv=[
                python,
                "-m",
                "rollout_workers.worker",
                *common(),
                "--submit",
                submit,
                "--versions",
                versions,
                "--serve",
                serve,
                "--start-version",
                str(start_version),
                "--worker-index",
                str(w),
            ],
        )

    print(
        f"run dir {run_dir}  model {model_dir}  engines {','.join(engine_urls)}  buffer {submit}  "
        f"start version {start_version}",
        flush=True,
    )
    collector = RunCollector()
    # What an earlier start of this run wrote is not shown again; everything from this start is.
    shown_from = {name: file_size(run_dir / name) for name in ("metrics.jsonl", ROLLOUT_METRICS_NAME)}
    # The endpoint binds first, so that no port picked for a child takes the one asked for.
    supervisor_ = Supervisor(run_dir / "logs", spawn=placement.spawn)
    async with _merged_trace(run_dir), _prometheus(config, collector), supervisor_ as supervisor:
        try:
            # Everything starts at once: the trainer and the workers wait for the engines themselves,
            # so their imports and model loading overlap the engines' start-up.
            for i, port in enumerate(engine_ports):
                await supervisor.start(engine_process(i, port, engine_weights, start_version), engine_restart(i, port))
            await supervisor.start(
                ProcessSpec(
                    name="buffer",
                    env=env | server_env,
                    cwd=cwd,
                    restart=restart,  # it recovers from its write-ahead log
                    argv=[
                        python,
                        "-m",
                        "async_rl.cli",
                        "buffer",
                        "serve",
                        "--config",
                        str(config_path),
                        "--bind-submit",
                        submit,
                        "--bind-serve",
                        serve,
                    ],
                )
            )
            await supervisor.start(await trainer_process(), trainer_process)
            for w in range(config.rollout.workers):
                # A worker binds nothing: wherever Ray re-places it, it connects to the others.
                moves = functools.partial(placement.moved, f"worker{w}")
                await supervisor.start(worker_process(w), rebuilt(functools.partial(worker_process, w), moves))
            await supervisor.guard(
                _wait_ready(
                    engine_urls, config.engine.api_key, serve, curve, run_dir / "logs", config.engine.start_timeout_s
                )
            )
            collector.components = lambda: {
                name: (code is None, supervisor.restarts[name]) for name, code in supervisor.returncodes.items()
            }
            with ProgressDisplay(config.trainer.total_steps) as display:

                def on_step(record: dict) -> None:
                    display.update(int(record.get("step", 0)), record, supervisor.restarts)
                    collector.on_step(record)

                followers = [
                    JsonlFollower(run_dir / "metrics.jsonl", on_step, shown_from["metrics.jsonl"]),
                    JsonlFollower(
                        run_dir / ROLLOUT_METRICS_NAME, collector.on_rollout, shown_from[ROLLOUT_METRICS_NAME]
                    ),
                ]
                following = [asyncio.create_task(follower.follow()) for follower in followers]
                if config.run.prometheus:
                    following.append(asyncio.create_task(collector.poll_buffer(serve, curve)))
                if config.engine.health_failures and engine_restart_policy.max_restarts:
                    monitor = monitor_engines(config.engine, engine_urls, supervisor.kill, run_dir)
                    following.append(asyncio.create_task(monitor))
                try:
                    outcome = await _wait_unless_hung(supervisor, config, stacks_dir)
                finally:
                    for task in following:
                        task.cancel()
                    for follower in followers:
                        follower.poll()
        except RunEnded as ended:
            outcome = ended.outcome
        except TimeoutError as exc:
            print(f"run failed: {exc}", file=sys.stderr, flush=True)
            return 1
    print(f"run {outcome.status}: {outcome.message}", file=sys.stderr if outcome.exit_code else sys.stdout, flush=True)
    return outcome.exit_code


@contextlib.asynccontextmanager
async def _prometheus(config: RunConfig, collector) -> AsyncIterator[None]:
    """The run's Prometheus endpoint while the run lives, unless run.prometheus is off."""
    from async_rl.prometheus import serve_metrics

    if not config.run.prometheus:
        yield
        return
    stop, port = serve_metrics(collector, config.run.prometheus_host, config.run.prometheus_port)
    print(f"prometheus http://{config.run.prometheus_host}:{port}/metrics", flush=True)
    try:
        yield
    finally:
        stop()


@contextlib.asynccontextmanager
async def _merged_trace(run_dir: Path) -> AsyncIterator[None]:
    """Once every child stopped, however the run ended, merge their trace files into RUN_DIR/trace.json."""
    from async_rl.trace import merge_run

    try:
        yield
    finally:
        try:
            merged = merge_run(run_dir)
        except (OSError, ValueError) as exc:  # a trace is a diagnostic: never let it hide the run's outcome
            print(f"could not merge the trace files: {exc}", file=sys.stderr, flush=True)
        else:
            if merged is not None:
                print(f"trace {merged} (open in https://ui.perfetto.dev)", flush=True)


def _trainer_launcher(
    python: str, processes: int, nodes: int = 1, node_rank: int = 0, rendezvous: tuple[str, int] | None = None
) -> list[str]:
    """Several ranks go through torchrun, which also stops a node's ranks if one fails; over several
    nodes, node `node_rank`'s share of them, meeting the others at `rendezvous` (address, port)."""
    if processes == 1:
        return [python, "-m", "async_rl.trainer_main"]
    where = ["--standalone"]
    if nodes > 1:
        assert rendezvous is not None
        address, port = rendezvous
        where = [f"--nnodes={nodes}", f"--node-rank={node_rank}", f"--master-addr={address}", f"--master-port={port}"]
    return [
        python,
        "-m",
        "torch.distributed.run",
        *where,
        f"--nproc_per_node={processes // nodes}",
        "-m",
        "async_rl.trainer_main",
    ]


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def thread_env(engine_count: int) -> dict[str, str]:
    """Split the cores between the engines and the trainer (the heavy processes); one thread each on a
    2-core box, so they do not oversubscribe the CPU. A user's own OMP_NUM_THREADS wins. Benchmarks
    that measure a component alone give it the same threads."""
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    threads = str(max(1, (os.cpu_count() or 1) // (engine_count + 1)))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def engine_spec(config: RunConfig, weights: Path, version: int, index: int, host: str | None = None) -> EngineSpec:
    """How engine `index` of a run starts, serving `weights` at `version` and listening on `host`
    (default engine.host; benchmarks that measure the engines alone start them the same way)."""
    from rollout_workers.launcher import EngineSpec

    embedded = config.engine.kind == "embedded"
    return EngineSpec(
        kind=config.engine.kind,
        model=str(weights),
        api_key=config.engine.api_key,
        host=host or config.engine.host,
        device=_device(config.engine.device or config.model.device) if embedded else config.engine.device,
        extra_args=_engine_args(config, version, seed=config.trainer.seed + index),
        hand_over_every_token=_aborts_waiting_requests(config),
    )


def _engine_args(config: RunConfig, version: int, seed: int) -> list[str]:
    """Engines start at the trainer's version (non-zero on resume), so token versions stay truthful."""
    args = ["--weight-version", str(version), "--max-running-requests", str(config.engine.max_running_requests)]
    if config.engine.kind == "embedded":
        args += ["--dtype", config.model.dtype, "--seed", str(seed)]
        if config.engine.trainer_logprobs:
            args += ["--trainer-logprobs-chunk", str(config.trainer.logprob_chunk_tokens)]
    else:
        args += ["--random-seed", str(seed)]
    return args + list(config.engine.extra_args)


def rebuilt(
    build: Callable[[], ProcessSpec], follow: Callable[[], Awaitable[bool]] | None = None
) -> Callable[[], Awaitable[ProcessSpec]]:
    """A restart's spec built anew, with the engines where they listen now; `follow` first accepts
    a move of the component itself (one that binds nothing may run anywhere)."""

    async def respec() -> ProcessSpec:
        if follow is not None:
            await follow()
        return build()

    return respec


async def _wait_ready(
    engine_urls: list[str], api_key: str | None, serve: str, curve, log_dir: Path, timeout_s: float
) -> None:
    """Every engine answers /health and the buffer answers a StatsRequest; a start-up that stalls fails
    the run with the log tail of what did not come up (a child that dies fails it at once, through the
    supervisor)."""
    from async_rl.supervisor import log_tail
    from async_rl.transport import BufferClient
    from rollout_workers.client import EngineClient, EngineTimeoutError, wait_until_healthy

    silent: list[str] = []

    async def buffer_ready() -> None:
        try:
            async with BufferClient(serve, curve=curve) as buffer:
                await buffer.stats(timeout=timeout_s)
        except TimeoutError:
            silent.append("buffer")

    async def engines_ready() -> None:
        clients = [EngineClient(url, api_key=api_key) for url in engine_urls]
        try:
            await wait_until_healthy(clients, timeout_s)
        except EngineTimeoutError:
            for i, client in enumerate(clients):
                if not await client.is_healthy():
                    silent.append(f"engine{i}")
        finally:
            for client in clients:
                await client.close()

    async with asyncio.TaskGroup() as waits:
        waits.create_task(buffer_ready())
        waits.create_task(engines_ready())
    if silent:
        tails = "".join(
            f"\n--- {name} ({log_dir / f'{name}.log'}):\n" + "\n".join(log_tail(log_dir / f"{name}.log"))
            for name in silent
        )
        raise TimeoutError(f"not ready within {timeout_s:g} s (engine.start_timeout_s): {', '.join(silent)}{tails}")


class JsonlFollower:
    """Hands each new line of a JSONL file (metrics.jsonl, rollout_metrics.jsonl) to `on_record` as it
    is appended, reading only what was added after `offset`."""

    def __init__(self, path: Path, on_record: Callable[[dict], None], offset: int):
        self.path = path
        self.on_record = on_record
        self.offset = offset

    def poll(self) -> None:
        if file_size(self.path) <= self.offset:
            return
        with self.path.open("rb") as file:
            file.seek(self.offset)
            data = file.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next poll
        for line in data[:end].splitlines():
            try:
                record = msgspec.json.decode(line)
            except msgspec.DecodeError:
                continue
            self.on_record(record)
        self.offset += end

    async def follow(self, interval_s: float = 0.5) -> None:
        while True:
            self.poll()
            await asyncio.sleep(interval_s)
