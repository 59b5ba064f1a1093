"""Trace files: valid Trace Event Format, readable after a crash, mergeable across processes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import defaultdict

import pytest

from async_rl.trace import Tracer, merge, read_events

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
