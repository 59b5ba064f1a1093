"""The supervisor with real child processes: crash reports, clean stops, signals, no orphans."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from async_rl.supervisor import ChildFailed, ProcessSpec, RestartPolicy, Supervisor, log_tail

PY = sys.executable
REPO = Path(__file__).resolve().parent.parent
SLEEP = [PY, "-c", "import time; time.sleep(60)"]


def alive(pid: int) -> bool:
    """Running (a zombie counts as gone: it no longer runs, only awaits its parent's reaping)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for(predicate, timeout_s: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return result


async def async_wait_for(predicate, timeout_s: float = 10.0):
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_crash_stops_the_rest_and_reports_exit_code_and_log_tail(tmp_path):
    crash = "import sys\nfor i in range(100): print('line', i)\nsys.exit(3)"
    async with asyncio.timeout(20):
        async with Supervisor(tmp_path, grace_s=5, handle_signals=False) as supervisor:
            sleeper = await supervisor.start(ProcessSpec(name="sleeper", argv=SLEEP))
            await supervisor.start(ProcessSpec(name="crasher", argv=[PY, "-c", crash]))
            outcome = await supervisor.wait()
    assert outcome.status == "failed" and outcome.exit_code == 1
    assert outcome.child.name == "crasher" and outcome.child.returncode == 3
    assert outcome.child.log_tail == [f"line {i}" for i in range(60, 100)]
    assert "'crasher' exited with code 3" in outcome.message and "line 99" in outcome.message
    assert not alive(sleeper)
    assert supervisor.returncodes["sleeper"] == -signal.SIGTERM


async def test_finishing_child_ends_the_run_and_a_service_exit_is_a_failure(tmp_path):
    async with asyncio.timeout(20):
        async with Supervisor(tmp_path / "a", handle_signals=False) as supervisor:
            service = await supervisor.start(ProcessSpec(name="service", argv=SLEEP))
            await supervisor.start(ProcessSpec(name="trainer", argv=[PY, "-c", "print('done')"], finishes_run=True))
            finished = await supervisor.wait()
        assert finished.status == "finished" and finished.exit_code == 0 and not alive(service)

        async with Supervisor(tmp_path / "b", handle_signals=False) as supervisor:
            await supervisor.start(ProcessSpec(name="buffer", argv=[PY, "-c", "pass"]))
            failed = await supervisor.wait()
        assert failed.status == "failed" and failed.child.name == "buffer" and failed.child.returncode == 0


async def test_child_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path):
    stubborn = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    )
    async with asyncio.timeout(20):
        async with Supervisor(tmp_path, grace_s=0.5, handle_signals=False) as supervisor:
            pid = await supervisor.start(ProcessSpec(name="stubborn", argv=[PY, "-c", stubborn]))
            await async_wait_for(lambda: log_tail(tmp_path / "stubborn.log") == ["ready"])
            outcome = await supervisor.wait(timeout_s=0.01)
            stop_started = time.monotonic()
        assert time.monotonic() - stop_started >= 0.5
    assert outcome.status == "timed_out" and outcome.exit_code == 124
    assert supervisor.returncodes["stubborn"] == -signal.SIGKILL and not alive(pid)


async def test_guard_raises_when_a_child_dies_during_an_await(tmp_path):
    never = asyncio.Event()
    async with asyncio.timeout(20):
        async with Supervisor(tmp_path, handle_signals=False) as supervisor:
            assert await supervisor.guard(asyncio.sleep(0, result=5)) == 5
            await supervisor.start(
                ProcessSpec(name="engine", argv=[PY, "-c", "print('bad weights'); raise SystemExit(7)"])
            )
            with pytest.raises(ChildFailed) as failure:
                await supervisor.guard(never.wait())
    assert failure.value.child.returncode == 7 and failure.value.child.log_tail == ["bad weights"]


async def test_bad_command_is_reported_not_hung(tmp_path):
    async with asyncio.timeout(10):
        async with Supervisor(tmp_path, handle_signals=False) as supervisor:
            with pytest.raises(FileNotFoundError):
                await supervisor.start(ProcessSpec(name="missing", argv=[str(tmp_path / "no-such-binary")]))


SUPERVISOR_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from async_rl.supervisor import ProcessSpec, Supervisor

    # Each child spawns a grandchild, prints both pids, and optionally ignores SIGTERM.
    CHILD = '''
    import os, signal, subprocess, sys, time
    if sys.argv[1] == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print(os.getpid(), grandchild.pid, flush=True)
    time.sleep(60)
    '''

    async def main(log_dir, mode, grace_s):
        async with Supervisor(log_dir, grace_s=grace_s) as supervisor:
            for name in ("a", "b"):
                await supervisor.start(ProcessSpec(name=name, argv=[sys.executable, "-c", CHILD, mode]))
            outcome = await supervisor.wait()
            print("OUTCOME", outcome.status, flush=True)
        return outcome.exit_code

    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]))))
