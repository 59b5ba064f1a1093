"""`async-rl run --ray-address` on a real local multi-node Ray cluster.

The cluster is `ray start --head` plus two `ray start --address` nodes (their own CPUs and a
resource naming each), started and stopped here. All nodes share this machine's address and
filesystem, which a real cluster's nodes do not: the tests check placement by Ray's node ids.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from async_rl.metrics import read_metrics
from tests.helpers import REPO, served_batches

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray-cluster")]

NODES = ("a", "b")
START_S = 60.0


class LocalCluster:
    """A head (no CPUs: nothing is placed on it) and one node per name, each a `ray start --block`
    process group of its own, so that a node can be stopped alone."""

    def __init__(self, temp_dir: Path):
        self.temp_dir = temp_dir
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Ray's token authentication, with a token of this cluster's own (never ~/.ray's).
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
        # The nodes' workers import this repository's tests too (the intruder task does); a lost node
        # is declared dead after ~3 s of missed health checks instead of Ray's default ~30 s.
        self.env |= {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
        self.env |= {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
        self.nodes: dict[str, subprocess.Popen] = {}

    def start(self) -> None:
        common = ["--object-store-memory", str(100 << 20), "--block"]
        head = ["--head", "--port", str(self.port), "--num-cpus", "0", "--include-dashboard", "false"]
        self._start_node("head", [*head, "--temp-dir", str(self.temp_dir), *common])
        for name in NODES:
            self.add_node(name)

    def add_node(self, name: str) -> None:
        """One at a time: nodes starting together on one host can collide. Each has room for all of a
        run's five bundles, so that one node can take over what a lost one ran."""
        resources = f'{{"node_{name}": 1}}'
        args = ["--address", self.address, "--num-cpus", "5", "--resources", resources]
        self._start_node(name, [*args, "--object-store-memory", str(100 << 20), "--block"])

    def kill_node(self, node_id: str) -> None:
        """SIGKILL the node (its raylet and everything in its process group): a lost machine."""
        for name, process in list(self.nodes.items()):
            if name != "head" and node_id in _group_cmdlines(process.pid):
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                del self.nodes[name]
                return
        raise AssertionError(f"no node {node_id}")

    def _start_node(self, name: str, args: list[str]) -> None:
        log = (self.temp_dir / f"{name}.log").open("wb")
        self.nodes[name] = subprocess.Popen(
            [str(Path(sys.executable).with_name("ray")), "start", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        self._await_nodes(len(self.nodes))

    def _await_nodes(self, count: int) -> None:
        deadline = time.monotonic() + START_S
        while self.alive_nodes() != count:
            assert time.monotonic() < deadline, f"{count} Ray nodes not up within {START_S} s"
            time.sleep(0.5)

    def alive_nodes(self) -> int:
        status = subprocess.run(
            [str(Path(sys.executable).with_name("ray")), "status", "--address", self.address],
            capture_output=True,
            text=True,
            env=self.env,
        )
        return len(re.findall(r"^ 1 node_", status.stdout, flags=re.M)) if status.returncode == 0 else 0

    def stop(self) -> None:
        for process in reversed(self.nodes.values()):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.nodes.values():
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _group_cmdlines(pgid: int) -> str:
    """The command lines of every process in group `pgid` (a node's raylet names its node id)."""
    lines = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.getpgid(int(proc.name)) == pgid:
                lines.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, ProcessLookupError):
            continue
    return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # A short folder: Ray's socket paths live under it and must stay under the 107-byte limit.
    import tempfile

    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    local = LocalCluster(temp_dir)
    try:
        local.start()
        yield local
    finally:
        local.stop()


def start_ray_run(cluster: LocalCluster, run_dir: Path, *overrides: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "async_rl.cli", "run", "recipes/tiny.toml", "--ray-address", cluster.address]
    for override in (
        f"run.output_dir={run_dir}",
        "run.max_wall_s=240",
        "engine.count=2",
        "cluster.engine_strategy=STRICT_SPREAD",  # one engine on each node
        *overrides,
    ):
        argv += ["--set", override]
    return subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cluster.env
    )


def placement_of(output: str) -> dict[str, str]:
    """component -> Ray node id, from the run's `placement` line."""
    line = next(line for line in output.splitlines() if line.startswith("placement"))
    return dict(re.findall(r"(\w+)@(\w+)", line))


