"""Engine client and launcher pieces that need no engine: wire parsing, tensor encoding, argv, failure paths."""

from __future__ import annotations

import asyncio
import base64

import msgspec
import pytest
import torch
from safetensors.torch import load

from rollout_workers.client import (
    EngineClient,
    EngineConnectionError,
    EngineError,
    EngineTimeoutError,
    GenerateResult,
    InvalidRequest,
    _decode,
    _error_message,
    _result_from_wire,
    _StreamAccumulator,
    _WireGenerate,
    serialize_cuda_ipc,
    serialize_named_tensors,
)
from rollout_workers.launcher import (
    EngineProcess,
    EngineSpec,
    EngineStartError,
    engine_command,
    engine_env,
    free_port,
)

# What real SGLang answers: no per-token versions, string weight_version, logprob triples.
SGLANG_REPLY = {
    "text": "ab",
    "output_ids": [7, 8],
    "meta_info": {
        "id": "r1",
        "finish_reason": {"type": "length", "length": 2},
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "cached_tokens": 0,
        "output_token_logprobs": [[-0.5, 7, None], [-1.25, 8, None]],
        "weight_version": "4",
        "e2e_latency": 0.01,
    },
}


def parse(reply: dict, floor: int | None = None) -> GenerateResult:
    return _result_from_wire(_decode(msgspec.json.encode(reply), _WireGenerate, "/generate"), floor)


def test_sglang_reply_without_token_versions_gets_the_response_version():
    result = parse(SGLANG_REPLY)
    assert result.output_ids == [7, 8]
    assert result.output_logprobs == [-0.5, -1.25]
    assert result.output_token_weight_versions == ["4", "4"]
    assert result.token_versions() == [4, 4]
    assert result.finish_type == "length" and not result.aborted
    assert result.rid == "r1" and result.prompt_tokens == 3


def test_a_response_that_crossed_an_update_gets_the_oldest_possible_version():
    """SGLang's one weight_version is the version when the response was sent; the floor is the version the
    engine had before the request. Equal bounds are exact; otherwise every token gets the floor."""
    assert parse(SGLANG_REPLY, floor=4).output_token_weight_versions == ["4", "4"]
    crossed = parse(SGLANG_REPLY, floor=2)
    assert crossed.token_versions() == [2, 2] and crossed.weight_version == "4"
    assert parse(SGLANG_REPLY, floor=6).token_versions() == [4, 4]  # never newer than the engine said


def test_per_token_versions_win_and_int_versions_are_read_as_strings():
    reply = msgspec.json.decode(msgspec.json.encode(SGLANG_REPLY))
    reply["meta_info"]["weight_version"] = 5
    reply["meta_info"]["output_token_weight_versions"] = [4, 5]
    result = parse(reply, floor=3)
    assert result.weight_version == "5"
    assert result.token_versions() == [4, 5]


def test_stream_accumulator_reads_cumulative_and_delta_streams_alike():
    def chunk(ids, total, finished=False):
        return parse(
            {
                "text": "x" * len(ids),
                "output_ids": ids,
                "meta_info": {
                    "id": "s",
                    "completion_tokens": total,
                    "weight_version": "1",
                    "finish_reason": {"type": "length", "length": total} if finished else None,
                    "output_token_logprobs": [[-1.0, i, None] for i in ids],
                },
            }
        )

    cumulative, delta = _StreamAccumulator(), _StreamAccumulator()
    for step in (chunk([1], 1), chunk([1, 2], 2), chunk([1, 2, 3], 3, True)):
        last_cumulative = cumulative.add(step)
    for step in (chunk([1], 1), chunk([2], 2), chunk([3], 3, True)):
        last_delta = delta.add(step)
    for result in (last_cumulative, last_delta):
        assert result.output_ids == [1, 2, 3]
        assert result.output_logprobs == [-1.0] * 3
        assert result.output_token_weight_versions == ["1"] * 3
        assert result.finish_type == "length"


def test_stream_accumulator_handles_cumulative_ids_with_delta_logprobs():
    accumulator = _StreamAccumulator()
    for ids in ([1], [1, 2], [1, 2, 3]):
        last = accumulator.add(
            parse(
                {
                    "text": "",
                    "output_ids": ids,
                    "meta_info": {
                        "completion_tokens": len(ids),
                        "output_token_logprobs": [[-0.1 * len(ids), ids[-1], None]],
                    },
                }
            )
        )
    assert last.output_ids == [1, 2, 3]
    assert last.output_logprobs == pytest.approx([-0.1, -0.2, -0.3])


