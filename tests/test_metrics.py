"""Metrics reach metrics.jsonl and TensorBoard every step; the console degrades to plain lines."""

from __future__ import annotations

import io

from async_rl.metrics import REWARD, STALENESS, TOKENS_PER_S, VERSION, MetricsSink, ProgressDisplay, read_metrics


def test_sink_writes_jsonl_and_tensorboard_per_step(tmp_path):
    with MetricsSink(tmp_path) as sink:
        sink.log(1, {REWARD: 0.25, VERSION: 1, "note": "warmup"}, wall_time=100.0)
        # Flushed per step: readable while the run is still going.
        assert read_metrics(tmp_path / "metrics.jsonl") == [
            {"step": 1, "time": 100.0, REWARD: 0.25, VERSION: 1, "note": "warmup"}
        ]
        sink.log(2, {REWARD: float("nan"), "loss": 1.5})
    with (tmp_path / "metrics.jsonl").open("a") as torn:
        torn.write('{"step": 3, "rew')  # a run killed mid-write
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and records[1][REWARD] is None

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {REWARD, VERSION, "loss"}
    assert [(e.step, e.value) for e in events.Scalars(REWARD)][0] == (1, 0.25)
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(2, 1.5)]


def test_progress_display_prints_plain_lines_when_not_a_tty():
    stream = io.StringIO()
    with ProgressDisplay(total_steps=10, stream=stream) as display:
        display.update(3, {REWARD: 0.4312, VERSION: 3, STALENESS: 0.8, TOKENS_PER_S: 1234.4, "other": 1})
    line = stream.getvalue().strip()
    assert line.startswith("step 3/10  reward 0.431  version 3  staleness 0.800  tok/s 1234  elapsed ")


def test_progress_display_live_mode_renders(tmp_path):
    stream = io.StringIO()
    with ProgressDisplay(total_steps=4, stream=stream, live=True) as display:
        display.update(4, {REWARD: 0.9})
    assert "4/4" in stream.getvalue() and "reward 0.900" in stream.getvalue()
