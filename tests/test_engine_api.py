"""The SGLang RL API end to end: a real embedded-engine process, real HTTP, through `EngineClient`.

A request that is still running when a test pauses is made with a large
max_new_tokens and ignore_eos, streamed, and the test waits until it has
produced k tokens; nothing here sleeps to synchronise.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import torch
from safetensors.torch import load_file

from async_rl.dist_group import broadcast, destroy, init_weight_update_group
from rollout_workers.client import EngineClient, EngineError, GenerateResult, SamplingParams
from rollout_workers.engine.model import create_tiny_model
from rollout_workers.launcher import EngineProcess, EngineSpec, free_port

pytestmark = pytest.mark.slow

PROMPT = [5, 6, 7, 8]
# Long enough that nothing finishes on its own while a test pauses, aborts or updates.
LONG = SamplingParams(max_new_tokens=1500, ignore_eos=True, temperature=0.0)
SHORT = SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=0.0)
WAIT_S = 30.0


@pytest.fixture(scope="module")
def engine():
    with EngineProcess(EngineSpec(model="tiny:llama", device="cpu", extra_args=["--weight-version", "0"])) as process:
        yield process


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory) -> dict[str, object]:
    """Same architecture as tiny:llama, different random weights: as a folder and as tensors."""
    folder = create_tiny_model(tmp_path_factory.mktemp("weights") / "tiny-llama-seed1", "llama", seed=1)
    return {"folder": folder, "tensors": load_file(folder / "model.safetensors")}


@pytest.fixture
async def client(engine):
    async with EngineClient(engine.url, timeout_s=WAIT_S) as engine_client:
        yield engine_client
        # Leave the shared engine serving, whatever the test did to it.
        await engine_client.continue_generation()
        await engine_client.abort_request(abort_all=True)


class StreamWatcher:
    """Streams one generate in the background so a test can wait for its k-th token."""

    def __init__(self, group: asyncio.TaskGroup, client: EngineClient, rid: str, params: SamplingParams = LONG):
        self.latest: GenerateResult | None = None
        self.ended = False
        self.changed = asyncio.Condition()
        self.task = group.create_task(self._consume(client, rid, params))

    @property
    def tokens(self) -> int:
        return 0 if self.latest is None else len(self.latest.output_ids)

    async def _consume(self, client: EngineClient, rid: str, params: SamplingParams) -> GenerateResult:
        try:
            async for result in client.generate_stream(PROMPT, sampling_params=params, rid=rid):
                async with self.changed:
                    self.latest = result
                    self.changed.notify_all()
        finally:
            self.ended = True
            async with self.changed:
                self.changed.notify_all()
        assert self.latest is not None
        return self.latest

    async def wait_tokens(self, count: int) -> None:
        async with asyncio.timeout(WAIT_S), self.changed:
            await self.changed.wait_for(lambda: self.ended or self.tokens >= count)
        assert self.tokens >= count, f"stream ended after {self.tokens} tokens, expected {count}"


def assert_parallel(result: GenerateResult) -> None:
    assert len(result.output_ids) == len(result.output_logprobs) == len(result.output_token_weight_versions)
    assert all(lp <= 0.0 for lp in result.output_logprobs)


async def current_version(client: EngineClient) -> int:
    return int(await client.get_weight_version())


# ----------------------------------------------------------------- basics
async def test_info_and_health(client):
    await client.health()
    await client.health_generate()
    info = await client.get_model_info()
    assert info.model_path.endswith("tiny-llama") and info.is_generation
    server = await client.get_server_info()
    assert str(server["weight_version"]) == await client.get_weight_version()


async def test_generate_single_with_logprobs_and_versions(client):
    version = await current_version(client)
    result = await client.generate(PROMPT, sampling_params=SHORT, rid="single")
    assert result.rid == "single"
    assert len(result.output_ids) == 6 and result.completion_tokens == 6 and result.prompt_tokens == len(PROMPT)
    assert result.finish_reason.type == "length" and result.finish_reason.length == 6
    assert_parallel(result)
    assert result.token_versions() == [version] * 6


async def test_generate_batched_ids_text_and_n(client):
    prompts = [[5, 6], [7, 8, 9], [10]]
    results = await client.generate_batch(prompts, sampling_params=SHORT, rid=["b0", "b1", "b2"])
    assert [r.rid for r in results] == ["b0", "b1", "b2"]
    assert [r.prompt_tokens for r in results] == [2, 3, 1]
    for result in results:
        assert len(result.output_ids) == 6
        assert_parallel(result)
    # Batching changes nothing: greedy alone equals greedy in a batch.
    alone = await client.generate(prompts[1], sampling_params=SHORT)
    assert alone.output_ids == results[1].output_ids

    by_text = await client.generate_batch(text=["12+3=", "ab"], sampling_params=SHORT, return_logprob=False)
    assert len(by_text) == 2 and all(r.text and not r.output_logprobs for r in by_text)
    samples = await client.generate_batch(
        [PROMPT], sampling_params=SamplingParams(max_new_tokens=4, n=3, ignore_eos=True)
    )
    assert len(samples) == 3 and all(len(s.output_ids) == 4 for s in samples)


async def test_streaming_matches_non_streaming(client):
    chunks = [chunk async for chunk in client.generate_stream(PROMPT, sampling_params=SHORT)]
    lengths = [len(chunk.output_ids) for chunk in chunks]
    assert lengths == sorted(lengths) and lengths[-1] == 6
    assert all(chunk.finish_reason is None for chunk in chunks[:-1])
    final = chunks[-1]
    assert final.finish_type == "length"
    assert_parallel(final)
    whole = await client.generate(PROMPT, sampling_params=SHORT)
    assert final.output_ids == whole.output_ids
    assert final.output_logprobs == pytest.approx(whole.output_logprobs, abs=1e-4)


# ------------------------------------------------------------------ aborts
async def test_abort_request_returns_partial_tokens_and_logprobs(client):
    async with asyncio.TaskGroup() as group:
        watcher = StreamWatcher(group, client, rid="to-abort")
        await watcher.wait_tokens(3)
        await client.abort_request("to-abort")
    result = watcher.task.result()
    assert result.aborted and result.finish_reason.message
    assert 3 <= len(result.output_ids) < LONG.max_new_tokens
    assert_parallel(result)
    # An unknown (or already finished) rid is not an error, as in SGLang.
    await client.abort_request("no-such-request")


async def test_pause_abort_ends_running_and_waiting_requests(client):
    async with asyncio.TaskGroup() as group:
        plain = group.create_task(client.generate(PROMPT, sampling_params=LONG, rid="plain"))
        watcher = StreamWatcher(group, client, rid="streamed")
        await watcher.wait_tokens(3)
        await client.pause_generation("abort")
    for result in (plain.result(), watcher.task.result()):
        assert result.aborted
        assert_parallel(result)
    assert len(watcher.task.result().output_ids) >= 3
    await client.continue_generation()
    assert len((await client.generate(PROMPT, sampling_params=SHORT)).output_ids) == 6


async def test_abort_all(client):
    async with asyncio.TaskGroup() as group:
        first = StreamWatcher(group, client, rid="all-1")
        second = StreamWatcher(group, client, rid="all-2")
        await first.wait_tokens(2)
        await second.wait_tokens(2)
        await client.abort_request(abort_all=True)
    assert first.task.result().aborted and second.task.result().aborted


# ------------------------------------------------- pause, update, continue
async def update_weights(client: EngineClient, via: str, other_weights, version: int) -> None:
    if via == "tensor":
        await client.update_weights_from_tensor(other_weights["tensors"], weight_version=version)
    else:
        await client.update_weights_from_disk(str(other_weights["folder"]), weight_version=version)


@pytest.mark.parametrize(
    "mode, via", [("retract", "tensor"), ("retract", "disk"), ("in_place", "tensor")]
)
async def test_paused_request_resumes_under_new_weights(client, other_weights, mode, via):
    old = await current_version(client)
    new = old + 1
    async with asyncio.TaskGroup() as group:
        watcher = StreamWatcher(group, client, rid=f"{mode}-{via}")
        await watcher.wait_tokens(3)
        await client.pause_generation(mode)
        seen_before = list(watcher.latest.output_ids)
        if mode == "in_place":
            with pytest.raises(EngineError) as refused:
                await client.flush_cache()  # the paused request still holds its KV cache
            assert refused.value.status == 400 and refused.value.message
        await update_weights(client, via, other_weights, new)
        assert await current_version(client) == new
        await client.continue_generation()
        await watcher.wait_tokens(len(seen_before) + 3)
        await client.abort_request(f"{mode}-{via}")
    result = watcher.task.result()
    assert result.output_ids[: len(seen_before)] == seen_before  # nothing generated was lost
    versions = result.token_versions()
    assert set(versions) == {old, new} and versions == sorted(versions)
    assert versions.count(old) >= len(seen_before)
    assert_parallel(result)
    await client.flush_cache()  # nothing runs any more


async def test_flush_cache_fails_while_a_request_runs(client):
    async with asyncio.TaskGroup() as group:
        watcher = StreamWatcher(group, client, rid="busy")
        await watcher.wait_tokens(2)
        with pytest.raises(EngineError, match="flush_cache"):
            await client.flush_cache()
        await client.abort_request("busy")
    await client.flush_cache()


async def test_update_weights_from_distributed_over_gloo(client, other_weights):
    tensors = other_weights["tensors"]
    names = list(tensors)
    new = await current_version(client) + 1
    port = free_port()
    async with asyncio.TaskGroup() as group:
        joined = group.create_task(
            client.init_weights_update_group(
                "127.0.0.1", port, rank_offset=1, world_size=2, backend="gloo", group_name="test_sync"
            )
        )
        # This process is the trainer: rank 0, hosting the rendezvous store.
        trainer_group = await asyncio.to_thread(
            init_weight_update_group, "127.0.0.1", port, 0, 2, "gloo", "test_sync", WAIT_S
        )
    assert joined.result()
    try:
        # Different weights again (scaled), so the check below proves these tensors arrived.
        sent = {name: tensor * 0.5 for name, tensor in tensors.items()}

        def send_all() -> None:
            for name in names:
                broadcast(trainer_group, sent[name].contiguous(), src=0)

        async with asyncio.TaskGroup() as group:
            updated = group.create_task(
                client.update_weights_from_distributed(
                    names, [sent[n].dtype for n in names], [sent[n].shape for n in names],
                    group_name="test_sync", weight_version=new,
                )
            )
            await asyncio.to_thread(send_all)
        assert updated.result()
        after_broadcast = await client.generate(PROMPT, sampling_params=SHORT)
        assert after_broadcast.token_versions() == [new] * 6
        # The same weights sent another way must generate the same tokens.
        await client.update_weights_from_tensor(sent, weight_version=new + 1)
        reference = await client.generate(PROMPT, sampling_params=SHORT)
        assert reference.output_ids == after_broadcast.output_ids
        assert reference.output_logprobs == pytest.approx(after_broadcast.output_logprobs, abs=1e-4)
    finally:
        await client.destroy_weights_update_group("test_sync")
        destroy(trainer_group)
    with pytest.raises(EngineError, match="test_sync"):
        await client.update_weights_from_distributed(names[:1], [torch.float32], [[1]], group_name="test_sync")


# ----------------------------------------------------------------- memory
async def test_release_and_resume_memory(client):
    await client.release_memory_occupation(["kv_cache"])
    with pytest.raises(EngineError) as refused:
        await client.generate(PROMPT, sampling_params=SHORT)
    assert refused.value.status == 503
    await client.resume_memory_occupation(["kv_cache"])
    await client.release_memory_occupation()  # all tags
    await client.resume_memory_occupation()
    await client.health_generate()
    assert len((await client.generate(PROMPT, sampling_params=SHORT)).output_ids) == 6


# ------------------------------------------------------------ bad requests
BAD_CALLS = {
    "ids of wrong type": lambda c: c.generate(["a", "b"]),
    "empty input": lambda c: c.generate([]),
    "empty batch element": lambda c: c.generate_batch([[1], []]),
    "huge max_new_tokens": lambda c: c.generate(PROMPT, sampling_params={"max_new_tokens": 10**9}),
    "out-of-vocab id": lambda c: c.generate([10**6]),
    "negative id": lambda c: c.generate([-1]),
    "bad sampling type": lambda c: c.generate(PROMPT, sampling_params={"temperature": "hot"}),
    "bad pause mode": lambda c: c.pause_generation("sideways"),
    "mismatched shape": lambda c: c.update_weights_from_tensor({"model.embed_tokens.weight": torch.zeros(3, 3)}),
    "unknown tensor": lambda c: c.update_weights_from_tensor({"no.such.weight": torch.zeros(1)}),
    "missing folder": lambda c: c.update_weights_from_disk("/no/such/folder"),
    "no group": lambda c: c.update_weights_from_distributed(["x"], ["float32"], [[1]], group_name="none"),
    "destroy unknown group": lambda c: c.destroy_weights_update_group("none"),
}


@pytest.mark.parametrize("call", BAD_CALLS.values(), ids=BAD_CALLS.keys())
async def test_bad_request_is_refused_and_the_engine_keeps_serving(client, call):
    version = await client.get_weight_version()
    with pytest.raises(EngineError) as refused:
        await call(client)
    assert 400 <= refused.value.status < 500 and len(refused.value.message) > 5
    assert await client.get_weight_version() == version  # a refused update changed nothing
    assert len((await client.generate(PROMPT, sampling_params=SHORT)).output_ids) == 6


@pytest.mark.parametrize(
    "endpoint, body",
    [
        ("/generate", b'{"input_ids": [1, 2'),
        ("/generate", b"[1, 2]"),
        ("/update_weights_from_tensor", b'{"serialized_named_tensors": ["not base64!"], "load_format": "safetensors"}'),
        ("/update_weights_from_tensor", b'{"serialized_named_tensors": ["aGVsbG8="], "load_format": "pickle"}'),
    ],
)
async def test_malformed_bodies_get_a_clear_4xx(engine, client, endpoint, body):
    # Malformed JSON cannot be produced through the typed client, so this one goes raw.
    async with aiohttp.ClientSession() as session:
        async with session.post(engine.url + endpoint, data=body) as response:
            assert 400 <= response.status < 500
            assert (await response.text()).strip()
    await client.health_generate()


# -------------------------------------------------- API key, Qwen2 family
async def test_api_key_is_enforced_on_a_qwen2_engine():
    spec = EngineSpec(model="tiny:qwen2", device="cpu", api_key="s3cret")
    async with (
        EngineProcess(spec) as qwen_engine,
        EngineClient(qwen_engine.url) as anonymous,
        EngineClient(qwen_engine.url, api_key="wrong") as wrong_key,
        EngineClient(qwen_engine.url, api_key="s3cret") as authorised,
    ):
        for outsider in (anonymous, wrong_key):
            with pytest.raises(EngineError) as refused:
                await outsider.generate(PROMPT, sampling_params=SHORT)
            assert refused.value.status == 401
            with pytest.raises(EngineError):
                await outsider.get_model_info()
        assert "qwen2" in (await authorised.get_model_info()).model_path
        result = await authorised.generate(PROMPT, sampling_params=SHORT)
        assert len(result.output_ids) == 6
        assert_parallel(result)