def test_a_stream_never_holds_more_tokens_than_the_engine_counted():
    """SGLang 0.5.17's last chunk of a request aborted in its waiting queue repeats the last token id
    (measured: 7 ids, 6 logprobs, completion_tokens 6); the count is the truth."""
    accumulator = _StreamAccumulator()
    for ids, logprobs, total in (([1, 2, 3], [-1.0] * 3, 3), ([3], [], 3)):
        last = accumulator.add(
            parse(
                {
                    "text": "",
                    "output_ids": ids,
                    "meta_info": {
                        "completion_tokens": total,
                        "output_token_logprobs": [[lp, 0, None] for lp in logprobs],
                        "weight_version": "0",
                    },
                }
            )
        )
    assert last.output_ids == [1, 2, 3] and len(last.output_logprobs) == 3 == len(last.output_token_weight_versions)


def test_unexpected_reply_shape_is_a_protocol_error():
    from rollout_workers.client import EngineProtocolError

    with pytest.raises(EngineProtocolError, match="meta_info"):
        _decode(b'{"text": "a", "output_ids": [1]}', _WireGenerate, "/generate")
    with pytest.raises(EngineProtocolError, match="not JSON"):
        _decode(b"<html>", _WireGenerate, "/generate")


@pytest.mark.parametrize(
    "body, message",
    [
        (b'{"success": false, "message": "shape mismatch"}', "shape mismatch"),
        (b'{"error": {"message": "bad rid", "code": 400}}', "bad rid"),
        (b'{"detail": "Unauthorized"}', "Unauthorized"),
        (b"plain failure text", "plain failure text"),
        (b"", "(empty body)"),
    ],
)
def test_error_message_uses_the_servers_words(body, message):
    assert _error_message(body) == message


def test_tensors_travel_as_base64_safetensors_including_shared_storage():
    weight = torch.randn(4, 3)
    tied = {"embed.weight": weight, "lm_head.weight": weight, "bias": torch.arange(3, dtype=torch.bfloat16)}
    decoded = load(base64.b64decode(serialize_named_tensors(tied)))
    assert set(decoded) == set(tied)
    for name, tensor in tied.items():
        assert decoded[name].dtype == tensor.dtype
        assert torch.equal(decoded[name], tensor)


def test_cuda_ipc_payload_refuses_tensors_off_the_gpu():
    with pytest.raises(InvalidRequest, match="CUDA tensors only"):
        serialize_cuda_ipc({"w": torch.zeros(2)})


def test_sglang_command_line_keeps_the_api_key_in_a_private_options_file(tmp_path):
    # SGLang cannot be installed on this CPU-only machine, so its launch is checked by argv only.
    spec = EngineSpec(
        kind="sglang",
        model="/models/qwen",
        api_key="k",
        extra_args=["--mem-fraction-static", "0.7", "--enable-memory-saver"],
    )
    secrets = tmp_path / "secrets"
    options = secrets / "engine-30001.yaml"
    assert engine_command(spec, 30001, python="/py", secrets_dir=secrets) == [
        "/py",
        "-m",
        "sglang.launch_server",
        "--model-path",
        "/models/qwen",
        "--host",
        "127.0.0.1",
        "--port",
        "30001",
        "--config",
        str(options),
        "--mem-fraction-static",
        "0.7",
        "--enable-memory-saver",
    ]
    # SGLang's --config: option names without dashes; readable by the owner alone.
    assert options.read_text() == "api-key: k\n"
    assert options.stat().st_mode & 0o777 == 0o600 and secrets.stat().st_mode & 0o777 == 0o700
    with pytest.raises(ValueError, match="secrets_dir"):
        engine_command(spec, 30001)


@pytest.mark.parametrize(
    "pause_mode, april, every_token",
    [
        ("abort", False, True),
        ("abort", True, True),
        ("retract", True, False),
        ("retract", False, False),
        ("in_place", True, False),
    ],
)
def test_sglang_hands_over_every_token_where_every_sync_aborts_waiting_requests(pause_mode, april, every_token):
    from async_rl.config import load_config
    from async_rl.orchestrator import _aborts_waiting_requests

    config = load_config(
        "recipes/tiny.toml", [f"weight_sync.pause_mode={pause_mode}", f"april.enabled={str(april).lower()}"]
    )
    spec = EngineSpec(kind="sglang", model="/m", hand_over_every_token=_aborts_waiting_requests(config))
    assert ("SGLANG_FORCE_STREAM_INTERVAL" in engine_env(spec)) == every_token


