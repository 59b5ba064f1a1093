"""The engine contract: every call the project makes, against a real engine process over real HTTP.

The same tests drive the embedded engine (CI) and, unchanged, a real SGLang server:

    pytest tests/test_engine_api.py                                    # embedded engine, CPU
    pytest tests/test_engine_api.py --engine-device cuda               # embedded engine, GPU
    pytest tests/test_engine_api.py --engine sglang --engine-args "--attention-backend triton ..."

Where SGLang lacks a feature the project offers on its own engine, the test is marked
`embedded_only` with the reason, and skips under --engine sglang. Where SGLang would exit on a call,
the embedded engine refuses it with a 4xx and keeps serving; that test is embedded-only too (it
would end the SGLang server), and no test sends the call to SGLang. A test that leaves the engine
dead fails with its log tail, and the next test gets a fresh engine.

A request that is still running when a test pauses is made with a large max_new_tokens and
ignore_eos, streamed, and the test waits until it has produced k tokens; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import shlex
import time
from pathlib import Path

import aiohttp
import pytest
import torch
from safetensors.torch import load_file

from async_rl.dist_group import broadcast, broadcast_flattened, destroy, init_weight_update_group
from async_rl.messages import Trajectory
from async_rl.trace import Tracer
from rollout_workers.april import AprilController, AprilPlan
from rollout_workers.client import EngineClient, EngineError, GenerateResult, InvalidRequest, SamplingParams
from rollout_workers.engine.model import create_tiny_model, resolve_model_spec, vocab_size_of
from rollout_workers.group import GroupRollout, drive
from rollout_workers.launcher import EngineProcess, EngineSpec, free_port
from rollout_workers.rollout_metrics import RolloutMetrics
from rollout_workers.tasks import TaskSample
from rollout_workers.worker import EnginePool
from staleness import StalenessBoundError
from staleness.metrics import check_staleness_bound

pytestmark = pytest.mark.slow

PROMPT = [5, 6, 7, 8]
# Long enough that nothing finishes on its own while a test pauses, aborts or updates.
LONG = SamplingParams(max_new_tokens=1500, ignore_eos=True, temperature=0.0)
SHORT = SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=0.0)
WAIT_S = 60.0
START_S = 600.0  # SGLang compiles kernels on its first start


class EngineUnderTest:
    """The engine every test talks to; started again if a test ended it."""

    def __init__(self, config: pytest.Config, log_dir, **spec_changes):
        self.kind = config.getoption("--engine")
        model = resolve_model_spec(spec_changes.pop("model", config.getoption("--engine-model")))
        extra = ["--weight-version", "0", *shlex.split(config.getoption("--engine-args"))]
        self.spec = EngineSpec(
            kind=self.kind,
            model=str(model),
            device=config.getoption("--engine-device") if self.kind == "embedded" else None,
            extra_args=extra,
            **spec_changes,
        )
        self.log_dir = log_dir
        self.process: EngineProcess | None = None
        self.starts = 0

    @property
    def exact_versions(self) -> bool:
        """The embedded engine tags every token; SGLang reports one version per response."""
        return self.kind == "embedded"

    def ensure_running(self) -> EngineProcess:
        if self.process is None or self.process.poll() is not None:
            self.starts += 1
            self.process = EngineProcess(self.spec, log_path=self.log_dir / f"engine-{self.starts}.log")
            self.process.start()
            self.process.wait_healthy(START_S)
        return self.process

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


@pytest.fixture(scope="module")
def engine(request, tmp_path_factory):
    under_test = EngineUnderTest(request.config, tmp_path_factory.mktemp("engine-logs"))
    yield under_test
    under_test.stop()


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory) -> dict[str, object]:
    """Same architecture as tiny:llama, different random weights: as a folder and as tensors."""
    folder = create_tiny_model(tmp_path_factory.mktemp("weights") / "tiny-llama-seed1", "llama", seed=1)
    return {"folder": folder, "tensors": load_file(folder / "model.safetensors")}


@pytest.fixture
async def client(engine):
    process = engine.ensure_running()
    async with EngineClient(process.url, timeout_s=WAIT_S) as engine_client:
        yield engine_client
        if process.poll() is not None:
            pytest.fail(f"the engine exited during this test (code {process.poll()}):\n{process.log_tail()}")
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


async def update_weights(client: EngineClient, via: str, other_weights, version: int) -> None:
    """The update the weight sync sends while requests are paused: flush_cache false (SGLang exits otherwise)."""
    if via == "tensor":
        await client.update_weights_from_tensor(other_weights["tensors"], weight_version=version, flush_cache=False)
    else:
        await client.update_weights_from_disk(str(other_weights["folder"]), weight_version=version, flush_cache=False)


# ----------------------------------------------------------------- basics
async def test_info_and_health(client):
    await client.health()
    await client.health_generate()
    info = await client.get_model_info()
    assert info.model_path.endswith("tiny-llama") and info.is_generation
    server = await client.get_server_info()
    assert str(server["weight_version"]) == await client.get_weight_version() == str(info.weight_version)


async def test_the_old_weight_version_endpoint_is_gone(engine, client):
    """SGLang 0.5.17 answers 404 there; the client reads /model_info instead."""
    async with aiohttp.ClientSession() as session:
        async with session.get(engine.process.url + "/get_weight_version") as response:
            assert response.status == 404 and "/model_info" in await response.text()


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
    by_text = await client.generate_batch(text=["12+3=", "ab"], sampling_params=SHORT, return_logprob=False)
    assert len(by_text) == 2 and all(r.text and not r.output_logprobs for r in by_text)
    samples = await client.generate_batch(
        [PROMPT], sampling_params=SamplingParams(max_new_tokens=4, n=3, ignore_eos=True)
    )
    assert len(samples) == 3 and all(len(s.output_ids) == 4 for s in samples)


@pytest.mark.embedded_only(
    "greedy outputs depend on the batch (kernels differ by batch size) unless the server "
    "runs with --enable-deterministic-inference"
)
async def test_batching_changes_no_greedy_output(client):
    prompts = [[5, 6], [7, 8, 9], [10]]
    together = await client.generate_batch(prompts, sampling_params=SHORT)
    assert (await client.generate(prompts[1], sampling_params=SHORT)).output_ids == together[1].output_ids


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


async def test_abort_request_needs_a_live_rid_and_then_matches_prefixes(client):
    """SGLang's abort needs a live rid, then aborts every request whose rid starts with it
    (so the worker's rids are prefix-free: each ends in "/")."""
    async with asyncio.TaskGroup() as group:
        short, longer = StreamWatcher(group, client, rid="pre/1"), StreamWatcher(group, client, rid="pre/12")
        other = StreamWatcher(group, client, rid="other")
        for watcher in (short, longer, other):
            await watcher.wait_tokens(2)
        await client.abort_request("pre/")  # no request has this rid: nothing happens
        await client.abort_request("pre/1")
        await short.task
        await longer.task
        assert not other.ended
        await client.abort_request("other")
    assert short.task.result().aborted and longer.task.result().aborted and other.task.result().aborted
    assert len(longer.task.result().output_ids) < LONG.max_new_tokens


@pytest.mark.parametrize("how", ["pause_generation", "client.pause"])
async def test_pause_abort_ends_running_and_waiting_requests(engine, client, how):
    """SGLang's own abort-mode pause polls its in-flight requests with a one-second sleep;
    `EngineClient.pause("abort")` (retract + abort_all, what the weight sync sends) ends them at once."""
    async with asyncio.TaskGroup() as group:
        plain = group.create_task(client.generate(PROMPT, sampling_params=LONG, rid="plain"))
        watcher = StreamWatcher(group, client, rid="streamed")
        await watcher.wait_tokens(3)
        started = time.perf_counter()
        await (client.pause_generation("abort") if how == "pause_generation" else client.pause("abort"))
        paused_s = time.perf_counter() - started
    for result in (plain.result(), watcher.task.result()):
        assert result.aborted
        assert_parallel(result)
    assert len(watcher.task.result().output_ids) >= 3
    if how == "client.pause" and engine.kind == "sglang":
        assert paused_s < 0.9, f"pause took {paused_s:.2f} s"
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


PACE_TOKENS = 75  # between two of SGLang's default 50-token hand-overs of a non-streamed request


@pytest.mark.parametrize("how", ["retract, then abort the rid", "in_place, then abort the rid", "client.pause abort"])
async def test_a_batched_request_stopped_while_paused_returns_every_token_it_made(client, how):
    """What the worker sends (non-streamed, batched) loses nothing when stopped during a pause.
    A streamed request started just after it paces the test: when that one has k tokens, the
    batched one has at least k - 1 (they share every decode step)."""
    rid = f"batched-{how.split(',')[0].replace(' ', '-')}/"
    async with asyncio.TaskGroup() as group:
        batched = group.create_task(client.generate_batch([PROMPT], sampling_params=LONG, rid=[rid]))
        pace = StreamWatcher(group, client, rid=f"pace-{rid}")
        await pace.wait_tokens(PACE_TOKENS)
        seen = pace.tokens
        if how == "client.pause abort":  # ends both requests
            await client.pause("abort")
        else:
            await client.pause("retract" if how.startswith("retract") else "in_place")
            await client.abort_request(rid)
            await client.abort_request(f"pace-{rid}")
            await client.continue_generation()
    (result,) = batched.result()
    assert result.aborted and seen - 1 <= len(result.output_ids) < LONG.max_new_tokens
    assert_parallel(result)
    await client.continue_generation()


async def test_a_retracted_group_resumes_from_its_partial_and_counts_it_recycled(client, tmp_path):
    """APRIL's retraction (abort of the tail's rids, no pause) on this engine, then the resume as
    the next round does it: every token made before the retraction is kept and counted recycled."""
    pool = EnginePool([client.url])
    metrics = RolloutMetrics(tmp_path, 0, 1, 1, Tracer(None))
    params = {"max_new_tokens": 400, "ignore_eos": True, "temperature": 1.0}
    group = GroupRollout(
        group_id="w0-april-g0",
        task=TaskSample(prompt="", metadata={}),
        prompt_ids=PROMPT,
        params=[dict(params), dict(params)],
        samples=[None, None],
    )
    controller = AprilController(AprilPlan(share=1, alpha=0.0, eta=1), pool, Tracer(None), host=None, group_size=2)
    try:
        async with asyncio.TaskGroup() as tasks:
            running = tasks.create_task(drive(group, pool, metrics))
            pace = StreamWatcher(tasks, client, rid="pace-april")
            await pace.wait_tokens(PACE_TOKENS)
            seen = pace.tokens
            await controller.retract([group])
            await running
            await client.abort_request("pace-april")
        partial = [list(sample.response_ids) for sample in group.samples]
        assert all(seen - 1 <= len(ids) < 400 for ids in partial), (seen, list(map(len, partial)))
        resumed = GroupRollout.from_partials(group.partial_trajectories(), round_=1)
        await asyncio.wait_for(drive(resumed, pool, metrics), WAIT_S)
        assert resumed.complete
        for sample, old in zip(resumed.samples, partial):
            assert len(sample.response_ids) == 400 and sample.response_ids[: len(old)] == old
        assert metrics.counts["tokens_recycled"] == sum(map(len, partial))
    finally:
        await pool.close()


async def test_a_group_whose_request_the_engine_refuses_is_dropped_not_retried(client, tmp_path):
    """A request no engine will take (prompt + max_new_tokens beyond the context: HTTP 400 on both engine
    kinds) drops its group at once; retrying it ran a GPU run into its wall limit."""
    pool = EnginePool([client.url])
    metrics = RolloutMetrics(tmp_path, 0, 1, 1, Tracer(None))
    group = GroupRollout(
        group_id="w0-refused-g0",
        task=TaskSample(prompt="", metadata={}),
        prompt_ids=PROMPT,
        params=[{"max_new_tokens": 100_000, "ignore_eos": True}],
        samples=[None],
    )
    try:
        await asyncio.wait_for(drive(group, pool, metrics), WAIT_S)
    finally:
        await pool.close()
    assert group.dropped and not group.complete
    assert metrics.counts["groups_refused"] == 1


# ------------------------------------------------- pause, update, continue
TENSOR_UPDATES = (
    "SGLang decodes tensor updates only as its pickled MultiprocessingSerializer payload (the project sends "
    "that only as CUDA IPC handles), never as safetensors"
)


@pytest.mark.parametrize(
    "mode, via",
    [
        ("retract", "disk"),
        ("in_place", "disk"),
        pytest.param("retract", "tensor", marks=pytest.mark.embedded_only(TENSOR_UPDATES)),
        pytest.param("in_place", "tensor", marks=pytest.mark.embedded_only(TENSOR_UPDATES)),
    ],
)
async def test_paused_request_resumes_under_new_weights(engine, client, other_weights, mode, via):
    old = await current_version(client)
    new = old + 1
    async with asyncio.TaskGroup() as group:
        watcher = StreamWatcher(group, client, rid=f"{mode}-{via}")
        await watcher.wait_tokens(3)
        await client.pause(mode)
        seen_before = list(watcher.latest.output_ids)
        with pytest.raises(EngineError) as refused:
            await client.flush_cache()  # the paused request is still in the engine
        assert refused.value.status == 400 and refused.value.message
        await update_weights(client, via, other_weights, new)
        assert await current_version(client) == new
        await client.continue_generation()
        await watcher.wait_tokens(len(seen_before) + 3)
        await client.abort_request(f"{mode}-{via}")
    result = watcher.task.result()
    assert result.output_ids[: len(seen_before)] == seen_before  # nothing generated was lost
    versions = result.token_versions()
    # Never newer than the truth: what was generated before the pause is `old`; nothing is older than `old`.
    assert versions[: len(seen_before)] == [old] * len(seen_before)
    assert versions == sorted(versions) and set(versions) <= {old, new}
    if engine.exact_versions:
        assert set(versions) == {old, new}
    assert_parallel(result)
    await client.flush_cache()  # nothing runs any more


async def test_versions_across_two_updates_are_exact_or_older_and_the_bound_sees_them(engine, client, other_weights):
    """One request lives across two weight updates: every token's version is at most the version that
    really made it (the tokens received before each pause are from the weights before it), at least the
    version at submission, and the trainer's staleness check, which reads the oldest, refuses it at eta 1."""
    old = await current_version(client)
    boundaries = []
    async with asyncio.TaskGroup() as group:
        watcher = StreamWatcher(group, client, rid="two-updates")
        for step in (1, 2):
            await watcher.wait_tokens((boundaries[-1] if boundaries else 0) + 3)
            await client.pause("retract")
            boundaries.append(watcher.tokens)  # made by version old + step - 1 at the latest
            await update_weights(client, "disk", other_weights, old + step)
            await client.continue_generation()
        await watcher.wait_tokens(boundaries[-1] + 3)
        await client.abort_request("two-updates")
    result = watcher.task.result()
    versions = result.token_versions()
    newest_possible = [old + sum(i >= b for b in boundaries) for i in range(len(versions))]
    assert all(old <= v <= truth for v, truth in zip(versions, newest_possible)), (versions, boundaries)
    if engine.exact_versions:
        assert set(versions) == {old, old + 1, old + 2}
    trajectory = Trajectory(
        sample_id="s",
        group_id="g",
        group_size=1,
        prompt_ids=PROMPT,
        response_ids=result.output_ids,
        behavior_logprobs=result.output_logprobs,
        token_versions=versions,
    )
    check_staleness_bound([trajectory], old + 2, 2)
    with pytest.raises(StalenessBoundError):
        check_staleness_bound([trajectory], old + 2, 1)


@pytest.mark.embedded_only("SGLang exits on this call ('Cache flush failed after updating weights')")
@pytest.mark.parametrize("mode", ["retract", "in_place"])
async def test_an_update_that_flushes_while_requests_are_paused_is_refused(client, other_weights, mode):
    old = await current_version(client)
    async with asyncio.TaskGroup() as group:
        watcher = StreamWatcher(group, client, rid=f"flush-{mode}")
        await watcher.wait_tokens(2)
        await client.pause(mode)
        with pytest.raises(EngineError) as refused:
            await client.update_weights_from_disk(str(other_weights["folder"]), weight_version=old + 1)
        assert refused.value.status == 400 and "flush_cache" in refused.value.message
        assert await current_version(client) == old  # nothing changed
        await client.continue_generation()
        await watcher.wait_tokens(watcher.tokens + 2)  # and the request goes on
        await client.abort_request(f"flush-{mode}")


async def test_flush_cache_fails_while_a_request_runs(client):
    async with asyncio.TaskGroup() as group:
        watcher = StreamWatcher(group, client, rid="busy")
        await watcher.wait_tokens(2)
        with pytest.raises(EngineError, match="flush_cache"):
            await client.flush_cache()
        await client.abort_request("busy")
    await client.flush_cache()


@pytest.mark.parametrize("load_format", [None, "flattened_bucket"])  # one broadcast per tensor, or one in all
async def test_update_weights_from_distributed_over_gloo(client, other_weights, load_format):
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

        def send_all(scale: float) -> None:
            scaled = [(tensors[name] * scale).contiguous() for name in names]
            if load_format:
                broadcast_flattened(trainer_group, scaled)
            else:
                for tensor in scaled:
                    broadcast(trainer_group, tensor, src=0)

        async def broadcast_update(scale: float, version: int) -> GenerateResult:
            async with asyncio.TaskGroup() as group:
                updated = group.create_task(
                    client.update_weights_from_distributed(
                        names,
                        [tensors[n].dtype for n in names],
                        [tensors[n].shape for n in names],
                        group_name="test_sync",
                        weight_version=version,
                        load_format=load_format,
                    )
                )
                await asyncio.to_thread(send_all, scale)
            assert updated.result()
            return await client.generate(PROMPT, sampling_params=SHORT)

        # Other weights than the engine's (scaled), so the first check proves these tensors arrived.
        after_broadcast = await broadcast_update(0.5, new)
        assert after_broadcast.token_versions() == [new] * 6
        # The same weights by another path (disk for both engines) give the same tokens.
        await client.update_weights_from_disk(str(other_weights["folder"]), weight_version=new + 1)
        reference_folder = await client.generate(PROMPT, sampling_params=SHORT)
        again = await broadcast_update(1.0, new + 2)
        assert again.output_ids == reference_folder.output_ids
        assert again.output_logprobs == pytest.approx(reference_folder.output_logprobs, abs=1e-4)
    finally:
        await client.destroy_weights_update_group("test_sync")
        destroy(trainer_group)


@pytest.mark.gpu
async def test_cuda_ipc_update_serves_the_same_weights_as_disk(engine, client, other_weights):
    """SGLang copies from the sender's GPU memory; the embedded engine never unpickles, so it refuses."""
    on_gpu = {name: tensor.to("cuda") for name, tensor in other_weights["tensors"].items()}
    version = await current_version(client)
    if engine.kind == "embedded":
        with pytest.raises(EngineError) as refused:
            await client.update_weights_from_tensor(on_gpu, payload="cuda_ipc", weight_version=version + 1)
        assert refused.value.status == 400 and "never unpickles" in refused.value.message
        assert await current_version(client) == version
        return
    scaled_weights = {n: t * 0.5 for n, t in on_gpu.items()}
    await client.update_weights_from_tensor(scaled_weights, payload="cuda_ipc", weight_version=version + 1)
    scaled = await client.generate(PROMPT, sampling_params=SHORT)
    assert scaled.token_versions() == [version + 1] * 6
    await client.update_weights_from_disk(str(other_weights["folder"]), weight_version=version + 2)
    by_disk = await client.generate(PROMPT, sampling_params=SHORT)
    await client.update_weights_from_tensor(on_gpu, payload="cuda_ipc", weight_version=version + 3)
    by_ipc = await client.generate(PROMPT, sampling_params=SHORT)
    assert by_ipc.output_ids == by_disk.output_ids
    assert by_ipc.output_logprobs == pytest.approx(by_disk.output_logprobs, abs=1e-4)
    assert await current_version(client) == version + 3


@pytest.mark.embedded_only(TENSOR_UPDATES)
@pytest.mark.parametrize("request_bytes", [None, 4096])  # 4096: the weights go in many requests
async def test_tensor_and_disk_updates_of_the_same_weights_agree(client, other_weights, monkeypatch, request_bytes):
    if request_bytes:
        monkeypatch.setattr("rollout_workers.client.TENSOR_REQUEST_BYTES", request_bytes)
    version = await current_version(client)
    await client.update_weights_from_tensor(other_weights["tensors"], weight_version=version + 1)
    assert await current_version(client) == version + 1
    by_tensor = await client.generate(PROMPT, sampling_params=SHORT)
    await client.update_weights_from_disk(str(other_weights["folder"]), weight_version=version + 2)
    by_disk = await client.generate(PROMPT, sampling_params=SHORT)
    assert by_tensor.output_ids == by_disk.output_ids


# ----------------------------------------------------------------- memory
async def test_release_and_resume_memory(engine, client):
    await client.release_memory_occupation(["kv_cache"])
    if engine.kind == "embedded":  # SGLang without --enable-memory-saver frees nothing and keeps generating
        with pytest.raises(EngineError) as refused:
            await client.generate(PROMPT, sampling_params=SHORT)
        assert refused.value.status == 503
    await client.resume_memory_occupation(["kv_cache"])
    await client.release_memory_occupation()  # all tags
    await client.resume_memory_occupation()
    await client.health_generate()
    assert len((await client.generate(PROMPT, sampling_params=SHORT)).output_ids) == 6


@pytest.mark.embedded_only(
    "SGLang asserts an idle scheduler on release and fails on a tag it never released; "
    "the embedded engine refuses both so that CI catches such a call"
)
async def test_memory_calls_sglang_would_fail_on_are_refused(client):
    with pytest.raises(EngineError) as refused:
        await client.resume_memory_occupation(["weights"])  # never released
    assert refused.value.status == 400 and "not released" in refused.value.message
    async with asyncio.TaskGroup() as group:
        watcher = StreamWatcher(group, client, rid="holds-memory")
        await watcher.wait_tokens(2)
        with pytest.raises(EngineError) as refused:
            await client.release_memory_occupation(["weights"])
        assert refused.value.status == 400
        await client.abort_request("holds-memory")
    await client.health_generate()


# ------------------------------------------------------------ bad requests
BAD_CALLS = {
    "empty input": lambda c: c.generate([]),
    "empty batch element": pytest.param(
        lambda c: c.generate_batch([[1], []]),
        marks=pytest.mark.embedded_only("SGLang generates for an empty input in a batch"),
    ),
    "huge max_new_tokens": lambda c: c.generate(PROMPT, sampling_params={"max_new_tokens": 10**9}),
    "bad pause mode": lambda c: c.pause_generation("sideways"),
    "missing folder": lambda c: c.update_weights_from_disk("/no/such/folder"),
    "destroy unknown group": lambda c: c.destroy_weights_update_group("none"),
    "mismatched shape": pytest.param(
        lambda c: c.update_weights_from_tensor({"model.embed_tokens.weight": torch.zeros(3, 3)}),
        marks=pytest.mark.embedded_only(TENSOR_UPDATES),
    ),
    "unknown tensor": pytest.param(
        lambda c: c.update_weights_from_tensor({"no.such.weight": torch.zeros(1)}),
        marks=pytest.mark.embedded_only(TENSOR_UPDATES),
    ),
}


@pytest.mark.parametrize("call", BAD_CALLS.values(), ids=BAD_CALLS.keys())
async def test_bad_request_is_refused_and_the_engine_keeps_serving(client, call):
    version = await client.get_weight_version()
    with pytest.raises(EngineError) as refused:
        await call(client)
    assert 400 <= refused.value.status < 500 and len(refused.value.message) > 5
    assert await client.get_weight_version() == version  # a refused update changed nothing
    assert len((await client.generate(PROMPT, sampling_params=SHORT)).output_ids) == 6


# What SGLang does not check and ends on (measured): the client refuses it before anything is sent.
UNSENDABLE = {
    "out-of-vocab id": lambda c: c.generate([10**6]),  # SGLang: CUDA device-side assert
    "negative id": lambda c: c.generate([-1]),  # SGLang: CUDA device-side assert
    "ids of wrong type": lambda c: c.generate(["a", "b"]),
    "bad sampling type": lambda c: c.generate(PROMPT, sampling_params={"temperature": "hot"}),  # SGLang: 500
    "top_p out of range": lambda c: c.generate_batch([PROMPT], sampling_params=[{"top_p": 0.0}]),
    "update of a group never opened": lambda c: c.update_weights_from_distributed(  # SGLang: scheduler assertion
        ["x"], ["float32"], [[1]], group_name="none"
    ),
}


@pytest.mark.parametrize("call", UNSENDABLE.values(), ids=UNSENDABLE.keys())
async def test_requests_that_would_end_sglang_never_leave_the_client(engine, call):
    async with EngineClient(engine.ensure_running().url, vocab_size=vocab_size_of(engine.spec.model)) as client:
        with pytest.raises(InvalidRequest):
            await call(client)
        assert len((await client.generate(PROMPT, sampling_params=SHORT)).output_ids) == 6


@pytest.mark.parametrize(
    "endpoint, body",
    [
        ("/generate", b'{"input_ids": [1, 2'),
        ("/generate", b"[1, 2]"),
        pytest.param(
            "/update_weights_from_tensor",
            b'{"serialized_named_tensors": ["not base64!"], "load_format": "safetensors"}',
            marks=pytest.mark.embedded_only("SGLang unpickles this field and exits on anything else"),
        ),
        pytest.param(
            "/update_weights_from_tensor",
            b'{"serialized_named_tensors": ["aGVsbG8="], "load_format": "pickle"}',
            marks=pytest.mark.embedded_only("SGLang unpickles this field and exits on anything else"),
        ),
    ],
)
async def test_malformed_bodies_get_a_clear_4xx(engine, client, endpoint, body):
    # Malformed JSON cannot be produced through the typed client, so this one goes raw.
    async with aiohttp.ClientSession() as session:
        async with session.post(engine.process.url + endpoint, data=body) as response:
            assert 400 <= response.status < 500
            assert (await response.text()).strip()
    await client.health_generate()


# -------------------------------------------------- API key, Qwen2 family
async def test_api_key_is_enforced_on_a_qwen2_engine(request, tmp_path):
    keyed = EngineUnderTest(request.config, tmp_path, model="tiny:qwen2", api_key="s3cret")
    try:
        url = keyed.ensure_running().url
        assert b"s3cret" not in Path(f"/proc/{keyed.ensure_running().pid}/cmdline").read_bytes()  # noqa: ASYNC240 - world-readable
        async with (
            EngineClient(url) as anonymous,
            EngineClient(url, api_key="wrong") as wrong_key,
            EngineClient(url, api_key="s3cret") as authorised,
        ):
            for outsider in (anonymous, wrong_key):
                with pytest.raises(EngineError) as refused:
                    await outsider.generate(PROMPT, sampling_params=SHORT)
                assert refused.value.status == 401
                with pytest.raises(EngineError):
                    await outsider.get_model_info()
            await anonymous.health()  # liveness needs no key, as in SGLang
            assert "qwen2" in (await authorised.get_model_info()).model_path
            result = await authorised.generate(PROMPT, sampling_params=SHORT)
            assert len(result.output_ids) == 6
            assert_parallel(result)
    finally:
        keyed.stop()
