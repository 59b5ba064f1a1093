"""The engine server as a real subprocess over real HTTP: shapes, errors, control, all three weight paths."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
import torch

from async_rl import dist_group
from rollout_workers.client import serialize_named_tensors
from rollout_workers.engine.model import create_tiny_model
from rollout_workers.engine.weights import load_folder

API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "base": create_tiny_model(root / "base", "llama", seed=0),
        "other": create_tiny_model(root / "other", "llama", seed=1),
        "wrong": create_tiny_model(root / "wrong", "llama", hidden_size=32, seed=0),
    }


@pytest.fixture(scope="module")
def server(models, start_engine):
    return start_engine(
        str(models["base"]), device=None, api_key=API_KEY, extra_args=["--max-running-requests", "16"]
    ).url


@pytest.fixture
async def http(server):
    async with aiohttp.ClientSession(server, headers=AUTH) as session:
        async with asyncio.timeout(TIMEOUT_S):
            yield session


async def post(http, path: str, body=None, status: int = 200):
    async with http.post(path, json=body if body is not None else {}) as response:
        payload = await response.json()
        assert response.status == status, payload
        return payload


async def get(http, path: str):
    async with http.get(path) as response:
        assert response.status == 200
        return await response.json()


async def until_idle(http) -> None:
    """Poll with a deadline (the enclosing asyncio.timeout) until the engine holds no requests."""
    while True:
        state = (await get(http, "/get_server_info"))["internal_states"][0]
        if state["running"] == 0 and state["waiting"] == 0:
            return
        await asyncio.sleep(0.05)


async def test_generate_shapes(http):
    single = await post(
        http,
        "/generate",
        {
            "input_ids": [5, 6, 7],
            "return_logprob": True,
            "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True},
        },
    )
    meta = single["meta_info"]
    assert len(single["output_ids"]) == 4 and isinstance(single["text"], str)
    assert meta["finish_reason"] == {"type": "length", "length": 4}
    assert meta["prompt_tokens"] == 3 and meta["completion_tokens"] == 4 and meta["weight_version"] == "0"
    assert meta["output_token_weight_versions"] == ["0"] * 4
    assert [t for _, t, _ in meta["output_token_logprobs"]] == single["output_ids"]
    assert all(lp <= 0 and text is None for lp, _, text in meta["output_token_logprobs"])

    batch = await post(
        http,
        "/generate",
        {"text": ["1+1=", "abc"], "rid": ["a", "b"], "sampling_params": {"max_new_tokens": 3, "n": 2}},
    )
    assert [out["meta_info"]["id"] for out in batch] == ["a-0", "a-1", "b-0", "b-1"]
    assert [out["meta_info"]["prompt_tokens"] for out in batch] == [4, 4, 3, 3]


async def test_stream_chunks_are_cumulative_and_end_with_done(http):
    body = {"input_ids": [5, 6], "stream": True, "sampling_params": {"max_new_tokens": 6, "ignore_eos": True}}
    chunks = []
    async with http.post("/generate", json=body) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        async for line in response.content:
            if line.strip():
                chunks.append(line.decode().removeprefix("data: ").strip())
    assert chunks[-1] == "[DONE]"
    outputs = [json.loads(chunk) for chunk in chunks[:-1]]
    lengths = [len(out["output_ids"]) for out in outputs]
    assert lengths == sorted(lengths) and lengths[-1] == 6
    assert outputs[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(out["output_ids"] == outputs[-1]["output_ids"][: len(out["output_ids"])] for out in outputs)


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"input_ids": []}, "empty"),
        ({"input_ids": [5, 100000]}, "vocabulary"),
        ({"input_ids": "abc"}, "input_ids"),
        ({"input_ids": [5], "sampling_params": {"max_new_tokens": 10**6}}, "context window"),
        ({"input_ids": [5], "sampling_params": {"temperature": -1}}, "temperature"),
        ({"input_ids": [5], "top_logprobs_num": 3}, "top_logprobs_num"),
        ({"input_ids": [[5], [6]], "rid": "one"}, "rid"),
        ({"text": "a", "input_ids": [5]}, "exactly one"),
    ],
)
async def test_bad_generate_requests_get_400(http, body, fragment):
    payload = await post(http, "/generate", body, status=400)
    assert fragment in payload["error"]["message"]


async def test_bad_control_requests_and_auth(http, server):
    async with http.post("/generate", data=b"{not json") as response:
        assert response.status == 400 and "JSON" in (await response.json())["error"]["message"]
    await post(http, "/pause_generation", {"mode": "sideways"}, status=400)
    await post(http, "/abort_request", {}, status=400)
    unknown = await post(http, "/abort_request", {"rid": "never-existed"})
    assert unknown["success"] and unknown["aborted"] == 0
    async with aiohttp.ClientSession(server) as anonymous:
        async with anonymous.get("/health") as response:
            assert response.status == 200
        async with anonymous.post("/generate", json={"input_ids": [5]}) as response:
            assert response.status == 401
    info = await get(http, "/get_model_info")
    assert info["is_generation"] and info["model_path"] and info["tokenizer_path"]
    async with http.get("/health_generate") as response:
        assert response.status == 200


async def test_client_disconnect_aborts_the_request(http):
    body = {
        "input_ids": [5, 6],
        "rid": "leaver",
        "stream": True,
        "sampling_params": {"max_new_tokens": 1900, "ignore_eos": True},
    }
    async with http.post("/generate", json=body) as response:
        await response.content.readline()  # generation has started
    # The rid is free again only once the engine dropped the request.
    while True:
        async with http.post(
            "/generate", json=body | {"stream": False, "sampling_params": {"max_new_tokens": 1}}
        ) as again:
            if again.status == 200:
                break
        await asyncio.sleep(0.05)
    await until_idle(http)


async def test_abort_by_rid_returns_partial_output(http):
    body = {
        "input_ids": [5],
        "rid": "victim",
        "return_logprob": True,
        "sampling_params": {"max_new_tokens": 1900, "ignore_eos": True},
    }
    generation = asyncio.create_task(post(http, "/generate", body))
    while (await post(http, "/abort_request", {"rid": "victim"}))["aborted"] == 0:
        await asyncio.sleep(0.01)
    result = await generation
    assert result["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(result["output_ids"]) == len(result["meta_info"]["output_token_logprobs"]) < 1900


async def test_retract_update_from_tensor_continue_then_disk_update(http, models):
    body = {
        "input_ids": [9, 10, 11],
        "rid": "long",
        "sampling_params": {"max_new_tokens": 1900, "ignore_eos": True, "temperature": 0},
    }
    before = (await get(http, "/get_server_info"))["internal_states"][0]["generated_tokens"]
    generation = asyncio.create_task(post(http, "/generate", body))
    # Pause only once the old weights produced at least one token.
    while (await get(http, "/get_server_info"))["internal_states"][0]["generated_tokens"] == before:
        await asyncio.sleep(0.01)
    await post(http, "/pause_generation", {"mode": "retract"})
    other = load_folder(str(models["other"]))
    serialized = serialize_named_tensors(other)
    await post(
        http,
        "/update_weights_from_tensor",
        {"serialized_named_tensors": [serialized], "weight_version": "1", "flush_cache": False},
        status=400,
    )  # load_format must be said
    # With a request paused in the engine, only an update that does not flush is taken (SGLang exits otherwise).
    await post(
        http,
        "/update_weights_from_tensor",
        {"serialized_named_tensors": [serialized], "load_format": "safetensors", "weight_version": "1"},
        status=400,
    )
    updated = await post(
        http,
        "/update_weights_from_tensor",
        {
            "serialized_named_tensors": [serialized],
            "flush_cache": False,
            "load_format": "safetensors",
            "weight_version": "1",
        },
    )
    assert updated["success"]
    resumed_at = (await get(http, "/get_server_info"))["internal_states"][0]["generated_tokens"]
    await post(http, "/continue_generation")
    while (await get(http, "/get_server_info"))["internal_states"][0]["generated_tokens"] < resumed_at + 5:
        await asyncio.sleep(0.01)
    await post(http, "/abort_request", {"rid": "long"})
    result = await generation
    versions = result["meta_info"]["output_token_weight_versions"]
    assert versions[0] == "0" and versions[-1] == "1" and versions == sorted(versions)
    assert result["meta_info"]["weight_version"] == "1"
    assert (await get(http, "/model_info"))["weight_version"] == "1"

    probe = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}}
    under_other = (await post(http, "/generate", probe))["output_ids"]
    wrong = await post(
        http, "/update_weights_from_disk", {"model_path": str(models["wrong"]), "weight_version": "x"}, status=400
    )
    assert not wrong["success"] and "shape" in wrong["message"]
    assert (await post(http, "/generate", probe))["output_ids"] == under_other
    back = await post(http, "/update_weights_from_disk", {"model_path": str(models["base"]), "weight_version": "2"})
    assert back["success"]
    restored = await post(http, "/generate", probe)
    assert restored["meta_info"]["weight_version"] == "2"
    assert restored["output_ids"] != under_other


async def test_in_place_pause_blocks_flush_and_memory_release_refuses_generate(http):
    body = {"input_ids": [5], "rid": "held", "sampling_params": {"max_new_tokens": 1900, "ignore_eos": True}}
    generation = asyncio.create_task(post(http, "/generate", body))
    while (await get(http, "/get_server_info"))["internal_states"][0]["running"] == 0:
        await asyncio.sleep(0.01)
    await post(http, "/pause_generation", {"mode": "in_place"})
    assert not (await post(http, "/flush_cache", status=400))["success"]
    await post(http, "/abort_request", {"abort_all": True})
    assert (await generation)["meta_info"]["finish_reason"]["type"] == "abort"
    await post(http, "/continue_generation")
    assert (await post(http, "/flush_cache"))["success"]
    await post(http, "/release_memory_occupation", {"tags": ["weights", "kv_cache"]})
    await post(http, "/generate", {"input_ids": [5]}, status=503)
    await post(http, "/resume_memory_occupation", {})
    await post(http, "/generate", {"input_ids": [5], "sampling_params": {"max_new_tokens": 2}})


@pytest.mark.parametrize("load_format", [None, "flattened_bucket"])
async def test_update_weights_from_distributed_over_gloo(http, models, free_port, load_format):
    port = free_port()
    init = asyncio.create_task(
        post(
            http,
            "/init_weights_update_group",
            {
                "master_address": "127.0.0.1",
                "master_port": port,
                "rank_offset": 1,
                "world_size": 2,
                "group_name": "g",
                "backend": "gloo",
                "timeout_s": 30,
            },
        )
    )
    group = await asyncio.to_thread(dist_group.init_weight_update_group, "127.0.0.1", port, 0, 2, "gloo", "g", 30)
    assert (await init)["success"]
    weights = load_folder(str(models["other"]))
    names = sorted(weights)

    async def update(names, tensors, version: str, status: int = 200) -> dict:
        body = {
            "names": names,
            "dtypes": [str(t.dtype) for t in tensors],
            "shapes": [list(t.shape) for t in tensors],
            "group_name": "g",
            "weight_version": version,
            **({"load_format": load_format} if load_format else {}),
        }
        updating = asyncio.create_task(post(http, "/update_weights_from_distributed", body, status))
        if load_format:
            await asyncio.to_thread(dist_group.broadcast_flattened, group, tensors)
        else:
            for tensor in tensors:
                await asyncio.to_thread(dist_group.broadcast, group, tensor.contiguous(), 0)
        return await updating

    assert (await update(names, [weights[n] for n in names], "7"))["success"]
    assert (await get(http, "/model_info"))["weight_version"] == "7"
    if load_format:
        # A bucket whose second tensor would start mid-element is received (the group stays in step), then refused.
        odd = [torch.ones(1, dtype=torch.bfloat16), torch.ones(1)]
        refused = await update(names[:2], odd, "8", status=400)
        assert "element size" in refused["message"]
        assert (await get(http, "/model_info"))["weight_version"] == "7"
        # The staging buffer is reused: the next bucket still arrives whole.
        assert (await update(names, [weights[n] * 2 for n in names], "9"))["success"]
        assert (await get(http, "/model_info"))["weight_version"] == "9"
    assert (await post(http, "/destroy_weights_update_group", {"group_name": "g"}))["success"]
    dist_group.destroy(group)
    await post(http, "/destroy_weights_update_group", {"group_name": "g"}, status=400)
