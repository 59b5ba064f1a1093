"""`async-rl run` survives components killed mid-run: kill -9 of an engine or of the buffer service."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from async_rl.metrics import read_metrics
from tests.test_e2e import finish, served_batches, start_run

pytestmark = pytest.mark.slow


def pid_of(*parts: str) -> int:
    """The pid of the one python process whose command line holds every one of `parts` (scanned from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if all(part in argv for part in parts) and "python" in argv[0]:
            found.append(int(entry.name))
    assert len(found) == 1, (parts, found)
    return found[0]


def wait_for_step(process, metrics: Path, step: int, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while not (metrics.exists() and any(r["step"] >= step for r in read_metrics(metrics))):
        assert process.poll() is None and time.monotonic() < deadline, f"the run ended or stalled before step {step}"
        time.sleep(0.1)


def test_a_killed_engine_is_restarted_and_the_run_finishes_within_eta(tmp_path):
    """Two engines: the workers route around the dead one at once; it restarts from the newest weights
    snapshot and is routed again only once it serves the trainer's version."""
    steps = 100  # long enough after the kill for the restarted engine to serve
    process = start_run(tmp_path, "--set", f"trainer.total_steps={steps}", "--set", "engine.count=2")
    wait_for_step(process, tmp_path / "metrics.jsonl", 5)
    header = (tmp_path / "logs" / "engine0.log").read_text()
    port = re.search(r"on http://127\.0\.0\.1:(\d+)", header).group(1)
    os.kill(pid_of("engine", "serve", port), signal.SIGKILL)
    code, output = finish(process)
    assert code == 0, output
    assert "restarting engine0" in output, output
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert max(r["staleness/max"] for r in records) <= 1
    for batch in served_batches(tmp_path / "buffer"):
        assert all(t.token_versions for t in batch)
    engine_log = (tmp_path / "logs" / "engine0.log").read_text()
    assert "supervisor: exit -9, restart 1" in engine_log
    restarted = engine_log.split("supervisor: exit -9, restart 1")[1]
    assert "engine ready: " + str(tmp_path / "restart" / "engine0") in restarted, restarted[-2000:]
    worker_log = (tmp_path / "logs" / "worker0.log").read_text()
    assert "engine 0" in worker_log and "is down" in worker_log and "is back at version" in worker_log
    # The restarted engine served the rest of the run: some of the last batches were generated there.
    late = [t for batch in served_batches(tmp_path / "buffer")[-5:] for t in batch]
    assert any(t.engine_id.endswith(f":{port}") for t in late), {t.engine_id for t in late}


def test_a_killed_buffer_restarts_from_its_log_and_serves_every_sample_once(tmp_path):
    steps = 30
    process = start_run(tmp_path, "--set", f"trainer.total_steps={steps}", "--set", "buffer.fsync=batch")
    wait_for_step(process, tmp_path / "metrics.jsonl", 5)
    os.kill(pid_of("buffer", "serve", str(tmp_path / "config.json")), signal.SIGKILL)
    code, output = finish(process)
    assert code == 0, output
    assert "restarting buffer" in output, output
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert max(r["staleness/max"] for r in records) <= 1
    served = [t.sample_id for batch in served_batches(tmp_path / "buffer") for t in batch]
    assert len(served) == len(set(served)), "a sample was served twice"