""")


def _start_supervisor(tmp_path: Path, mode: str, grace_s: float):
    script = tmp_path / "supervise.py"
    script.write_text(SUPERVISOR_SCRIPT)
    process = subprocess.Popen(
        [PY, str(script), str(tmp_path / "logs"), mode, str(grace_s)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )

    def pids_logged():
        """Both children's pid lines, once each is whole (print's pieces may land as separate writes)."""
        logs = [tmp_path / "logs" / f"{name}.log" for name in ("a", "b")]
        texts = [log.read_text() if log.exists() else "" for log in logs]
        if not all("\n" in text for text in texts):
            return None
        return [int(pid) for text in texts for pid in text.split("\n", 1)[0].split()]

    return process, wait_for(pids_logged, what="children to start")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_supervisor_stops_children_and_grandchildren(tmp_path, sig):
    process, pids = _start_supervisor(tmp_path, "polite", grace_s=5)
    try:
        assert len(pids) == 4 and all(map(alive, pids))
        process.send_signal(sig)
        out, _ = process.communicate(timeout=15)
    finally:
        process.kill()
    assert process.returncode == 130 and "OUTCOME interrupted" in out
    wait_for(lambda: not any(map(alive, pids)), timeout_s=5, what="every child and grandchild to be gone")


def test_second_sigint_skips_the_grace_period(tmp_path):
    process, pids = _start_supervisor(tmp_path, "stubborn", grace_s=60)
    try:
        process.send_signal(signal.SIGINT)
        assert process.stdout.readline().strip() == "OUTCOME interrupted"
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        process.wait(timeout=15)
    finally:
        process.kill()
    assert time.monotonic() - started < 15 and process.returncode == 130
    wait_for(lambda: not any(map(alive, pids)), timeout_s=5, what="every child and grandchild to be gone")


async def test_a_dying_child_is_restarted_within_its_budget_then_ends_the_run(tmp_path):
    """Exits 1 on its first two starts (a counter file says which start this is), then keeps running."""
    counter = tmp_path / "starts"
    script = (
        "import pathlib, sys, time\n"
        f"p = pathlib.Path({str(counter)!r}); n = int(p.read_text()) + 1 if p.exists() else 1; p.write_text(str(n))\n"
        "print('start', n, flush=True)\n"
        "sys.exit(1) if n <= 2 else time.sleep(60)\n"
    )
    restarted: list[str] = []

    async def on_restart(name, exit_):
        restarted.append(f"{name}:{exit_.returncode}")

    async with asyncio.timeout(30):
        async with Supervisor(tmp_path / "logs", handle_signals=False, on_restart=on_restart) as supervisor:
            await supervisor.start(
                ProcessSpec(
                    name="flaky", argv=[PY, "-c", script], restart=RestartPolicy(max_restarts=2, backoff_s=0.05)
                )
            )
            await async_wait_for(lambda: counter.exists() and counter.read_text() == "3")
            assert supervisor.restarts == {"flaky": 2} and restarted == ["flaky:1", "flaky:1"]
            assert supervisor.returncodes["flaky"] is None  # the third start is running
        log = (tmp_path / "logs" / "flaky.log").read_text()
        assert [line for line in log.splitlines() if line.startswith("start")] == ["start 1", "start 2", "start 3"]

        counter.unlink()
        async with Supervisor(tmp_path / "logs2", handle_signals=False) as supervisor:
            await supervisor.start(
                ProcessSpec(
                    name="flaky", argv=[PY, "-c", script], restart=RestartPolicy(max_restarts=1, backoff_s=0.05)
                )
            )
            outcome = await supervisor.wait()
    assert (
        outcome.status == "failed"
        and "after 1 restarts within 3600 s" in outcome.message
        and "start 2" in outcome.message
    )


async def test_a_components_members_fail_and_restart_together(tmp_path):
    """A component on several nodes (its members): one member dying kills the others, and all start
    again as one; all finishing cleanly finishes the run."""
    starts = tmp_path / "starts"
    starts.mkdir()
    # Each start records itself; the member "b" fails on the first start, every process then finishes.
    script = (
        "import os, pathlib, sys, time\n"
        f"d = pathlib.Path({str(starts)!r}); name = sys.argv[1]; n = int(os.environ['ASYNC_RL_RESTARTS'])\n"
        "(d / f'{name}{n}').write_text(str(os.getpid()))\n"
        "if name == 'b' and n == 0: time.sleep(0.5); sys.exit(5)\n"
        "time.sleep(60 if n == 0 else 0.5)\n"
    )
    member = ProcessSpec(name="lead_b", argv=[PY, "-c", script, "b"])
    spec = ProcessSpec(
        name="lead",
        argv=[PY, "-c", script, "a"],
        finishes_run=True,
        restart=RestartPolicy(max_restarts=1, backoff_s=0.05),
        members=[member],
    )
    async with asyncio.timeout(30):
        async with Supervisor(tmp_path / "logs", handle_signals=False) as supervisor:
            await supervisor.start(spec)
            outcome = await supervisor.wait()
    assert outcome.status == "finished", outcome.message
    assert sorted(path.name for path in starts.iterdir()) == ["a0", "a1", "b0", "b1"]
    assert not alive(int((starts / "a0").read_text()))  # killed when its member failed
    assert supervisor.restarts == {"lead": 1}
    assert (tmp_path / "logs" / "lead_b.log").exists()


async def test_a_member_that_outlives_its_finished_peers_is_killed_and_fails_the_component(tmp_path, monkeypatch):
    """All members finish together; one still running MEMBERS_FINISH_S after the first finished hangs."""
    import async_rl.supervisor as supervisor_module

    monkeypatch.setattr(supervisor_module, "MEMBERS_FINISH_S", 0.5)
    hanging = ProcessSpec(name="lead_b", argv=SLEEP)
    spec = ProcessSpec(name="lead", argv=[PY, "-c", "pass"], finishes_run=True, members=[hanging])
    async with asyncio.timeout(20):
        async with Supervisor(tmp_path / "logs", handle_signals=False) as supervisor:
            await supervisor.start(spec)
            outcome = await supervisor.wait()
    assert outcome.status == "failed" and outcome.child.returncode == -signal.SIGKILL, outcome.message
