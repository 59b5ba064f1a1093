"""A run's components as Ray actors: `async-rl run RECIPE --ray-address ADDR`.

Each component is the same OS process as on one machine (same argv, same environment): a small
ProcessHost actor, scheduled into the component's placement-group bundle with that bundle's
resources (so Ray sets its CUDA_VISIBLE_DEVICES), starts it on its node and reports its exit. The
supervisor drives these through `RayPlacement.spawn`, so restarts, ordering and failure reports
are the local runner's code. A host that dies (killed, its node lost) is brought back by Ray
(max_restarts) in its bundle, which Ray re-places on another node when its node is gone and the
resources allow; the supervisor then starts the component in it again.

Every endpoint binds to its node's address, never 0.0.0.0; the orchestrator secures them with
CURVE keys generated per run (in each child's environment) and an engine API key (in owner-only
files). An engine, a worker or a trainer node other than the first that Ray re-places on another
node follows it (`moved`); the buffer and the trainer's first node, which others know by their
address, end the run if they land elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from async_rl.supervisor import NODE_ADDRESS_ENV, ProcessSpec, child_env

if TYPE_CHECKING:
    from async_rl.config import RunConfig

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the host actor's process dies (killed, node lost),
    so no component outlives the actor that Ray replaces."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@ray.remote(max_restarts=-1)
class ProcessHost:
    """Runs one component process on the node of its bundle (an async actor: wait and signal overlap)."""

    def __init__(self) -> None:
        self._processes: dict[int, asyncio.subprocess.Process] = {}

    def address(self) -> str:
        return ray.util.get_node_ip_address()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def free_port(self) -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((self.address(), 0))
            return sock.getsockname()[1]

    def sees(self, path: str) -> bool:
        return Path(path).exists()

    async def start(self, argv: list[str], env: dict[str, str], cwd: str | None, log_path: str) -> int:
        with Path(log_path).open("ab") as log:  # noqa: ASYNC230 - an append-open of a local log
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, **env},
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self._processes[process.pid] = process
        return process.pid

    async def wait(self, pid: int) -> int:
        return await self._processes[pid].wait()

    def signal_group(self, pid: int, sig: int) -> None:
        if pid in self._processes:  # only this host's own children, never a reused pid
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)


class RayProcess:
    """A component process started by a ProcessHost, as the supervisor sees a child."""

    def __init__(self, host: Any, pid: int):
        self.host = host
        self.pid = pid
        self.returncode: int | None = None
        self._host_alive = True
        self._exit = asyncio.ensure_future(self._await_exit())

    async def _await_exit(self) -> int:
        try:
            code = await self.host.wait.remote(self.pid)
        except ray.exceptions.RayActorError:  # the host died (killed, node lost): so did its child
            code, self._host_alive = -signal.SIGKILL, False
        self.returncode = code
        return code

    async def wait(self) -> int:
        return await asyncio.shield(self._exit)

    def signal_group(self, sig: signal.Signals) -> None:
        """Also after the child exited, as locally: what it spawned may still be in its group."""
        if self._host_alive:
            self.host.signal_group.remote(self.pid, int(sig))


class Bundle:
    """Where one component runs: a bundle of a placement group and the resources it reserves."""

    def __init__(self, group: PlacementGroup, index: int, resources: dict[str, float]):
        self.group, self.index, self.resources = group, index, resources


class RayPlacement:
    """The run's placement groups and one ProcessHost per component; `spawn` is the supervisor's spawner."""

    def __init__(self, bundles: dict[str, Bundle], groups: list[PlacementGroup], ready_timeout_s: float):
        self.bundles = bundles
        self.groups = groups
        self.ready_timeout_s = ready_timeout_s
        self.hosts = {name: self._new_host(name, bundle) for name, bundle in bundles.items()}
        self.addresses: dict[str, str] = {}  # where each component binds: its host's node address
        self.nodes: dict[str, str] = {}  # and that node's Ray id

    @classmethod
    async def create(cls, config: RunConfig, address: str) -> RayPlacement:
        """Connect to the cluster, reserve every component's bundle, start the hosts, learn their nodes.
        The hosts are named after their components in the run's namespace (`namespace(config)`)."""
        if not ray.is_initialized():
            ray.init(address=address, namespace=namespace(config), log_to_driver=False, configure_logging=False)
        bundles, groups = plan_bundles(config)
        timeout = config.cluster.ready_timeout_s
        try:
            await asyncio.wait_for(asyncio.gather(*(group.ready() for group in groups)), timeout)
        except TimeoutError:
            for group in groups:
                remove_placement_group(group)
            wanted = [group.bundle_specs for group in groups]
            raise RuntimeError(
                f"the cluster could not place the run's bundles within {timeout:g} s (cluster.ready_timeout_s): "
                f"wanted {wanted}, available {ray.available_resources()}"
            ) from None
        placement = cls(bundles, groups, timeout)
        hosts = placement.hosts.values()
        placement.addresses = dict(zip(bundles, await asyncio.gather(*(h.address.remote() for h in hosts))))
        placement.nodes = dict(zip(bundles, await asyncio.gather(*(h.node_id.remote() for h in hosts))))
        return placement

    def _new_host(self, name: str, bundle: Bundle) -> Any:
        return ProcessHost.options(  # type: ignore[attr-defined]  # added by @ray.remote
            name=name,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=bundle.group, placement_group_bundle_index=bundle.index
            ),
            num_cpus=bundle.resources.get("CPU", 0),
            num_gpus=bundle.resources.get("GPU", 0),
        ).remote()

    async def check_shared(self, path: Path) -> None:
        """Every node must see `path` (the run folder) at the same place: refuse the run otherwise."""
        marker = path / f".seen-by-every-node-{os.getpid()}"
        marker.touch()
        try:
            seen = await asyncio.gather(*(host.sees.remote(str(marker)) for host in self.hosts.values()))
        finally:
            marker.unlink()
        blind = [name for name, ok in zip(self.hosts, seen) if not ok]
        if blind:
            raise RuntimeError(
                f"{path} is not visible on the nodes of {', '.join(blind)}: on a Ray cluster run.output_dir "
                f"must be on a filesystem every node shares, at the same path"
            )

    def address(self, name: str) -> str:
        return self.addresses[name]

    async def moved(self, name: str) -> bool:
        """Whether Ray brought the host back on another node (its bundle re-placed); the new node's
        address is `address(name)` from then on."""
        host = self.hosts[name]
        address = await self._await_host(name, host)
        node = await host.node_id.remote()
        if node == self.nodes[name]:
            return False
        self.nodes[name], self.addresses[name] = node, address
        return True

    async def free_port(self, name: str) -> int:
        return await self.hosts[name].free_port.remote()

    async def spawn(self, spec: ProcessSpec, log_path: Path, restarts: int) -> RayProcess:
        host = self.hosts[spec.name]
        address = await self._await_host(spec.name, host)
        if address != self.addresses[spec.name]:  # a respec that follows moves ran moved() first
            raise RuntimeError(
                f"{spec.name} was re-placed on another node ({self.addresses[spec.name]} -> {address}); "
                f"its peers know it by its first address"
            )
        env = {**child_env(spec, restarts), NODE_ADDRESS_ENV: address}
        pid = await host.start.remote(spec.argv, env, spec.cwd, str(log_path))
        return RayProcess(host, pid)

    async def _await_host(self, name: str, host: Any) -> str:
        """The host's address once it answers: Ray may still be restarting it (or re-placing its bundle)."""
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            try:
                return await asyncio.wait_for(host.address.remote(), max(0.0, deadline - time.monotonic()))
            except ray.exceptions.ActorUnavailableError:  # restarting: asked again shortly
                if time.monotonic() >= deadline:
                    break
                await asyncio.sleep(0.2)
            except TimeoutError:
                break
            except ray.exceptions.RayActorError as exc:
                raise RuntimeError(f"{name}: its Ray host is gone for good: {exc}") from None
        raise RuntimeError(
            f"{name}: its Ray host was not back within {self.ready_timeout_s:g} s (cluster.ready_timeout_s): "
            f"the cluster lacks {self.bundles[name].resources}"
        )

    def close(self) -> None:
        for host in self.hosts.values():
            ray.kill(host, no_restart=True)
        for group in self.groups:
            remove_placement_group(group)


