"""`async-rl run` survives components killed mid-run: kill -9 of an engine or of the buffer service."""

from __future__ import annotations

import os
import random
import re
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from async_rl.chaos import signal_component
from async_rl.metrics import read_metrics
from async_rl.trainer_main import TRAINED_NAME, trained_history
from rollout_workers.launcher import free_port
from tests.helpers import finish, served_at_versions, served_batches, start_run

pytestmark = pytest.mark.slow


LONG_RUN_TWO_ENGINES = ("--set", "trainer.total_steps=1000", "--set", "engine.count=2")  # stopped by the test


def scrape(port: int) -> dict[str, float]:
    """The run's /metrics as {'name{labels}': value} (comment lines skipped)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if line and line[0] != "#"}


def wait_for_step(process, metrics: Path, step: int, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while not (metrics.exists() and any(r["step"] >= step for r in read_metrics(metrics))):
        assert process.poll() is None and time.monotonic() < deadline, f"the run ended or stalled before step {step}"
        time.sleep(0.1)


def test_a_killed_engine_is_restarted_and_routed_again_at_the_current_version(tmp_path):
    """Two engines: the workers route around the dead one at once; it restarts from the newest weights
    snapshot and is routed again only once it serves the trainer's version. The run (1000 steps) is
    stopped once the restarted engine has served 10 more steps."""
    metrics_port = free_port()
    process = start_run(
        tmp_path,
        *LONG_RUN_TWO_ENGINES,
        "--set",
        f"run.prometheus_port={metrics_port}",
    )
    metrics, worker_log = tmp_path / "metrics.jsonl", tmp_path / "logs" / "worker0.log"
    wait_for_step(process, metrics, 5)
    port = re.search(r"on http://127\.0\.0\.1:(\d+)", (tmp_path / "logs" / "engine0.log").read_text()).group(1)
    assert signal_component(tmp_path, "engine0")
    deadline = time.monotonic() + 90
    while not (worker_log.exists() and "engine 0 (http://127.0.0.1:" + port + ") is back" in worker_log.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, "the engine never came back"
        time.sleep(0.1)
    back_at = max(r["step"] for r in read_metrics(metrics))
    wait_for_step(process, metrics, back_at + 10)
    scraped = scrape(metrics_port)  # the run's Prometheus endpoint says what happened
    assert scraped['async_rl_component_restarts_total{component="engine0"}'] == 1
    assert all(
        scraped[f'async_rl_component_up{{component="{name}"}}'] == 1 for name in ("engine0", "engine1", "trainer")
    )
    assert scraped["async_rl_trainer_version"] >= back_at and "async_rl_buffer_stored_samples" in scraped
    assert scraped['async_rl_rollout_tokens_generated_total{worker="worker0"}'] > 0
    process.send_signal(signal.SIGINT)
    code, output = finish(process)
    assert code == 130, output
    assert "restarting engine0" in output, output
    records = read_metrics(metrics)
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    assert max(r["staleness/max"] for r in records) <= 1
    engine_log = (tmp_path / "logs" / "engine0.log").read_text()
    restarted = engine_log.split("supervisor: exit -9, restart 1")[1]
    assert "engine ready: " + str(tmp_path / "restart" / "engine0") in restarted, restarted[-2000:]
    assert "is down" in worker_log.read_text()
    # The restarted engine generated again: some of the last batches come from it.
    late = [t for batch in served_batches(tmp_path / "buffer")[-5:] for t in batch]
    assert any(t.engine_id.endswith(f":{port}") for t in late), {t.engine_id for t in late}


HANGING_TASKS = '''
"""Hands out `count` tasks, then never answers: the rollout worker hangs inside this generator."""
import time

from recipes.tasks import digit_task


def stalls_after(seed: int = 0, count: int = 40):
    tasks = digit_task(seed)
    for _ in range(count):
        yield next(tasks)
    time.sleep(3600)
'''


def test_a_hung_run_dumps_every_stack_names_the_stuck_call_and_ends(tmp_path):
    (tmp_path / "hang_tasks.py").write_text(HANGING_TASKS)
    process = start_run(
        tmp_path / "run",
        "--set",
        "task.generator=hang_tasks:stalls_after",
        "--set",
        "task.kwargs={ count = 40 }",  # 2.5 batches of 16-sample groups
        "--set",
        "run.watchdog_s=4",
        "--set",
        "trainer.total_steps=50",
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    code, output = finish(process)
    assert code == 3, output
    assert "watchdog: no trainer step, trajectory or weight sync for 4 s" in output, output
    report = {
        line.split(":")[0].strip().rsplit("-", 1)[0]: line for line in output.splitlines() if line.startswith("  ")
    }
    assert {"engine0", "buffer", "trainer", "worker0"} <= set(report), output
    assert "main thread in stalls_after (hang_tasks.py:" in report["worker0"], report["worker0"]
    assert "transport.py" in report["trainer"], report["trainer"]  # waiting on the buffer for a batch
    dumps = {path.name.rsplit("-", 1)[0] for path in (tmp_path / "run" / "stacks").glob("*.txt")}
    assert dumps == {"engine0", "buffer", "trainer", "worker0"}
    assert "run hung" in output


def test_chaos_every_kind_of_component_killed_once_and_the_run_completes(tmp_path):
    """kill -9 of an engine, the buffer, the worker and the trainer, in a random order a few steps
    apart: the run completes total_steps; from the buffer's log and the trainer's records, no
    acknowledged sample is lost (every served batch is in the final model's history), none is
    trained twice, every one within eta."""
    order = ["engine", "buffer", "worker", "trainer"]
    random.Random().shuffle(order)
    steps = 60
    process = start_run(
        tmp_path,
        "--set",
        f"trainer.total_steps={steps}",
        "--set",
        "trainer.checkpoint_interval=5",
        "--set",
        "engine.count=2",
        "--set",
        "buffer.fsync=batch",
    )
    metrics = tmp_path / "metrics.jsonl"
    reached = 0
    for kind in order:
        reached += 8
        wait_for_step(process, metrics, reached)
        assert signal_component(tmp_path, {"engine": "engine1", "worker": "worker0"}.get(kind, kind))
        reached = max(r["step"] for r in read_metrics(metrics))  # a resumed trainer starts lower
    code, output = finish(process, timeout_s=200)
    assert code == 0, (order, output)
    for name in ("engine1", "buffer", "worker0", "trainer"):
        assert f"restarting {name}" in output, (order, output)
    records = read_metrics(metrics)
    assert records[-1]["step"] == steps and max(r["staleness/max"] for r in records) <= 1
    batches = served_at_versions(tmp_path / "buffer")
    served = [t.sample_id for _, batch in batches for t in batch]
    assert len(served) == len(set(served)), "a sample was served for two versions"
    for version, batch in batches:
        assert all(version - min(t.token_versions) <= 1 for t in batch)
    # The trainer's records: the final model's history trained every served batch at its version
    # (a resumed trainer got the batches it had lost again), none twice.
    history = trained_history(tmp_path / TRAINED_NAME)
    assert sorted(history) == list(range(steps))
    assert {version: [t.sample_id for t in batch] for version, batch in batches} == history
    # The trainer resumed from a checkpoint (a multiple of 5) and the restarted worker aligned to it.
    steps_logged = [r["step"] for r in records]
    back = [steps_logged[i] - 1 for i in range(1, len(steps_logged)) if steps_logged[i] <= steps_logged[i - 1]]
    assert all(step % 5 == 0 for step in back)  # none when it was killed just after a checkpoint
    worker_log = (tmp_path / "logs" / "worker0.log").read_text()
    assert "aligned to the trainer's version" in worker_log and "recovered from the buffer" in worker_log


def test_an_engine_that_stops_answering_is_killed_restarted_and_routed_again(tmp_path):
    """SIGSTOP: the engine is alive but hung. The health monitor notices the missed deadlines."""
    process = start_run(
        tmp_path,
        *LONG_RUN_TWO_ENGINES,
        "--set",
        "engine.health_interval_s=0.5",
        "--set",
        "engine.health_timeout_s=2",
        "--set",
        "engine.health_failures=2",
    )
    metrics, worker_log = tmp_path / "metrics.jsonl", tmp_path / "logs" / "worker0.log"
    wait_for_step(process, metrics, 5)
    port = re.search(r"on http://127\.0\.0\.1:(\d+)", (tmp_path / "logs" / "engine0.log").read_text()).group(1)
    assert signal_component(tmp_path, "engine0", signal.SIGSTOP)
    deadline = time.monotonic() + 90
    while not (worker_log.exists() and f"engine 0 (http://127.0.0.1:{port}) is back" in worker_log.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, "the engine never came back"
        time.sleep(0.1)
    wait_for_step(process, metrics, max(r["step"] for r in read_metrics(metrics)) + 5)
    process.send_signal(signal.SIGINT)
    code, output = finish(process)
    assert code == 130, output
    assert "engine0" in output and "/health_generate deadlines" in output and "restarting engine0" in output, output
    records = read_metrics(metrics)
    assert max(r["staleness/max"] for r in records) <= 1