def test_tiny_recipe_learns_across_nodes_and_outsiders_cannot_submit(cluster, tmp_path):
    process = start_ray_run(cluster, tmp_path, "trainer.total_steps=90")
    output = _read_until(process, "buffer tcp://")
    submit = re.search(r"buffer (tcp://\S+)", output).group(1)
    host = submit.removeprefix("tcp://").rsplit(":", 1)[0]
    assert host == _node_address(cluster), output  # the node's address, never 0.0.0.0
    intruder = _submit_from_a_ray_task(cluster, submit)
    rest, _ = process.communicate(timeout=240)
    output += rest
    assert process.returncode == 0, output[-4000:]
    assert intruder == "no acknowledgement", intruder

    placement = placement_of(output)
    assert placement["engine0"] != placement["engine1"], placement  # spread over two nodes
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 91))
    assert max(r["staleness/max"] for r in records) <= 1  # tiny's eta
    rewards = [r["reward/mean"] for r in records]
    first, last = statistics.mean(rewards[:10]), statistics.mean(rewards[-10:])
    assert last > first + 0.3 and last > 0.5, f"reward did not rise: first 10 {first:.3f}, last 10 {last:.3f}"
    served = {t.sample_id for batch in served_batches(tmp_path / "buffer") for t in batch}
    assert INTRUDER_ID not in served
    # Secrets stay out of world-readable places: config.json and the engines' options are the owner's.
    assert (tmp_path / "config.json").stat().st_mode & 0o077 == 0
    assert all(path.stat().st_mode & 0o077 == 0 for path in (tmp_path / "secrets").iterdir())


def test_trainer_ranks_spread_over_two_nodes_train_together(cluster, tmp_path):
    """trainer.processes = 2 over cluster.trainer_nodes = 2: one FSDP rank per node (gloo), meeting at
    torchrun's rendezvous on the first trainer node; rank 0 leads, the other follows its batches."""
    overrides = ("trainer.total_steps=12", "trainer.processes=2", "cluster.trainer_nodes=2")
    process = start_ray_run(cluster, tmp_path, *overrides)
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output[-4000:]
    placement = placement_of(output)
    assert placement["trainer"] != placement["trainer_node1"], placement
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 13))
    # The second node's rank loaded the model and no rank failed (torchrun's agents may log a lost
    # exit barrier when the first node's agent, which hosts the rendezvous store, finishes first).
    second = (tmp_path / "logs" / "trainer_node1.log").read_text()
    assert "Loading weights" in second and "ChildFailedError" not in second, second[-2000:]


def test_distributed_weight_sync_broadcasts_across_nodes(cluster, tmp_path):
    """gloo from trainer rank 0, whose node hosts the group's store, to engines on both nodes."""
    process = start_ray_run(cluster, tmp_path, "trainer.total_steps=8", "weight_sync.method=distributed")
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output[-4000:]
    placement = placement_of(output)
    assert placement["engine0"] != placement["engine1"]
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(r["weight_sync/engines_missed"] == 0 for r in records)


def test_killing_the_actors_of_one_node_mid_run_is_survived(cluster, tmp_path):
    steps = 40
    process = start_ray_run(cluster, tmp_path, f"trainer.total_steps={steps}", "run.restart_backoff_s=0.2")
    output = _read_until(process, "placement")
    placement = placement_of(output)
    node = placement["engine1"]
    victims = [name for name, at in placement.items() if at == node]
    _await_step(tmp_path / "metrics.jsonl", 5)
    killed = _kill_hosts(cluster, tmp_path, victims)
    rest, _ = process.communicate(timeout=240)
    output += rest
    assert process.returncode == 0, output[-4000:]
    assert killed == sorted(victims)
    for name in victims:
        assert f"restarting {name}" in output, output[-4000:]
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[-1]["step"] == steps and max(r["staleness/max"] for r in records) <= 1


