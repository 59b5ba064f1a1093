"""Builders the test modules share (fixtures live in conftest.py): trajectories, buffer records, buffer processes."""

from __future__ import annotations

import select
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec

from async_rl.messages import Trajectory, encode
from buffer.frames import read_header
from buffer.inspect import served_at_versions
from buffer.replay import ReplayBuffer
from buffer.wal import Put
from rollout_workers.launcher import free_port

REPO = Path(__file__).resolve().parents[1]


def make_trajectory(
    sample: str,
    group: str,
    version: int = 0,
    group_size: int = 2,
    partial: bool = False,
    attempt: int = 1,
    tokens: int = 4,
) -> Trajectory:
    return Trajectory(
        sample_id=sample,
        group_id=group,
        group_size=group_size,
        prompt_ids=[1, 2],
        response_ids=list(range(tokens)),
        behavior_logprobs=[-0.5] * tokens,
        token_versions=[version] + [version + 1] * (tokens - 1),
        partial=partial,
        attempt=attempt,
    )


def put(buffer: ReplayBuffer, trajectory: Trajectory):
    """What the service does per submission; returns the refusal ack or None when stored."""
    header = read_header(encode(trajectory))
    refusal = buffer.admit(header)
    if refusal is None:
        buffer.apply(Put(frame=msgspec.Raw(encode(trajectory))), header)
    return refusal


def take(buffer: ReplayBuffer, trainer_version: int, num_groups: int, max_staleness: int, include_stale=False):
    plan = buffer.plan_batch(trainer_version, num_groups, max_staleness, include_stale)
    for record in (plan.dropped, plan.served):
        if record is not None:
            buffer.apply(record)
    return plan


def fill_group(buffer, group, version, size=2):
    for i in range(size):
        assert put(buffer, make_trajectory(f"{group}-{i}", group, version, group_size=size)) is None


def buffer_endpoints() -> tuple[str, str]:
    """Fresh submit and serve endpoints on loopback."""
    return f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"


@contextmanager
def buffer_process(directory: Path, submit: str, serve: str, *extra: str) -> Iterator[subprocess.Popen]:
    """`async-rl buffer serve` on `directory` (its WAL) until the block ends; a test may kill it and start another."""
    log_file = open(directory / "service.log", "a")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "async_rl.cli",
            "buffer",
            "serve",
            "--dir",
            str(directory),
            "--bind-submit",
            submit,
            "--bind-serve",
            serve,
            *extra,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=log_file,
        text=True,
    )
    try:
        ready, _, _ = select.select([process.stdout], [], [], 20)
        assert ready and "buffer ready" in process.stdout.readline(), (directory / "service.log").read_text()
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(10)
        log_file.close()


def start_run(run_dir: Path, *args: str, recipe: str = "recipes/tiny.toml", env=None) -> subprocess.Popen:
    """`async-rl run RECIPE` into `run_dir` (at most 120 s), its console captured."""
    argv = [sys.executable, "-m", "async_rl.cli", "run", recipe, "--set", f"run.output_dir={run_dir}"]
    argv += ["--set", "run.max_wall_s=120", *args]
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def finish(process: subprocess.Popen, timeout_s: float = 150) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout_s)
    return process.returncode, output


def served_batches(buffer_dir: Path) -> list[list[Trajectory]]:
    """The batches the buffer served, in order."""
    return [batch for _, batch in served_at_versions(buffer_dir)]
