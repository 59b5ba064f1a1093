"""The trainer process's loop against a real buffer process: dropped samples go back to the workers."""

from __future__ import annotations

import asyncio
import json

import msgspec
import zmq
import zmq.asyncio

from async_rl.config import load_config
from async_rl.messages import Trajectory, WeightsPublished, decode
from async_rl.metrics import read_metrics
from async_rl.trace import read_events
from async_rl.trainer_main import train
from async_rl.transport import TrajectorySender
from rollout_workers.engine.model import create_tiny_model
from rollout_workers.launcher import free_port
from tests.helpers import buffer_endpoints, buffer_process, make_trajectory

GROUP_SIZE = 2


def group(name: str, **changes) -> list[Trajectory]:
    return [
        msgspec.structs.replace(make_trajectory(f"{name}-{i}", name, group_size=GROUP_SIZE), **changes)
        for i in range(GROUP_SIZE)
    ]


async def test_refused_batches_and_out_of_bound_groups_are_handed_back_to_admission(tmp_path):
    """Served in order: a malformed group (BatchError), one from versions the trainer has not
    reached (dropped as outside [0, eta]), then a good one that is trained on."""
    model_dir = create_tiny_model(tmp_path / "model", "llama")
    run_dir = tmp_path / "run"
    config = load_config(
        "recipes/tiny.toml",
        [
            f"run.output_dir={run_dir}",
            "trainer.total_steps=1",
            "trainer.groups_per_step=1",
            f"rollout.group_size={GROUP_SIZE}",
        ],
    )
    submit, serve = buffer_endpoints()
    versions = f"tcp://127.0.0.1:{free_port()}"
    subscriber = zmq.asyncio.Context.instance().socket(zmq.SUB)
    # The trainer binds only once its model is loaded and publishes within milliseconds of that:
    # retry the connection every 5 ms (default 100 ms) so this SUB is there in time.
    subscriber.reconnect_ivl = 5
    subscriber.subscribe(b"")
    subscriber.connect(versions)
    (tmp_path / "buffer").mkdir()
    notices: list[WeightsPublished] = []
    with buffer_process(tmp_path / "buffer", submit, serve, "--max-staleness", "1"):
        async with asyncio.timeout(60):
            async with TrajectorySender(submit) as sender:
                for trajectory in (
                    group("bad", response_ids=[0, 1, 2, 10**6])
                    + group("future", token_versions=[5] * 4)
                    + group("good")
                ):
                    await sender.send(trajectory)
                await sender.flush()

            async def collect() -> None:
                while not notices or notices[-1].version < 1:
                    notices.append(decode(await subscriber.recv()))

            async with asyncio.TaskGroup() as tasks:  # a failing trainer fails the test at once
                tasks.create_task(collect())
                tasks.create_task(train(config, model_dir, [], serve, versions))
    subscriber.close(linger=0)

    # Each drop is announced at once at the unchanged version (a SUB that joins late may miss those:
    # PUB/SUB drops before the connection is up); the next version's notice repeats them all.
    assert {gid for n in notices if n.version == 0 for gid in n.dropped_groups} <= {"bad", "future"}
    assert notices[-1].version == 1 and notices[-1].dropped_groups == {"bad": GROUP_SIZE, "future": GROUP_SIZE}
    [record] = read_metrics(run_dir / "metrics.jsonl")
    assert record["trainer/dropped_batches"] == 1 and record["samples"] == GROUP_SIZE
    assert {"weight_sync/pause_s", "weight_sync/update_s", "weight_sync/continue_s"} <= record.keys()
    steps = [e for e in read_events(run_dir / "trace" / "trainer-v0.json") if e["name"] == "train step"]
    assert [("dropped" in e["args"]) for e in steps] == [True, False]
    assert json.loads((run_dir / "trace" / "trainer-v0.json").read_text())  # closed: plain JSON


def test_checkpoints_fall_due_by_steps_by_time_and_at_the_end(monkeypatch):
    import types

    from async_rl.trainer_main import CheckpointClock

    config = load_config(
        "recipes/tiny.toml",
        ["trainer.total_steps=25", "trainer.checkpoint_interval=10", "trainer.checkpoint_interval_s=60"],
    )
    now = [1000.0]
    monkeypatch.setattr("async_rl.trainer_main.time.monotonic", lambda: now[0])
    clock = CheckpointClock(types.SimpleNamespace(world_size=1, rank=0), config)
    assert [v for v in range(1, 26) if clock.due(v)] == [10, 20, 25]
    now[0] += 59
    assert not clock.due(26)
    now[0] += 1  # a minute since the checkpoint at step 25
    assert clock.due(27) and not clock.due(28)
