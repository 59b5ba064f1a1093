"""`async-rl run` end to end: real engine, buffer, trainer and worker processes on the tiny recipe."""

from __future__ import annotations

import signal
import statistics
import time

import msgspec
import pytest

from async_rl.config import RunConfig
from async_rl.metrics import read_metrics
from tests.helpers import finish, served_batches, start_run

pytestmark = pytest.mark.slow


def staleness_values(records: list[dict]) -> set[int]:
    return {
        int(key.rsplit("/", 1)[1]) for r in records for key, n in r.items() if key.startswith("staleness/hist/") and n
    }


def test_tiny_recipe_learns_within_the_staleness_bound(tmp_path):
    code, output = finish(start_run(tmp_path, "--set", "trainer.total_steps=90"))
    assert code == 0, output
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 91))
    rewards = [r["reward/mean"] for r in records]
    first, last = statistics.mean(rewards[:10]), statistics.mean(rewards[-10:])
    assert last > first + 0.3 and last > 0.5, f"reward did not rise: first 10 {first:.3f}, last 10 {last:.3f}"
    assert max(r["staleness/max"] for r in records) <= 1
    assert staleness_values(records) <= {0, 1}
    assert all(r["weight_sync/seconds"] > 0 for r in records)


def test_sync_mode_equals_a_synchronous_replay_of_its_batches(tmp_path):
    code, output = finish(start_run(tmp_path, "--sync", "--set", "trainer.total_steps=15"))
    assert code == 0, output
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert len(records) == 15 and staleness_values(records) == {0}

    import torch
    from safetensors.torch import load_file

    from async_rl.trainer.reference import synchronous_replay
    from async_rl.trainer_main import trainer_context
    from rollout_workers.engine.model import resolve_model_spec

    config = msgspec.json.decode((tmp_path / "config.json").read_bytes(), type=RunConfig)
    batches = served_batches(tmp_path / "buffer")
    assert len(batches) == 15 and all(len(b) == config.batch_size for b in batches)
    replay = synchronous_replay(config.trainer, trainer_context(config, resolve_model_spec(config.model.spec)), batches)
    saved = {}
    for shard in (tmp_path / "checkpoints" / "step_15").glob("*.safetensors"):
        saved.update(load_file(shard))
    replayed = dict(replay.named_tensors())
    base = {}
    for shard in resolve_model_spec(config.model.spec).glob("*.safetensors"):
        base.update(load_file(shard))
    assert any(not torch.allclose(base[name], tensor, atol=1e-4) for name, tensor in replayed.items()), (
        "nothing trained"
    )
    assert replayed.keys() <= saved.keys()
    for name, tensor in replayed.items():
        torch.testing.assert_close(saved[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_trainer_logprobs_make_on_policy_importance_ratios_exactly_one(tmp_path):
    """engine.trainer_logprobs: the engine reports the trainer's own logprobs, so a synchronous run's
    behaviour and current logprobs are bitwise equal (without it they differ in the last bits)."""
    code, output = finish(
        start_run(
            tmp_path,
            "--sync",
            "--set",
            "trainer.total_steps=5",
            "--set",
            "rollout.max_new_tokens=4",
            "--set",
            "engine.trainer_logprobs=true",
        )
    )
    assert code == 0, output
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert len(records) == 5
    assert all(r["logprob/behav_current_max_abs"] == 0.0 and r["is_weight/max"] == 1.0 for r in records), [
        (r["logprob/behav_current_max_abs"], r["is_weight/max"]) for r in records
    ]


def test_an_interrupted_run_resumes_its_version_count(tmp_path):
    """Interrupted at step >= 12 of a run that cannot finish first (1000 steps), then resumed from its
    latest checkpoint for 10 more steps."""
    interval = ("--set", "trainer.checkpoint_interval=10")
    process = start_run(tmp_path, "--set", "trainer.total_steps=1000", *interval)
    deadline = time.monotonic() + 90
    metrics = tmp_path / "metrics.jsonl"
    while not (metrics.exists() and any(r["step"] >= 12 for r in read_metrics(metrics))):
        assert process.poll() is None and time.monotonic() < deadline, "first run ended or stalled before step 12"
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    code, output = finish(process)
    assert code == 130, output
    interrupted_at = max(r["step"] for r in read_metrics(metrics))
    from async_rl.trainer import checkpoint

    saved = checkpoint.read_meta(checkpoint.latest_checkpoint(tmp_path / "checkpoints"))["version"]
    assert saved % 10 == 0 and 10 <= saved <= interrupted_at <= saved + 10

    code, output = finish(start_run(tmp_path, "--set", f"trainer.total_steps={saved + 10}", *interval))
    assert code == 0, output
    assert f"start version {saved}" in output, output
    records = read_metrics(metrics)
    resumed = records[next(i for i in range(1, len(records)) if records[i]["step"] <= records[i - 1]["step"]) :]
    assert resumed[0]["step"] == saved + 1 and resumed[-1]["step"] == saved + 10
    # The engine restarted at the checkpoint's version: nothing the resumed trainer used breaks the bound.
    assert max(r["staleness/max"] for r in resumed) <= 1
    # Both stretches stay in the run's timeline.
    start = resumed[0]["step"] - 1
    assert {"trainer-v0.json", f"trainer-v{start}.json"} <= {p.name for p in (tmp_path / "trace").glob("*.json")}


def test_distributed_weight_sync_broadcasts_every_version(tmp_path):
    code, output = finish(
        start_run(tmp_path, "--set", "trainer.total_steps=8", "--set", "weight_sync.method=distributed")
    )
    assert code == 0, output
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(r["weight_sync/seconds"] > 0 for r in records)
    assert max(r["staleness/max"] for r in records) <= 1
    # The engine generated with broadcast weights: the last batches carry tokens from versions > 0.
    served_versions = {v for batch in served_batches(tmp_path / "buffer") for t in batch for v in t.token_versions}
    assert max(served_versions) >= 6, served_versions


def test_two_trainer_ranks_train_together_under_torchrun(tmp_path):
    """trainer.processes = 2: FSDP2 over gloo on CPU; rank 0 leads, rank 1 follows every collective."""
    code, output = finish(
        start_run(
            tmp_path,
            "--set",
            "trainer.total_steps=4",
            "--set",
            "trainer.processes=2",
            "--set",
            "trainer.checkpoint_interval=2",
            "--set",
            "weight_sync.method=tensor",
        )
    )
    assert code == 0, output
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["samples"] == 128 and r["weight_sync/seconds"] > 0 for r in records)
    from async_rl.trainer import checkpoint

    latest = checkpoint.latest_checkpoint(tmp_path / "checkpoints")
    assert latest is not None and {p.name for p in (latest / checkpoint.STATE_DIR).glob("rng_rank*.pt")} == {
        "rng_rank0.pt",
        "rng_rank1.pt",
    }
