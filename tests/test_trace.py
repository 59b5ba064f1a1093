"""Trace files: valid Trace Event Format, readable after a crash, mergeable across processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from async_rl.trace import Tracer, merge, read_events

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import sys
from async_rl.trace import Tracer
with Tracer(sys.argv[1], process_name="trainer") as tracer:
    with tracer.span("train step", "trainer", step=0) as args:
        args["tokens"] = 123
    tracer.instant("publish", "weight-sync", version=1)
"""


def assert_valid_trace(document: dict) -> list[dict]:
    events = document["traceEvents"]
    last_ts: dict[tuple[int, int], float] = defaultdict(lambda: float("-inf"))
    for event in events:
        assert {"ph", "name", "pid", "tid"} <= event.keys(), event
        if event["ph"] == "M":
            assert event["name"] in ("process_name", "thread_name") and "name" in event["args"]
            continue
        assert event["ph"] in ("X", "i") and isinstance(event["ts"], (int, float))
        if event["ph"] == "X":
            assert isinstance(event["dur"], (int, float)) and event["dur"] >= 0
        key = (event["pid"], event["tid"])
        assert event["ts"] >= last_ts[key], "events must be time-ordered within a track"
        last_ts[key] = event["ts"]
    return events


def test_spans_from_threads_merge_with_another_process(tmp_path):
    parent_file, child_file = tmp_path / "engine.trace", tmp_path / "trainer.trace"
    child = subprocess.run([sys.executable, "-c", CHILD, str(child_file)], capture_output=True, timeout=60)
    assert child.returncode == 0, child.stderr
    with Tracer(parent_file, process_name="engines") as tracer:

        def engine(i: int) -> None:
            for step in range(20):
                with tracer.span("generate", f"engine-{i}", step=step):
                    pass

        threads = [threading.Thread(target=engine, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        start = time.time()
        tracer.complete("pause", "engine-0", start, start + 0.25, reason="sync")
        with pytest.raises(ValueError, match="ends before it starts"):
            tracer.complete("bad", "engine-0", start, start - 1)
    assert isinstance(json.loads(parent_file.read_text()), list)  # a closed stream is plain JSON too

    out = tmp_path / "merged.json"
    assert merge([parent_file, child_file], out) == len(read_events(parent_file)) + len(read_events(child_file))
    events = assert_valid_trace(json.loads(out.read_text()))
    assert len({e["pid"] for e in events}) == 2
    pause = next(e for e in events if e["name"] == "pause")
    assert pause["dur"] == pytest.approx(250_000) and pause["args"] == {"reason": "sync"}
    step = next(e for e in events if e["name"] == "train step")
    assert step["args"] == {"step": 0, "tokens": 123}
    tracks = {e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert tracks == {"engine-0", "engine-1", "engine-2", "engine-3", "trainer", "weight-sync"}
    assert sum(e["name"] == "generate" for e in events) == 80


def test_file_of_a_crashed_process_still_reads(tmp_path):
    path = tmp_path / "crashed.trace"
    tracer = Tracer(path)
    tracer.instant("started", "engine-0")
    tracer.complete("generate", "engine-0", 1.0, 2.0, tokens=7)
    with path.open("a") as file:  # the process died mid-write: no closing bracket, a torn last line
        file.write(',{"ph": "X", "name": "torn')
    events = read_events(path)
    assert [e["name"] for e in events if e["ph"] != "M"] == ["started", "generate"]
    merge([path], tmp_path / "out.json")
    assert_valid_trace(json.loads((tmp_path / "out.json").read_text()))
    tracer.close()


def test_disabled_tracer_records_nothing():
    tracer = Tracer(None)
    with tracer.span("generate", "engine-0") as args:
        args["tokens"] = 1
    tracer.instant("x", "engine-0")
    tracer.complete("y", "engine-0", 0.0, 1.0)
    assert not tracer.enabled
    tracer.close()


def test_merge_run_merges_a_run_dirs_trace_files(tmp_path, capsys):
    from argparse import Namespace

    from async_rl.trace import TRACE_DIR, main, merge_run

    assert merge_run(tmp_path) is None and main(Namespace(run_dir=str(tmp_path))) == 1
    assert "no trace files" in capsys.readouterr().err
    for name in ("trainer", "worker0"):
        with Tracer(tmp_path / TRACE_DIR / f"{name}.json", process_name=name) as tracer:
            tracer.complete("outer", "t", 1.0, 3.0)
            tracer.complete("inner", "t", 1.0, 2.0)  # written first, like a span nested in a longer one
    assert main(Namespace(run_dir=str(tmp_path))) == 0 and merge_run(tmp_path) == tmp_path / "trace.json"
    events = assert_valid_trace(json.loads((tmp_path / "trace.json").read_text()))
    names = [e["name"] for e in events if e["ph"] == "X"]
    assert names == ["outer", "outer", "inner", "inner"]  # at equal start the enclosing span comes first


def spans_named(events: list[dict], name: str, key: str) -> dict[int, dict]:
    return {e["args"][key]: e for e in events if e["ph"] == "X" and e["name"] == name}


def end(span: dict) -> float:
    return span["ts"] + span["dur"]


@pytest.mark.slow
def test_a_run_interrupted_by_ctrl_c_leaves_a_merged_trace(tmp_path):
    """A real `async-rl run` of the tiny recipe, stopped with SIGINT after a few steps."""
    from async_rl.metrics import read_metrics

    argv = [
        sys.executable,
        "-m",
        "async_rl.cli",
        "run",
        "recipes/tiny.toml",
        "--set",
        f"run.output_dir={tmp_path}",
        "--set",
        "trainer.total_steps=1000",
        "--set",
        "run.max_wall_s=60",
        "--set",
        "trainer.checkpoint_interval=2",
    ]
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        metrics = tmp_path / "metrics.jsonl"
        while not (metrics.exists() and len(read_metrics(metrics)) >= 3):
            assert process.poll() is None and time.monotonic() < deadline, "the run ended or stalled before step 3"
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, output

    events = assert_valid_trace(json.loads((tmp_path / "trace.json").read_text()))
    files = sorted((tmp_path / "trace").glob("*.json"))  # one per process that traces: trainer, workers, ...
    assert len(events) == sum(len(read_events(path)) for path in files)
    assert len({e["pid"] for e in events}) == len(files) and (tmp_path / "trace" / "trainer-v0.json") in files
    steps, syncs = spans_named(events, "train step", "step"), spans_named(events, "weight sync", "version")
    waits = spans_named(events, "batch wait", "version")
    assert len(steps) >= 3 and set(steps) - set(syncs) <= {max(steps)}  # the last step may have been interrupted
    snapshots = spans_named(events, "snapshot weights", "version")

    def engine_phases(version):
        named = ("pause", "update", "continue")
        chosen = (e for e in events if e["ph"] == "X" and e["name"] in named and e["args"]["version"] == version)
        return sorted(chosen, key=lambda e: e["ts"])

    for n in sorted(syncs):
        assert end(waits[n - 1]) <= steps[n]["ts"] and end(steps[n]) <= syncs[n]["ts"]
        # The engines load version n while the trainer waits for (and trains on) the next batch; the
        # next version's snapshot may be written meanwhile, but the engines load versions one at a time.
        assert end(snapshots[n]) <= waits[n]["ts"] if n in waits else True
        phases = engine_phases(n)
        if n + 1 in syncs:
            assert end(phases[-1]) <= engine_phases(n + 1)[0]["ts"]
        assert [e["name"] for e in phases] == ["pause", "update", "continue"]  # one engine
        assert syncs[n]["ts"] <= phases[0]["ts"] and all(end(a) <= b["ts"] for a, b in zip(phases, phases[1:]))
        assert end(phases[-1]) <= end(syncs[n]) + 1  # rounding to the microsecond
    checkpoints = spans_named(events, "checkpoint", "step")
    assert checkpoints and all(end(snapshots[n]) <= checkpoints[n]["ts"] for n in checkpoints)
    generates = [e for e in events if e["name"] == "generate"]  # recorded by the rollout worker, when it traces
    assert all(e["ph"] == "X" for e in generates)