def namespace(config: RunConfig) -> str:
    """The run's Ray namespace: one per run folder, so two runs' hosts never share a name."""
    return f"async-rl:{config.run.output_dir}"


def plan_bundles(config: RunConfig) -> tuple[dict[str, Bundle], list[PlacementGroup]]:
    """One bundle per component, grouped as [cluster] asks: engines (spread, or packed per node),
    the trainer's ranks in one bundle per trainer node, the buffer and the workers together."""
    cluster = config.cluster
    engine = _resources(cluster.engine_cpus, cluster.engine_gpus)
    names = [f"engine{i}" for i in range(config.engine.count)]
    per_node = cluster.engines_per_node or config.engine.count
    engine_groups = [names[i : i + per_node] for i in range(0, len(names), per_node)]
    strategy = "STRICT_PACK" if cluster.engines_per_node else cluster.engine_strategy
    per_node_ranks = config.trainer.processes // cluster.trainer_nodes
    layout: list[tuple[list[str], list[dict[str, float]], str]] = [
        (group, [engine] * len(group), strategy) for group in engine_groups
    ]
    trainer = _resources(cluster.trainer_cpus * per_node_ranks, cluster.trainer_gpus * per_node_ranks)
    trainer_names = cluster.trainer_node_names()
    layout.append(
        (trainer_names, [trainer] * len(trainer_names), "STRICT_SPREAD" if len(trainer_names) > 1 else "PACK")
    )
    services = ["buffer", *(f"worker{w}" for w in range(config.rollout.workers))]
    layout.append((services, [_resources(cluster.service_cpus, 0)] * len(services), cluster.service_strategy))
    bundles: dict[str, Bundle] = {}
    groups = []
    for members, specs, group_strategy in layout:
        group = placement_group(specs, strategy=group_strategy)
        groups.append(group)
        for index, (name, resources) in enumerate(zip(members, specs)):
            bundles[name] = Bundle(group, index, resources)
    return bundles, groups


def _resources(cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": cpus} | ({"GPU": gpus} if gpus else {})