def test_embedded_command_line():
    spec = EngineSpec(model="tiny:llama", device="cpu", extra_args=["--weight-version", "0"])
    assert engine_command(spec, 9, python="/py") == [
        "/py",
        "-m",
        "async_rl.cli",
        "engine",
        "serve",
        "--model",
        "tiny:llama",
        "--host",
        "127.0.0.1",
        "--port",
        "9",
        "--device",
        "cpu",
        "--weight-version",
        "0",
    ]


def test_engine_spec_from_config_rejects_unknown_keys():
    assert msgspec.convert({"kind": "sglang", "model": "m"}, EngineSpec).kind == "sglang"
    with pytest.raises(msgspec.ValidationError, match="kind"):
        msgspec.convert({"kind": "vllm", "model": "m"}, EngineSpec)
    with pytest.raises(msgspec.ValidationError, match="prot"):
        msgspec.convert({"model": "m", "prot": 1}, EngineSpec)


def test_engine_that_dies_at_start_fails_fast_with_its_log(tmp_path):
    # `sglang` is not installed here, so this process exits at once with an import error.
    engine = EngineProcess(EngineSpec(kind="sglang", model="m"), log_path=tmp_path / "engine.log")
    with pytest.raises(EngineStartError, match="No module named 'sglang'"):
        with engine:
            pass
    assert engine.poll() is not None  # reaped, no zombie
    assert engine.stop() == engine.poll()  # stopping twice is harmless


async def test_unreachable_engine_is_a_connection_error_after_retries():
    async with EngineClient(f"http://127.0.0.1:{free_port()}", read_retries=1, retry_backoff_s=0.01) as client:
        assert not await client.is_healthy()
        with pytest.raises(EngineConnectionError, match="/model_info"):
            await client.get_model_info()


async def test_silent_engine_is_a_timeout_error():
    async def never_answer(reader, writer):
        await reader.read()  # hold the connection until the client gives up

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, EngineClient(f"http://127.0.0.1:{port}") as client:
        with pytest.raises(EngineTimeoutError, match="0.2 s"):
            await client.pause_generation(timeout_s=0.2)


async def test_reads_are_retried_on_503_and_writes_are_not():
    """Also the weight version's way on a server of another release: /model_info (404 here), then
    /get_model_info (no version in it), then the old /get_weight_version."""
    from aiohttp import web

    calls = {"/get_model_info": 0, "/get_weight_version": 0, "/pause_generation": 0}

    async def flaky(request: web.Request) -> web.Response:
        calls[request.path] += 1
        if request.path == "/get_model_info":
            return web.json_response({"model_path": "m"})
        if request.path == "/pause_generation" or calls[request.path] < 3:
            return web.json_response({"error": {"message": "warming up"}}, status=503)
        return web.json_response({"weight_version": 7})

    app = web.Application()
    app.add_routes(
        [web.get("/get_model_info", flaky), web.get("/get_weight_version", flaky), web.post("/pause_generation", flaky)]
    )
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with EngineClient(f"http://127.0.0.1:{port}", retry_backoff_s=0.01) as client:
            assert await client.get_weight_version() == "7"
            with pytest.raises(EngineError) as refused:
                await client.pause_generation("retract")
    finally:
        await runner.cleanup()
    assert calls == {"/get_model_info": 1, "/get_weight_version": 3, "/pause_generation": 1}
    assert refused.value.status == 503 and refused.value.message == "warming up"
    assert refused.value.endpoint == "/pause_generation"


async def test_the_registry_replaces_only_the_clients_of_engines_that_moved(tmp_path):
    from rollout_workers.engine_registry import follow_moved, read_engine_urls, write_engine_urls

    assert read_engine_urls(tmp_path) is None
    clients = [EngineClient("http://10.0.0.1:1"), EngineClient("http://10.0.0.2:2")]
    kept = clients[0]
    assert await follow_moved(clients, tmp_path, EngineClient) == []  # no registry: nothing moves
    write_engine_urls(tmp_path, ["http://10.0.0.1:1", "http://10.0.0.3:3"])
    assert await follow_moved(clients, tmp_path, EngineClient) == [1]
    assert clients[0] is kept and clients[1].url == "http://10.0.0.3:3"
    assert await follow_moved(clients, tmp_path, EngineClient) == []
    write_engine_urls(tmp_path, ["http://10.0.0.1:1"])  # another run's shape: never half-applied
    assert await follow_moved(clients, tmp_path, EngineClient) == []
