"""Metrics reach metrics.jsonl and TensorBoard every step; the console degrades to plain lines."""

from __future__ import annotations

import importlib
import io
from datetime import datetime

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


def test_wandb_offline_needs_no_network_and_a_restart_resumes_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    for steps in ([1, 2], [3]):  # a trainer restart opens the sink again
        with MetricsSink(tmp_path, tensorboard=False, wandb="offline", config={"trainer": {"lr": 0.125}}) as sink:
            for step in steps:
                sink.log(step, {REWARD: step / 8, "note": "not a number"})
    run_id = (tmp_path / "wandb_id").read_text()
    logs = [
        path.read_bytes() for path in sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    ]
    # The offline log (protobuf records, values as JSON) that `wandb sync` uploads: one per start, one run id.
    assert len(logs) == 2 and b'"lr":0.125' in logs[0] and REWARD.encode() in logs[1]
    assert b"0.25" in logs[0] and b"0.375" in logs[1] and b"not a number" not in logs[1]


def test_wandb_start_in_the_same_second_as_the_last_keeps_the_last_log(tmp_path, monkeypatch):
    """W&B names a start's folder by its second: a restart within it must not write over the earlier log."""
    importlib.import_module("wandb")  # beforehand: the import alone can take longer than a second

    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_id").write_text("samesecond")
    earlier = tmp_path / "wandb" / f"offline-run-{datetime.now():%Y%m%d_%H%M%S}-samesecond"
    earlier.mkdir(parents=True)
    (earlier / "run-samesecond.wandb").write_bytes(b"the earlier start's log")
    with MetricsSink(tmp_path, tensorboard=False, wandb="offline") as sink:
        sink.log(1, {REWARD: 0.5})
    assert (earlier / "run-samesecond.wandb").read_bytes() == b"the earlier start's log"
    assert len(list((tmp_path / "wandb").glob("offline-run-*-samesecond"))) == 2


def test_progress_display_shows_restarts():
    stream = io.StringIO()
    with ProgressDisplay(total_steps=10, stream=stream) as display:
        display.update(3, {VERSION: 3}, {"engine0": 2, "buffer": 0, "trainer": 1})
    assert "restarts engine0 2 trainer 1" in stream.getvalue()


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
