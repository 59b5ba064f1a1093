"""Weight sync against a real embedded engine process with a request in flight, for every pause mode."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from async_rl.trace import Tracer, read_events
from async_rl.weight_sync import PHASES, SYNC_TRACK, broadcast_group, flattened_buckets, sync_weights
from rollout_workers.client import EngineClient
from rollout_workers.engine.model import create_tiny_model

TIMEOUT_S = 60
# Never reached: the test stops the request once it has tokens of both versions.
MAX_NEW_TOKENS = 2000


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return create_tiny_model(tmp_path_factory.mktemp("model") / "tiny", "llama", seed=0)


@pytest.fixture(scope="module")
def engine_url(model_dir, start_engine):
    return start_engine(str(model_dir), device=None, extra_args=["--seed", "0"]).url


@pytest.fixture(scope="module")
def trainer(model_dir):
    from async_rl.trainer.config import TrainerConfig, TrainerContext
    from async_rl.trainer.trainer import Trainer

    return Trainer(TrainerConfig(), TrainerContext(model_path=str(model_dir)))


async def engine_stats(client: EngineClient) -> dict:
    return (await client.get_server_info())["internal_states"][0]


async def generated_tokens(client: EngineClient) -> int:
    return (await engine_stats(client))["generated_tokens"]


async def wait_generated(client: EngineClient, at_least: int) -> None:
    while await generated_tokens(client) < at_least:
        await asyncio.sleep(0.005)


@pytest.mark.parametrize(
    "mode,method",
    [("abort", "disk"), ("retract", "disk"), ("in_place", "disk"), ("in_place", "tensor"), ("in_place", "distributed")],
)
async def test_sync_with_a_request_in_flight(engine_url, trainer, tmp_path, mode, method, monkeypatch):
    # distributed: buckets of 64 KiB, so the weights go in many broadcasts and requests (the version with the last)
    monkeypatch.setattr("async_rl.weight_sync.BUCKET_BYTES", 64 << 10)
    async with asyncio.timeout(TIMEOUT_S), EngineClient(engine_url) as client, contextlib.AsyncExitStack() as stack:
        group = (
            await stack.enter_async_context(broadcast_group([client], trainer.device))
            if method == "distributed"
            else None
        )
        old = int(await client.get_weight_version())
        trainer.version = new = old + 1  # the trainer is one optimizer step ahead of the engine
        params = {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0, "ignore_eos": True}
        rid = f"in-flight-{mode}-{method}"
        stats = await engine_stats(client)
        before, prefills = stats["generated_tokens"], stats["prefill_forwards"]
        request = asyncio.create_task(client.generate([1, 2, 3], sampling_params=params, rid=rid))
        await wait_generated(client, before + 3)
        with Tracer(tmp_path / "trainer.json", process_name="trainer") as tracer:
            result = await sync_weights(trainer, [client], method, mode, tmp_path / "weights", group, tracer=tracer)
        if mode != "abort":  # let the resumed request decode a few tokens under the new weights, then stop it
            await wait_generated(client, await generated_tokens(client) + 3)
            await client.abort_request(rid)
        response = await request

        assert await client.get_weight_version() == str(new)
        stats = await engine_stats(client)
        assert stats["paused"] is None, "continue_generation did not resume the engine"
        # retract drops the KV cache and prefills the request again; in_place keeps it
        assert stats["prefill_forwards"] - prefills == {"abort": 1, "retract": 2, "in_place": 1}[mode]
        versions = response.token_versions()
        assert response.aborted and len(versions) < MAX_NEW_TOKENS, "the request was still running at the sync"
        if mode == "abort":
            assert versions and set(versions) == {old}, "the pause returns the partial the old weights generated"
        else:  # the request lived through the sync: old tokens first, then the new weights' tokens
            switch = versions.index(new)
            assert 0 < switch < len(versions) and versions == [old] * switch + [new] * (len(versions) - switch)

    assert result.seconds >= result.pause_s + result.update_s + result.continue_s > 0
    assert result.path.endswith(f"v{new}") if method == "disk" else result.path == ""
    assert result.missed == ()
    assert result.metrics().keys() == {
        "weight_sync/engines_missed",
        "weight_sync/seconds",
        "weight_sync/export_s",
        "weight_sync/write_s",
        "weight_sync/pause_s",
        "weight_sync/update_s",
        "weight_sync/continue_s",
    }
    spans = [e for e in read_events(tmp_path / "trainer.json") if e["ph"] == "X"]
    phases = [e["name"] for e in sorted(spans, key=lambda e: e["ts"]) if e["name"] in PHASES]
    assert phases == list(PHASES)
    whole = next(e for e in spans if e["name"] == "weight sync")
    assert whole["args"] == {"version": new, "method": method, "pause_mode": mode, "engines": 1}
    for span in spans:  # every phase lies inside the whole sync
        assert whole["ts"] <= span["ts"] and span["ts"] + span["dur"] <= whole["ts"] + whole["dur"] + 1
    tracks = {e["args"]["name"] for e in read_events(tmp_path / "trainer.json") if e["name"] == "thread_name"}
    assert tracks == {SYNC_TRACK, f"{SYNC_TRACK} engine-0"}


def test_flattened_buckets_keep_order_bound_and_alignment():
    import torch

    tensors = {
        "a": torch.zeros(100),  # 400 bytes
        "b": torch.zeros(100),
        "big": torch.zeros(1000),  # alone: larger than a bucket
        "odd": torch.zeros(3, dtype=torch.bfloat16),  # 6 bytes: a float32 after it would start mid-element
        "c": torch.zeros(1),
        "d": torch.zeros(2, dtype=torch.bfloat16),
    }
    assert flattened_buckets(tensors, 1000) == [["a", "b"], ["big"], ["odd"], ["c", "d"]]
    assert flattened_buckets(tensors, 1 << 20) == [["a", "b", "big", "odd"], ["c", "d"]]


@pytest.mark.parametrize("method", ["disk", "tensor"])
async def test_an_engine_that_cannot_be_reached_misses_the_version_and_the_sync_goes_on(
    engine_url, trainer, tmp_path, method, free_port
):
    """A dead (or restarting) engine must not fail the sync of the others: it is reported as missed."""
    async with EngineClient(engine_url) as live, EngineClient(f"http://127.0.0.1:{free_port()}") as dead:
        async with asyncio.timeout(TIMEOUT_S):
            result = await sync_weights(trainer, [dead, live], method, "retract", tmp_path / "weights")
            assert result.missed == (0,) and result.metrics()["weight_sync/engines_missed"] == 1
            assert await live.get_weight_version() == str(trainer.version)