def test_a_lost_node_is_survived_and_its_engine_followed_to_its_new_place(cluster, tmp_path):
    """The node of engine1 dies mid-run; Ray re-places its bundles on the other node, where engine1
    listens on a new port: the registry tells the trainer and the worker. Last in this module: it
    takes a node away (and brings one back for whatever runs next). The run is long enough (~95 steps
    after the loss) to outlast Ray's detection of the lost node and engine1's restart elsewhere."""
    steps = 100
    process = start_ray_run(
        cluster, tmp_path, f"trainer.total_steps={steps}", "run.restart_backoff_s=0.2", "cluster.engine_strategy=SPREAD"
    )
    output = _read_until(process, "placement")
    placement = placement_of(output)
    _await_step(tmp_path / "metrics.jsonl", 5)
    before = msgspec.json.decode((tmp_path / "engines.json").read_bytes())
    lost = placement["engine1"]
    cluster.kill_node(lost)
    try:
        rest, _ = process.communicate(timeout=240)
    finally:
        cluster.add_node("c")
    output += rest
    assert process.returncode == 0, output[-4000:]
    moved = [
        f"engine{i}"
        for i, (old, new) in enumerate(zip(before, msgspec.json.decode((tmp_path / "engines.json").read_bytes())))
        if old != new
    ]
    assert moved == [name for name in ("engine0", "engine1") if placement[name] == lost], (before, placement)
    for name in (name for name, node in placement.items() if node == lost):
        assert f"restarting {name}" in output, output[-4000:]
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[-1]["step"] == steps and max(r["staleness/max"] for r in records) <= 1


# ---- helpers -------------------------------------------------------------------------------------

INTRUDER_ID = "intruder-0"


def _read_until(process: subprocess.Popen, marker: str, timeout_s: float = 120.0) -> str:
    """The run's console up to and including the first line holding `marker`."""
    assert process.stdout is not None
    lines = []
    deadline = time.monotonic() + timeout_s
    for line in process.stdout:  # the run prints its start lines within seconds
        lines.append(line)
        if marker in line:
            return "".join(lines)
        assert time.monotonic() < deadline, "".join(lines)
    raise AssertionError(f"the run ended before printing {marker!r}:\n" + "".join(lines))


def _await_step(metrics: Path, step: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not (metrics.exists() and len(read_metrics(metrics)) >= step):
        assert time.monotonic() < deadline, f"no step {step} within {timeout_s} s"
        time.sleep(0.2)


def _node_address(cluster: LocalCluster) -> str:
    return _in_cluster(cluster, "ray.util.get_node_ip_address()")


def _submit_from_a_ray_task(cluster: LocalCluster, submit: str) -> str:
    """A Ray task on the cluster, without the run's CURVE keys, tries to submit a trajectory."""
    return _in_cluster(
        cluster,
        f"""ray.get(intrude.remote({submit!r}))""",
        preamble=f"""
@ray.remote(num_cpus=0)
def intrude(endpoint):
    import asyncio
    from async_rl.transport import TrajectorySender
    from tests.helpers import make_trajectory

    async def attempt():
        async with TrajectorySender(endpoint) as sender:
            await sender.send(make_trajectory({INTRUDER_ID!r}, "intruders"))
            try:
                await sender.flush(3.0)
            except TimeoutError:
                return "no acknowledgement"
            return "accepted"
    return asyncio.run(attempt())
""",
    )


def _kill_hosts(cluster: LocalCluster, run_dir: Path, names: list[str]) -> list[str]:
    """Kill the named components' Ray actors (Ray restarts them; their processes die with them)."""
    from async_rl.config import RunConfig
    from async_rl.ray_cluster import namespace

    config = msgspec.json.decode((run_dir / "config.json").read_bytes(), type=RunConfig)
    return msgspec.json.decode(
        _in_cluster(
            cluster,
            f"""json.dumps(sorted(kill(name) for name in {names!r}))""",
            preamble="""
import json

def kill(name):
    ray.kill(ray.get_actor(name), no_restart=False)
    return name
""",
            namespace=namespace(config),
        )
    )


def _in_cluster(cluster: LocalCluster, expression: str, preamble: str = "", namespace: str | None = None) -> str:
    """Evaluate `expression` in a fresh driver connected to the cluster (this test process stays out of Ray)."""
    script = f"""
import ray
ray.init(address={cluster.address!r}, namespace={namespace!r}, log_to_driver=False)
{preamble}
print("RESULT", {expression})
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, env=cluster.env, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return next(line for line in done.stdout.splitlines() if line.startswith("RESULT ")).removeprefix("RESULT ")
