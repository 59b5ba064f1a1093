"""`async-rl engine serve`: the embedded engine behind SGLang's RL HTTP API.

Shapes follow contracts/sglang_rl_api.md. Where the contract is silent:
- errors are `{"error": {"message": ...}}` with a 4xx status; weight endpoints,
  /flush_cache and the memory endpoints answer `{"success": false, "message": ...}` with 400;
- generating while weights or KV cache are released is 503;
- aborting an unknown rid is 200 with `"aborted": 0` (SGLang semantics: the request
  may just have finished, which is no error); a live rid also aborts every rid it is a prefix of;
- meta_info carries the extension `output_token_weight_versions`: the weight
  version that produced each output token;
- with --api-key every path except /health and /health_generate needs
  `Authorization: Bearer KEY` (as SGLang, which exempts /health*);
- `top_logprobs_num > 0` and sampling penalties are refused with 400, unknown
  fields are ignored; `/update_weights_from_tensor` takes base64 safetensors, never pickles.

What would end a real SGLang server is refused with a 4xx and the engine keeps serving
(../shared/sglang-gpu/README.md): an update with flush_cache while requests are paused,
releasing memory while requests are live, resuming memory that was not released.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from async_rl import stacks
from rollout_workers.engine import protocol as P

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 128
# Answered {"success": false, "message"} on failure, as SGLang does.
OUTCOME_PATHS = frozenset(
    {
        "/update_weights_from_disk",
        "/update_weights_from_tensor",
        "/init_weights_update_group",
        "/update_weights_from_distributed",
        "/destroy_weights_update_group",
        "/flush_cache",
        "/release_memory_occupation",
        "/resume_memory_occupation",
    }
)


class RequestError(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(payload), status=status, content_type="application/json")


def _outcome(ok: bool, message: str, **extra: Any) -> web.Response:
    return _json({"success": ok, "message": message, **extra}, 200 if ok else 400)


async def _parse(request: web.Request, kind: type):
    body = await request.read()
    try:
        return msgspec.json.decode(body or b"{}", type=kind)
    except msgspec.ValidationError as exc:
        raise RequestError(f"invalid request: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise RequestError(f"invalid JSON: {exc}") from exc


def _middlewares(api_key: str | None):
    @web.middleware
    async def errors(request: web.Request, handler):
        try:
            return await handler(request)
        except RequestError as exc:
            if request.path in OUTCOME_PATHS:
                return _json({"success": False, "message": str(exc)}, exc.status)
            return _json({"error": {"message": str(exc)}}, exc.status)
        except web.HTTPException as exc:
            return _json({"error": {"message": exc.reason}}, exc.status)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as exc:
            log.exception("%s failed", request.path)
            return _json({"error": {"message": f"internal error: {exc!r}"}}, 500)

    @web.middleware
    async def auth(request: web.Request, handler):
        if api_key is not None and not request.path.startswith("/health"):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _json({"error": {"message": "Unauthorized: send Authorization: Bearer <api key>"}}, 401)
        return await handler(request)

    return [errors, auth]


class EngineServer:
    def __init__(self, core, *, model_path: str, tokenizer_path: str | None, server_args: dict[str, Any]):
        self.core = core
        self.model_path = model_path
        self.tokenizer_path = tokenizer_path
        self.server_args = server_args
        self.groups: dict[str, Any] = {}

    def app(self, api_key: str | None = None) -> web.Application:
        app = web.Application(middlewares=_middlewares(api_key), client_max_size=1 << 31)
        post = {
            "/generate": self.generate,
            "/pause_generation": self.pause_generation,
            "/continue_generation": self.continue_generation,
            "/abort_request": self.abort_request,
            "/update_weights_from_disk": self.update_weights_from_disk,
            "/update_weights_from_tensor": self.update_weights_from_tensor,
            "/init_weights_update_group": self.init_weights_update_group,
            "/update_weights_from_distributed": self.update_weights_from_distributed,
            "/destroy_weights_update_group": self.destroy_weights_update_group,
            "/release_memory_occupation": self.release_memory_occupation,
            "/resume_memory_occupation": self.resume_memory_occupation,
            "/flush_cache": self.flush_cache,
        }
        get = {
            "/model_info": self.get_model_info,
            "/get_model_info": self.get_model_info,  # SGLang keeps the old names as deprecated aliases
            "/server_info": self.get_server_info,
            "/get_server_info": self.get_server_info,
            "/get_weight_version": self.weight_version_moved,
            "/weight_version": self.weight_version_moved,
            "/health": self.health,
            "/health_generate": self.health_generate,
        }
        app.add_routes([web.post(path, handler) for path, handler in post.items()])
        app.add_routes([web.get(path, handler) for path, handler in get.items()])
        app.on_shutdown.append(self._shutdown)
        return app

    async def _shutdown(self, app: web.Application) -> None:
        await asyncio.to_thread(self.core.stop, 10.0)

    async def _on_engine(self, fn, *args):
        return await asyncio.wrap_future(self.core.call(fn, *args))

    # ---- generation ----

    async def generate(self, request: web.Request) -> web.StreamResponse:
        req = await _parse(request, P.GenerateRequest)
        prompts, batched = self._prompts(req)
        all_params = (
            req.sampling_params if isinstance(req.sampling_params, list) else [req.sampling_params] * len(prompts)
        )
        if len(all_params) != len(prompts):
            raise RequestError(f"sampling_params has {len(all_params)} entries for {len(prompts)} inputs")
        if req.top_logprobs_num:
            raise RequestError("top_logprobs_num is not supported by the embedded engine")
        if self.core.released:
            raise RequestError(
                f"memory released ({', '.join(sorted(self.core.released))}); call /resume_memory_occupation", 503
            )
        rids = self._rids(req.rid, len(prompts), batched)
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def on_update(seq) -> None:  # engine thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, (seq, len(seq.output_ids), seq.finish_reason))
            except RuntimeError:  # event loop closed: the server is going down
                pass

        sequences, params_of = [], {}
        for prompt, params, rid in zip(prompts, all_params, rids):
            for seq in self._sequences(prompt, params, rid, req, on_update):
                sequences.append(seq)
                params_of[seq] = params
        try:
            self.core.submit(sequences)
        except Exception as exc:  # RequestRefused: duplicate live rid
            raise RequestError(str(exc)) from exc
        try:
            if req.stream:
                return await self._stream(request, req, sequences, params_of, events)
            pending = set(sequences)
            while pending:
                seq, _, reason = await events.get()
                if reason is not None:
                    pending.discard(seq)
            outputs = [
                self._output(seq, len(seq.output_ids), seq.finish_reason, req, params_of[seq]) for seq in sequences
            ]
            return _json(outputs if batched or len(outputs) > 1 else outputs[0])
        except (asyncio.CancelledError, ConnectionResetError):
            self._abort_unfinished(sequences, "client disconnected")
            raise

    async def _stream(self, request, req, sequences, params_of, events) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        index = {seq: i for i, seq in enumerate(sequences)}
        pending = set(sequences)
        while pending:
            latest = {}  # coalesce: each chunk is cumulative, so only the newest per sequence matters
            event = await events.get()
            while True:
                latest[event[0]] = event
                try:
                    event = events.get_nowait()
                except asyncio.QueueEmpty:
                    break
            for seq, n, reason in sorted(latest.values(), key=lambda e: index[e[0]]):
                chunk = self._output(seq, n, reason, req, params_of[seq])
                if len(sequences) > 1:
                    chunk["index"] = index[seq]
                await response.write(b"data: " + msgspec.json.encode(chunk) + b"\n\n")
                if reason is not None:
                    pending.discard(seq)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _abort_unfinished(self, sequences, message: str) -> None:
        for rid in {seq.rid for seq in sequences if seq.finish_reason is None}:
            self.core.call(self.core.abort, rid, message)

    def _prompts(self, req: P.GenerateRequest) -> tuple[list[list[int]], bool]:
        if (req.text is None) == (req.input_ids is None):
            raise RequestError("give exactly one of text and input_ids")
        if req.text is not None:
            if self.core.tokenizer is None:
                raise RequestError("this model has no tokenizer: send input_ids")
            texts = [req.text] if isinstance(req.text, str) else req.text
            prompts = [self.core.tokenizer.encode(text) for text in texts]
            batched = not isinstance(req.text, str)
        else:
            assert req.input_ids is not None  # exactly one of text and input_ids was given
            batched = bool(req.input_ids) and all(isinstance(item, list) for item in req.input_ids)
            try:
                prompts = msgspec.convert(req.input_ids, list[list[int]] if batched else list[int])
            except msgspec.ValidationError as exc:
                raise RequestError(f"input_ids must be a list of token ids or a list of such lists: {exc}") from exc
            prompts = prompts if batched else [prompts]
        if not prompts:
            raise RequestError("empty batch")
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise RequestError(f"input {i} is empty")
            if min(prompt) < 0 or max(prompt) >= self.core.vocab_size:
                bad = next(t for t in prompt if not 0 <= t < self.core.vocab_size)
                raise RequestError(f"input {i} has token id {bad} outside the vocabulary [0, {self.core.vocab_size})")
        return prompts, batched

    @staticmethod
    def _rids(rid: str | list[str] | None, count: int, batched: bool) -> list[str]:
        if rid is None:
            return [uuid.uuid4().hex for _ in range(count)]
        if isinstance(rid, str):
            if batched:
                raise RequestError("batched input needs rid as a list with one id per input")
            return [rid]
        if not batched or len(rid) != count:
            raise RequestError(f"rid list has {len(rid)} ids for {count} inputs{'' if batched else ' (single input)'}")
        if len(set(rid)) != len(rid):
            raise RequestError("rid list has duplicates")
        return list(rid)

    def _sequences(self, prompt: list[int], params: P.SamplingParamsBody, rid: str, req: P.GenerateRequest, on_update):
        from rollout_workers.engine.core import Sequence

        core = self.core
        if params.frequency_penalty or params.presence_penalty or params.repetition_penalty != 1.0:
            raise RequestError("sampling penalties are not supported by the embedded engine")
        stops = tuple(params.stop_strings())
        if stops and core.tokenizer is None:
            raise RequestError("stop strings need a tokenizer; this model has none")
        if len(prompt) >= core.context_length:
            raise RequestError(f"prompt has {len(prompt)} tokens; the context window is {core.context_length}")
        max_new = params.max_new_tokens
        if max_new is None:
            max_new = min(DEFAULT_MAX_NEW_TOKENS, core.context_length - len(prompt))
        if len(prompt) + max_new > core.context_length:
            raise RequestError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new}) exceeds the context window ({core.context_length})"
            )
        if len(prompt) + max_new > core.max_total_tokens:
            raise RequestError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new}) exceeds --max-total-tokens ({core.max_total_tokens})"
            )
        stop_ids = frozenset() if params.ignore_eos else core.eos_token_ids | frozenset(params.stop_token_ids or ())
        return [
            Sequence(
                sid=rid if params.n == 1 else f"{rid}-{j}",
                rid=rid,
                prompt_ids=prompt,
                max_new_tokens=max_new,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                min_p=params.min_p,
                stop_token_ids=stop_ids,
                stop_strings=stops,
                logprob_start_len=req.logprob_start_len if req.return_logprob else -1,
                on_update=on_update,
                stream=req.stream,
            )
            for j in range(params.n)
        ]

    def _decode(self, ids: list[int], skip_special_tokens: bool = True) -> str | None:
        tokenizer = self.core.tokenizer
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens) if tokenizer is not None else None

    def _output(self, seq, n: int, reason, req: P.GenerateRequest, params: P.SamplingParamsBody) -> dict[str, Any]:
        ids = seq.output_ids[:n]
        text = self._decode(ids, params.skip_special_tokens)
        if text is not None and reason and reason["type"] == "stop" and isinstance(reason.get("matched"), str):
            cut = text.find(reason["matched"])
            if cut >= 0 and not params.no_stop_trim:
                text = text[:cut]
        meta: dict[str, Any] = {
            "id": seq.sid,
            "finish_reason": reason,
            "prompt_tokens": len(seq.prompt_ids),
            "completion_tokens": n,
            "cached_tokens": 0,
            "weight_version": seq.finish_version if reason else self.core.weight_version,
            "output_token_weight_versions": seq.output_versions[:n],
            "e2e_latency": time.time() - seq.created,
        }
        if req.return_logprob:
            meta["output_token_logprobs"] = self._logprob_triples(seq.output_logprobs[:n], ids, req)
            if seq.input_logprobs is not None:
                start = max(0, min(req.logprob_start_len, len(seq.prompt_ids)))
                meta["input_token_logprobs"] = self._logprob_triples(seq.input_logprobs, seq.prompt_ids[start:], req)
            else:
                meta["input_token_logprobs"] = []
        return {"text": text if text is not None else "", "output_ids": ids, "meta_info": meta}

    def _logprob_triples(self, logprobs, ids, req: P.GenerateRequest) -> list[list]:
        if req.return_text_in_logprobs and self.core.tokenizer is not None:
            return [[lp, t, self._decode([t], False)] for lp, t in zip(logprobs, ids)]
        return [[lp, t, None] for lp, t in zip(logprobs, ids)]

    # ---- control ----

    async def pause_generation(self, request: web.Request) -> web.Response:
        req = await _parse(request, P.PauseRequest)
        await self._on_engine(self.core.pause, req.mode)
        return _json({"success": True, "message": f"Generation paused (mode {req.mode})."})

    async def continue_generation(self, request: web.Request) -> web.Response:
        await self._on_engine(self.core.resume)
        return _json({"success": True, "message": "Generation continued."})

    async def abort_request(self, request: web.Request) -> web.Response:
        req = await _parse(request, P.AbortRequest)
        if not req.abort_all and not req.rid:
            raise RequestError("give rid or abort_all: true")
        aborted = await self._on_engine(self.core.abort, None if req.abort_all else req.rid, "aborted by abort_request")
        message = (
            f"aborted {aborted} sequences" if aborted or req.abort_all else f"no live request with rid {req.rid!r}"
        )
        return _json({"success": True, "message": message, "aborted": aborted})

    async def flush_cache(self, request: web.Request) -> web.Response:
        return _outcome(*await self._on_engine(self.core.flush_cache))

    async def release_memory_occupation(self, request: web.Request) -> web.Response:
        req = await _parse(request, P.MemoryRequest)
        return _outcome(*await self._on_engine(self.core.release_memory, req.tags or ["weights", "kv_cache"]))

    async def resume_memory_occupation(self, request: web.Request) -> web.Response:
        req = await _parse(request, P.MemoryRequest)
        return _outcome(*await self._on_engine(self.core.resume_memory, req.tags or ["weights", "kv_cache"]))

    # ---- weights ----

    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        from rollout_workers.engine.weights import load_folder

        req = await _parse(request, P.UpdateFromDiskRequest)
        if req.load_format not in (None, "auto", "safetensors"):
            raise RequestError(f"load_format {req.load_format!r} not supported; use auto or safetensors")
        try:
            tensors = await asyncio.to_thread(load_folder, req.model_path)
        except (OSError, ValueError) as exc:
            raise RequestError(f"cannot read weights from {req.model_path!r}: {exc}") from exc
        if req.abort_all_requests:
            await self._on_engine(self.core.abort, None, "aborted for a weight update")
        ok, message = await self._on_engine(self.core.load_weights, tensors, req.weight_version, req.flush_cache)
        if ok:
            self.model_path = req.model_path
        return _outcome(ok, message)

    async def update_weights_from_tensor(self, request: web.Request) -> web.Response:
        from rollout_workers.engine.weights import decode_serialized

        req = await _parse(request, P.UpdateFromTensorRequest)
        if req.load_format != "safetensors":
            raise RequestError(
                'load_format must be "safetensors" (base64 of safetensors.torch.save); this engine never unpickles network input'
            )
        if len(req.serialized_named_tensors) != 1:
            raise RequestError("serialized_named_tensors must hold exactly one entry (the engine has one rank)")
        try:
            tensors = await asyncio.to_thread(decode_serialized, req.serialized_named_tensors[0])
        except ValueError as exc:
            raise RequestError(str(exc)) from exc
        return _outcome(*await self._on_engine(self.core.load_weights, tensors, req.weight_version, req.flush_cache))

    async def init_weights_update_group(self, request: web.Request) -> web.Response:
        from async_rl.dist_group import init_weight_update_group

        req = await _parse(request, P.InitGroupRequest)
        if req.group_name in self.groups:
            raise RequestError(f"group {req.group_name!r} already exists")
        if req.backend == "nccl" and self.core.device.type != "cuda":
            raise RequestError("backend nccl needs --device cuda")
        try:
            group = await asyncio.to_thread(
                init_weight_update_group,
                req.master_address,
                req.master_port,
                req.rank_offset,
                req.world_size,
                req.backend,
                req.group_name,
                req.timeout_s,
            )
        except Exception as exc:
            raise RequestError(f"cannot join weight update group {req.group_name!r}: {exc}") from exc
        self.groups[req.group_name] = group
        return _outcome(True, f"joined {req.group_name!r} as rank {req.rank_offset} of {req.world_size}")

    async def update_weights_from_distributed(self, request: web.Request) -> web.Response:
        from async_rl.dist_group import torch_dtype_from_name

        req = await _parse(request, P.UpdateFromDistributedRequest)
        group = self.groups.get(req.group_name)
        if group is None:
            raise RequestError(f"no weight update group {req.group_name!r}; call /init_weights_update_group first")
        if not len(req.names) == len(req.dtypes) == len(req.shapes):
            raise RequestError("names, dtypes and shapes must have the same length")
        try:
            dtypes = [torch_dtype_from_name(name) for name in req.dtypes]
        except ValueError as exc:
            raise RequestError(str(exc)) from exc
        return _outcome(*await self._on_engine(self._receive_weights, group, req, dtypes))

    def _receive_weights(self, group, req: P.UpdateFromDistributedRequest, dtypes) -> tuple[bool, str]:
        """Engine thread: receive every tensor first (the sender broadcasts them all, one by one or, with
        load_format flattened_bucket, in one buffer), then check and load."""
        import torch

        from async_rl.dist_group import broadcast, receive_flattened

        if req.load_format == "flattened_bucket":
            try:
                received = receive_flattened(group, dtypes, req.shapes)
            except ValueError as exc:
                return False, str(exc)
        else:
            received = [
                broadcast(group, torch.empty(shape, dtype=dtype, device=group.device), src=0)
                for dtype, shape in zip(dtypes, req.shapes)
            ]
        return self.core.load_weights(dict(zip(req.names, received)), req.weight_version, req.flush_cache)

    async def destroy_weights_update_group(self, request: web.Request) -> web.Response:
        from async_rl.dist_group import destroy

        req = await _parse(request, P.DestroyGroupRequest)
        group = self.groups.pop(req.group_name, None)
        if group is None:
            raise RequestError(f"no weight update group {req.group_name!r}")
        await asyncio.to_thread(destroy, group)
        return _outcome(True, f"destroyed {req.group_name!r}")

    # ---- info ----

    async def get_model_info(self, request: web.Request) -> web.Response:
        config = self.core.model.config
        return _json(
            {
                "model_path": self.model_path,
                "tokenizer_path": self.tokenizer_path,
                "is_generation": True,
                "preferred_sampling_params": None,
                "weight_version": self.core.weight_version,
                "model_type": getattr(config, "model_type", None),
                "vocab_size": self.core.vocab_size,
                "context_length": self.core.context_length,
                "eos_token_ids": sorted(self.core.eos_token_ids),
            }
        )

    async def get_server_info(self, request: web.Request) -> web.Response:
        import torch
        import transformers

        from rollout_workers.engine import __version__

        state = asdict(self.core.stats) | {"paused": self.core.paused, "released": sorted(self.core.released)}
        return _json(
            self.server_args
            | {
                "engine": "async-rl-embedded",
                "version": __version__,
                "torch_version": str(torch.__version__),
                "transformers_version": transformers.__version__,
                "weight_version": self.core.weight_version,
                "internal_states": [state],
            }
        )

    async def weight_version_moved(self, request: web.Request) -> web.Response:
        """SGLang 0.5.17 answers 404 here; the version is in /model_info."""
        return _json(
            {"error": {"message": f"Endpoint {request.path!r} is deprecated. Please use '/model_info' instead."}}, 404
        )

    async def health(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def health_generate(self, request: web.Request) -> web.Response:
        """Generates one token; a paused engine is healthy but cannot generate, so it answers without trying."""
        if self.core.released:
            raise RequestError("memory released", 503)
        if self.core.paused:
            return _json({"status": "paused"})
        from rollout_workers.engine.core import Sequence

        done = asyncio.get_running_loop().create_future()

        def on_update(seq) -> None:
            def finish() -> None:
                if not done.done():
                    done.set_result(seq.finish_reason)

            done.get_loop().call_soon_threadsafe(finish)

        probe = Sequence(
            sid=f"health-{uuid.uuid4().hex}",
            rid=f"health-{uuid.uuid4().hex}",
            prompt_ids=[0],
            max_new_tokens=1,
            temperature=0.0,
            on_update=on_update,
        )
        self.core.submit([probe])
        try:
            async with asyncio.timeout(30):
                reason = await done
        except TimeoutError:
            self.core.call(self.core.abort, probe.rid, "health check timed out")
            raise RequestError("engine did not generate within 30 s", 503) from None
        if reason["type"] == "abort":
            raise RequestError(f"health generate aborted: {reason['message']}", 503)
        return _json({"status": "ok"})


# ---- command line ----


class _OptionsFile(argparse.Action):
    """SGLang's --config: a YAML file of options (e.g. `api-key: KEY`, kept off the world-readable
    command line); options after it on the command line win."""

    def __call__(self, parser, namespace, path, option_string=None) -> None:
        import yaml

        try:
            options = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            parser.error(f"--config {path}: {exc}")
        if not isinstance(options, dict):
            parser.error(f"--config {path}: expected a mapping of option names to values")
        known = {action.dest for action in parser._actions} - {"help", self.dest}
        for key, value in options.items():
            dest = str(key).replace("-", "_")
            if dest not in known:
                parser.error(f"--config {path}: unknown option {key!r}")
            setattr(namespace, dest, value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action=_OptionsFile, help="YAML file of options (SGLang's --config)")
    parser.add_argument(
        "--model",
        "--model-path",
        dest="model",
        required=True,
        help="model folder, or tiny:llama, tiny:qwen2, qwen2-0.5b, smollm2",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--max-running-requests", type=int, default=256)
    parser.add_argument(
        "--max-total-tokens",
        type=int,
        default=None,
        help="bound on the KV cache in tokens: running rows x the longest row's prompt + max_new_tokens",
    )
    # SGLang's flags of the same names and meanings
    parser.add_argument("--chunked-prefill-size", type=int, default=8192, help="tokens per prefill forward")
    parser.add_argument(
        "--cuda-graph-max-bs", type=int, default=256, help="decode steps up to this many rows replay CUDA graphs"
    )
    parser.add_argument("--disable-cuda-graph", action="store_true")
    parser.add_argument(
        "--trainer-logprobs-chunk",
        type=int,
        default=None,
        help="report finished samples' logprobs as the trainer computes them, with its logprob_chunk_tokens",
    )
    parser.add_argument("--weight-version", default="0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-level", default="info")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stacks.install("engine")
    import torch

    from rollout_workers.engine.core import EngineCore
    from rollout_workers.engine.model import load_model, resolve_model_spec

    torch.manual_seed(args.seed)
    path = resolve_model_spec(args.model)
    loaded = load_model(path, device=args.device, dtype=args.dtype)
    core = EngineCore(
        loaded.model,
        loaded.tokenizer,
        device=args.device,
        max_running_requests=args.max_running_requests,
        max_total_tokens=args.max_total_tokens,
        chunked_prefill_size=args.chunked_prefill_size,
        cuda_graph_max_bs=0 if args.disable_cuda_graph else args.cuda_graph_max_bs,
        trainer_logprobs_chunk=args.trainer_logprobs_chunk,
        weight_version=args.weight_version,
        seed=args.seed,
    )
    core.start()
    server_args = {k: v for k, v in vars(args).items() if k not in ("api_key", "config")} | {"model_path": str(path)}
    server = EngineServer(
        core,
        model_path=str(path),
        tokenizer_path=str(path) if loaded.tokenizer is not None else None,
        server_args=server_args,
    )
    web.run_app(
        server.app(api_key=args.api_key),
        host=args.host,
        port=args.port,
        handler_cancellation=True,
        access_log=None,
        print=lambda _: print(f"engine ready: {args.model} on http://{args.host}:{args.port}", flush=True),
    )
    return 0
