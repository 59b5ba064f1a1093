"""Async HTTP client for SGLang's RL API (contracts/sglang_rl_api.md).

The same class drives real SGLang and the embedded engine, so rollout workers,
weight sync and the APRIL controller never know which one they talk to.
Responses are decoded into msgspec Structs at the boundary: callers never index
raw JSON, and a malformed answer fails here with a clear `EngineProtocolError`.
"""

from __future__ import annotations

import array
import asyncio
import base64
import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

import aiohttp
import msgspec

if TYPE_CHECKING:
    import torch

PauseMode = Literal["abort", "retract", "in_place"]
TensorPayload = Literal["safetensors", "cuda_ipc"]  # how update_weights_from_tensor carries the tensors
TENSOR_REQUEST_BYTES = 256 << 20

# Status codes that mean "try again shortly" for an idempotent read.
_RETRYABLE_STATUS = frozenset({502, 503, 504})


def _array_as_list(value: Any) -> Any:
    """Token arrays (a Trajectory's ids, e.g. a partial response to resume) go out as JSON lists."""
    if isinstance(value, array.array):
        return value.tolist()
    raise NotImplementedError(f"cannot send {type(value).__name__} as JSON")


_to_json = msgspec.json.Encoder(enc_hook=_array_as_list).encode


# ----------------------------------------------------------------- exceptions
class EngineClientError(Exception):
    """Base class: anything that went wrong talking to an engine."""


class EngineError(EngineClientError):
    """The engine answered, and the answer is a failure (HTTP 4xx/5xx or `success: false`)."""

    def __init__(self, status: int, message: str, endpoint: str):
        super().__init__(f"{endpoint} failed with HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.endpoint = endpoint


class EngineConnectionError(EngineClientError):
    """No answer: the engine is unreachable or dropped the connection."""

    def __init__(self, endpoint: str, cause: BaseException):
        super().__init__(f"{endpoint}: cannot reach engine: {cause}")
        self.endpoint = endpoint


class EngineTimeoutError(EngineClientError):
    """The engine did not answer within the call's timeout."""

    def __init__(self, endpoint: str, timeout_s: float | None):
        super().__init__(f"{endpoint}: no answer within {timeout_s} s")
        self.endpoint = endpoint
        self.timeout_s = timeout_s


class EngineProtocolError(EngineClientError):
    """The engine answered 2xx with a body this client cannot read."""


class InvalidRequest(ValueError):
    """A request the client refuses to send. SGLang does not check these and ends (a token id
    outside the vocabulary is a CUDA device-side assert; an update for a group it never joined is an
    assertion in its scheduler), so a bug in a generate function must fail here, loudly, instead."""


# -------------------------------------------------------------------- requests
class SamplingParams(msgspec.Struct, omit_defaults=True, kw_only=True):
    """SGLang sampling parameters; unset fields are left to the engine's defaults.

    The ranges are SGLang's: a request outside them is refused by the client (InvalidRequest)."""

    max_new_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None
    top_k: int | None = None
    min_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    n: Annotated[int, msgspec.Meta(ge=1)] | None = None
    skip_special_tokens: bool | None = None
    no_stop_trim: bool | None = None


# ------------------------------------------------------------------- responses
class FinishReason(msgspec.Struct, kw_only=True):
    """`type` is "length", "stop" or "abort"; the other fields depend on it."""

    type: str
    length: int | None = None
    matched: int | str | None = None
    message: str | None = None


class _WireMetaInfo(msgspec.Struct, kw_only=True):
    id: str = ""
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    output_token_logprobs: list[tuple[float | None, int, str | None]] | None = None
    input_token_logprobs: list[tuple[float | None, int, str | None]] | None = None
    weight_version: str | int | None = None
    output_token_weight_versions: list[str | int] | None = None
    e2e_latency: float | None = None


class _WireGenerate(msgspec.Struct, kw_only=True):
    text: str = ""
    output_ids: list[int] = []
    meta_info: _WireMetaInfo


class GenerateResult(msgspec.Struct, kw_only=True):
    """One generated response. Lists indexed by output position are parallel.

    `output_logprobs[i]` / `output_token_weight_versions[i]` belong to
    `output_ids[i]`; logprobs are empty unless `return_logprob` was asked.
    `finish_reason` is None only for a streaming chunk that is not the last.
    """

    rid: str
    text: str
    output_ids: list[int]
    output_logprobs: list[float]
    output_token_weight_versions: list[str]
    weight_version: str
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    e2e_latency: float | None = None

    @property
    def finish_type(self) -> str | None:
        return None if self.finish_reason is None else self.finish_reason.type

    @property
    def aborted(self) -> bool:
        return self.finish_type == "abort"

    def token_versions(self) -> list[int]:
        """Per-token policy versions as trainer ints (async-rl always sets numeric versions)."""
        try:
            return [int(version) for version in self.output_token_weight_versions]
        except ValueError as exc:
            raise EngineProtocolError(
                f"request {self.rid}: weight versions {sorted(set(self.output_token_weight_versions))} "
                "are not integers; start engines with a numeric --weight-version"
            ) from exc


class ModelInfo(msgspec.Struct, kw_only=True):
    model_path: str
    tokenizer_path: str | None = None
    is_generation: bool = True
    weight_version: str | int | None = None


class _SuccessReply(msgspec.Struct, kw_only=True):
    success: bool
    message: str = ""


class _WeightVersionReply(msgspec.Struct, kw_only=True):
    weight_version: str | int | None


def _as_version_number(version: str | int | None) -> int | None:
    try:
        return None if version is None else int(version)
    except ValueError:
        return None


def _token_versions(meta: _WireMetaInfo, count: int, floor: int | None) -> list[str]:
    """Each output token's policy version, never newer than the weights that produced it.

    An engine that tags tokens (the embedded engine's `output_token_weight_versions`) is exact.
    SGLang reports one `weight_version`: the engine's version when the response was sent, an upper
    bound. `floor` is a lower bound: a version the engine had already reached before the request
    was sent. Equal bounds are exact; otherwise an update happened while the request ran, and which
    tokens came before it is unknown, so every token gets the oldest possible version, the floor.
    """
    if meta.output_token_weight_versions is not None:
        return [str(v) for v in meta.output_token_weight_versions]
    final = "" if meta.weight_version is None else str(meta.weight_version)
    upper = _as_version_number(meta.weight_version)
    if floor is None or upper is None:
        return [final] * count
    return [str(min(floor, upper))] * count


def _result_from_wire(wire: _WireGenerate, floor: int | None) -> GenerateResult:
    meta = wire.meta_info
    logprob_triples = meta.output_token_logprobs or []
    return GenerateResult(
        rid=meta.id,
        text=wire.text,
        output_ids=list(wire.output_ids),
        output_logprobs=[math.nan if lp is None else lp for lp, _, _ in logprob_triples],
        output_token_weight_versions=_token_versions(meta, len(wire.output_ids), floor),
        weight_version="" if meta.weight_version is None else str(meta.weight_version),
        finish_reason=meta.finish_reason,
        prompt_tokens=meta.prompt_tokens,
        completion_tokens=meta.completion_tokens,
        cached_tokens=meta.cached_tokens,
        e2e_latency=meta.e2e_latency,
    )


class _StreamAccumulator:
    """Turns SSE chunks into cumulative results whether the server streams deltas or totals.

    SGLang sends cumulative lists by default and deltas with `--stream-output`
    (and builds differ per field); `completion_tokens` is always the running
    total, so a list of that length is cumulative and anything shorter a delta.
    Lists never grow past that total: the last chunk of a request aborted in
    SGLang's waiting queue repeats its last token id (measured, 0.5.17).
    """

    def __init__(self) -> None:
        self.current: GenerateResult | None = None

    def add(self, chunk: GenerateResult) -> GenerateResult:
        previous = self.current
        if previous is not None:
            total = chunk.completion_tokens

            def merged(before: list, new: list) -> list:
                return new if len(new) == total else (before + new)[:total]

            chunk = msgspec.structs.replace(
                chunk,
                text=chunk.text if len(chunk.output_ids) == total else previous.text + chunk.text,
                output_ids=merged(previous.output_ids, chunk.output_ids),
                output_logprobs=merged(previous.output_logprobs, chunk.output_logprobs),
                output_token_weight_versions=merged(
                    previous.output_token_weight_versions, chunk.output_token_weight_versions
                ),
            )
        self.current = chunk
        return chunk


def _error_message(body: bytes) -> str:
    """The server's own words, whichever of SGLang's error shapes it used."""
    try:
        payload = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body.decode("utf-8", "replace").strip()[:2000] or "(empty body)"
    if isinstance(payload, dict):
        for key in ("message", "error", "detail"):
            value = payload.get(key)
            if isinstance(value, dict) and "message" in value:
                value = value["message"]
            if value:
                return value if isinstance(value, str) else msgspec.json.encode(value).decode()
    return _to_json(payload).decode()[:2000]


def _check_sampling_params(params: SamplingParams | Mapping[str, Any] | None) -> None:
    """Types and SGLang's ranges, before sending: SGLang answers a wrongly typed value with a 500."""
    if params is None:
        return
    try:
        msgspec.convert(
            msgspec.to_builtins(params) if isinstance(params, SamplingParams) else dict(params), SamplingParams
        )
    except (msgspec.ValidationError, TypeError) as exc:
        raise InvalidRequest(f"sampling_params: {exc}") from None


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def serialize_cuda_ipc(named_tensors: Mapping[str, torch.Tensor]) -> str:
    """base64 of SGLang's MultiprocessingSerializer payload for load_format None: a ForkingPickler dump
    of [(name, tensor)], where torch's reductions turn each CUDA tensor into an IPC handle of its
    memory (no tensor data). This is the one pickle the project writes, because it is SGLang's wire
    format for that handle; it never unpickles anything."""
    import io
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers torch's CUDA IPC reductions with ForkingPickler)

    not_cuda = [name for name, tensor in named_tensors.items() if not tensor.is_cuda]
    if not_cuda:
        raise InvalidRequest(f"CUDA IPC sends CUDA tensors only; not on a GPU: {not_cuda[:3]}")
    buffer = io.BytesIO()
    ForkingPickler(buffer).dump([(name, tensor.detach()) for name, tensor in named_tensors.items()])
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def serialize_named_tensors(named_tensors: Mapping[str, torch.Tensor]) -> str:
    """base64(safetensors) — the agreed pickle-free replacement for SGLang's pickled tensors."""
    from safetensors.torch import save

    cpu_tensors: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in named_tensors.items():
        cpu = tensor.detach().to("cpu").contiguous()
        storage = cpu.untyped_storage().data_ptr()
        # safetensors refuses tensors that share memory (e.g. tied embeddings).
        cpu_tensors[name] = cpu.clone() if storage in seen_storages else cpu
        seen_storages.add(storage)
    return base64.b64encode(save(cpu_tensors)).decode("ascii")


# ---------------------------------------------------------------------- client
class EngineClient:
    """One engine's RL API. Use as `async with EngineClient(url, api_key=...) as engine:`.

    Every call takes an optional `timeout_s`; None there means the client's default:
    `timeout_s` for generation, control and weight calls (None: no limit) and
    `read_timeout_s` for GET reads. Only the reads (info, health) are retried, with
    exponential backoff, on connection errors, timeouts and 502/503/504: they are
    idempotent, whereas a repeated generate or weight update is not.

    The client keeps a lower bound on the engine's weight version, learnt from every answer that
    carries one, from its own successful updates and from `note_version` (the trainer's notices);
    it makes per-token versions exact or older, never newer, on engines that report one version
    per response (SGLang).
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout_s: float | None = 600.0,
        read_timeout_s: float = 30.0,
        read_retries: int = 3,
        retry_backoff_s: float = 0.2,
        max_connections: int = 0,
        vocab_size: int | None = None,
    ):
        self.url = url.rstrip("/")
        self.vocab_size = vocab_size  # when known, token ids are checked against it before sending
        self.timeout_s = timeout_s
        self.read_timeout_s = read_timeout_s
        self.read_retries = read_retries
        self.retry_backoff_s = retry_backoff_s
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        # The newest weight version the engine is known to have reached (see _token_versions).
        self._version_floor: int | None = None
        self._groups: set[str] = set()  # weight-update groups this client opened on the engine

    async def __aenter__(self) -> EngineClient:
        self._ensure_session()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    # ------------------------------------------------------------- transport
    async def _request(self, method: str, endpoint: str, payload: Any = None, *, timeout_s: float | None) -> bytes:
        """Send once; return the body of a 2xx answer, raise a typed error otherwise."""
        session = self._ensure_session()
        data = None if payload is None else _to_json(payload)
        try:
            async with asyncio.timeout(timeout_s):
                async with session.request(method, self.url + endpoint, data=data) as response:
                    body = await response.read()
        except TimeoutError as exc:
            raise EngineTimeoutError(endpoint, timeout_s) from exc
        except aiohttp.ClientError as exc:
            raise EngineConnectionError(endpoint, exc) from exc
        if response.status >= 400:
            raise EngineError(response.status, _error_message(body), endpoint)
        return body

    async def _read(self, endpoint: str, timeout_s: float | None) -> bytes:
        """GET with retries: safe because reads change nothing on the engine."""
        timeout = self.read_timeout_s if timeout_s is None else timeout_s
        attempt = 0
        while True:
            try:
                return await self._request("GET", endpoint, timeout_s=timeout)
            except (EngineConnectionError, EngineTimeoutError, EngineError) as exc:
                refused = isinstance(exc, EngineError) and exc.status not in _RETRYABLE_STATUS
                if refused or attempt >= self.read_retries:
                    raise
            await asyncio.sleep(self.retry_backoff_s * 2**attempt)
            attempt += 1

    async def _post(self, endpoint: str, payload: Any = None, timeout_s: float | None = None) -> bytes:
        return await self._request(
            "POST",
            endpoint,
            {} if payload is None else payload,
            timeout_s=self.timeout_s if timeout_s is None else timeout_s,
        )

    async def _post_expect_success(self, endpoint: str, payload: dict[str, Any], timeout_s: float | None) -> str:
        """For SGLang's `{"success", "message"}` replies: a `success: false` is an error too."""
        body = await self._post(endpoint, payload, timeout_s)
        reply = _decode(body, _SuccessReply, endpoint)
        if not reply.success:
            raise EngineError(200, reply.message, endpoint)
        return reply.message

    def _check_token_ids(self, input_ids: Sequence[int] | Sequence[Sequence[int]]) -> None:
        rows: Sequence[Sequence[int]]
        if len(input_ids) and not isinstance(input_ids[0], int):
            rows = cast(Sequence[Sequence[int]], input_ids)  # a batch of rows
        else:
            rows = [cast(Sequence[int], input_ids)]
        for index, row in enumerate(rows):
            bad = next(
                (
                    t
                    for t in row
                    if type(t) is not int or t < 0 or (self.vocab_size is not None and t >= self.vocab_size)
                ),
                None,
            )
            if bad is not None:
                vocabulary = f"[0, {self.vocab_size})" if self.vocab_size is not None else "the vocabulary"
                raise InvalidRequest(f"input {index} has token id {bad!r} outside {vocabulary}")

    # ------------------------------------------------------------- versions
    def note_version(self, version: str | int | None) -> None:
        """The engine is known to serve `version` or newer (versions only grow)."""
        number = _as_version_number(version)
        if number is not None and (self._version_floor is None or number > self._version_floor):
            self._version_floor = number

    async def _floor_before_request(self) -> int | None:
        """The lower bound a request's tokens get; read from the engine once if nothing is known yet."""
        if self._version_floor is None:
            with contextlib.suppress(EngineClientError):  # the generate that follows reports the failure
                await self.get_weight_version()
        return self._version_floor

    def _result(self, wire: _WireGenerate, floor: int | None) -> GenerateResult:
        result = _result_from_wire(wire, floor)
        self.note_version(result.weight_version)
        return result

    # -------------------------------------------------------------- generate
    def _generate_payload(
        self,
        input_ids: Sequence[int] | Sequence[Sequence[int]] | None,
        text: str | Sequence[str] | None,
        sampling_params: SamplingParams | Mapping[str, Any] | None,
        return_logprob: bool,
        rid: str | Sequence[str] | None,
        stream: bool,
        extra: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        if (input_ids is None) == (text is None):
            raise ValueError("give exactly one of input_ids or text")
        if input_ids is not None:
            self._check_token_ids(input_ids)
        for params in sampling_params if isinstance(sampling_params, list) else [sampling_params]:
            _check_sampling_params(params)
        payload: dict[str, Any] = {"return_logprob": return_logprob, "stream": stream}
        if input_ids is not None:
            payload["input_ids"] = input_ids
        else:
            payload["text"] = text
        if sampling_params is not None:
            payload["sampling_params"] = sampling_params
        if rid is not None:
            payload["rid"] = rid
        payload.update(extra or {})
        return payload

    async def generate(
        self,
        input_ids: Sequence[int] | None = None,
        *,
        text: str | None = None,
        sampling_params: SamplingParams | Mapping[str, Any] | None = None,
        return_logprob: bool = True,
        rid: str | None = None,
        extra: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> GenerateResult:
        """One prompt, one response (for n > 1 or many prompts use `generate_batch`).

        An aborted request (abort_request, pause in abort mode) is not an error:
        it returns its partial output with `finish_reason.type == "abort"`.
        """
        payload = self._generate_payload(input_ids, text, sampling_params, return_logprob, rid, False, extra)
        floor = await self._floor_before_request()
        body = await self._post("/generate", payload, timeout_s)
        return self._result(_decode(body, _WireGenerate, "/generate"), floor)

    async def prompt_logprobs(self, input_ids: Sequence[int], timeout_s: float | None = None) -> list[float]:
        """log p(token i | tokens < i) for i = 1 .. len - 1 under the engine's weights: what a trainer
        recomputes for the same tokens (one token is generated, as SGLang needs, and ignored)."""
        extra = {"logprob_start_len": 0}
        payload = self._generate_payload(input_ids, None, {"max_new_tokens": 1}, True, None, False, extra)
        meta = _decode(await self._post("/generate", payload, timeout_s), _WireGenerate, "/generate").meta_info
        triples = meta.input_token_logprobs or []
        if len(triples) != len(input_ids) or any(logprob is None for logprob, _, _ in triples[1:]):
            raise EngineProtocolError(f"/generate gave {len(triples)} input logprobs for {len(input_ids)} tokens")
        return [float(logprob) for logprob, _, _ in triples[1:]]

    async def generate_batch(
        self,
        input_ids: Sequence[Sequence[int]] | None = None,
        *,
        text: Sequence[str] | None = None,
        sampling_params: SamplingParams | Mapping[str, Any] | None = None,
        return_logprob: bool = True,
        rid: Sequence[str] | None = None,
        extra: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> list[GenerateResult]:
        """Many prompts in one request; results in input order (n per prompt when n > 1)."""
        payload = self._generate_payload(input_ids, text, sampling_params, return_logprob, rid, False, extra)
        floor = await self._floor_before_request()
        body = await self._post("/generate", payload, timeout_s)
        wire = _decode(body, list[_WireGenerate] | _WireGenerate, "/generate")
        return [self._result(item, floor) for item in (wire if isinstance(wire, list) else [wire])]

    async def generate_stream(
        self,
        input_ids: Sequence[int] | None = None,
        *,
        text: str | None = None,
        sampling_params: SamplingParams | Mapping[str, Any] | None = None,
        return_logprob: bool = True,
        rid: str | None = None,
        extra: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> AsyncIterator[GenerateResult]:
        """Yield the response so far after each server-sent event (always cumulative,
        see `_StreamAccumulator`); the last one carries the finish reason.
        One prompt with n == 1; `timeout_s` bounds the whole stream."""
        payload = self._generate_payload(input_ids, text, sampling_params, return_logprob, rid, True, extra)
        floor = await self._floor_before_request()
        timeout = self.timeout_s if timeout_s is None else timeout_s
        session = self._ensure_session()
        accumulator = _StreamAccumulator()
        # aiohttp's own timeout, not asyncio.timeout: it must not fire in the
        # consumer's code between two yields.
        request_timeout = aiohttp.ClientTimeout(total=timeout)
        try:
            async with session.post(
                self.url + "/generate", data=_to_json(payload), timeout=request_timeout
            ) as response:
                if response.status >= 400:
                    raise EngineError(response.status, _error_message(await response.read()), "/generate")
                async for raw_line in response.content:
                    line = raw_line.strip()
                    if not line.startswith(b"data:"):
                        continue  # blank separators, SSE comments, keep-alives
                    data = line[len(b"data:") :].strip()
                    if data == b"[DONE]":
                        return
                    yield accumulator.add(self._result(_decode_stream_chunk(data), floor))
        except TimeoutError as exc:
            raise EngineTimeoutError("/generate", timeout) from exc
        except aiohttp.ClientError as exc:
            raise EngineConnectionError("/generate", exc) from exc

    # ---------------------------------------------------------- scheduling
    async def pause_generation(self, mode: PauseMode = "abort", *, timeout_s: float | None = None) -> None:
        await self._post("/pause_generation", {"mode": mode}, timeout_s)

    async def pause(self, mode: PauseMode, *, timeout_s: float | None = None) -> None:
        """Stop generation for a weight update or a retraction, in SGLang's pause modes.

        Abort is sent as pause(retract) + abort_request(abort_all): the same outcome (every running
        and waiting request returns its partial output, new ones wait for continue), but SGLang's own
        abort-mode pause polls for in-flight requests with a one-second sleep, which every weight sync
        of an asynchronous run would pay.
        """
        if mode == "abort":
            await self.pause_generation("retract", timeout_s=timeout_s)
            await self.abort_request(abort_all=True, timeout_s=timeout_s)
        else:
            await self.pause_generation(mode, timeout_s=timeout_s)

    async def continue_generation(self, *, timeout_s: float | None = None) -> None:
        await self._post("/continue_generation", {}, timeout_s)

    async def abort_request(
        self, rid: str | None = None, *, abort_all: bool = False, timeout_s: float | None = None
    ) -> None:
        """Abort one request by rid, or all of them; aborted generates return their partial output."""
        if (rid is None) == (not abort_all):
            raise ValueError("give either rid or abort_all=True")
        payload = {"abort_all": True} if abort_all else {"rid": rid}
        await self._post("/abort_request", payload, timeout_s)

    async def flush_cache(self, *, timeout_s: float | None = None) -> None:
        """Drop the prefix/KV cache; the engine refuses (EngineError) while requests run."""
        await self._post("/flush_cache", None, timeout_s)

    # ------------------------------------------------------------- weights
    async def _update(
        self, endpoint: str, payload: dict[str, Any], weight_version: str | int | None, timeout_s: float | None
    ) -> str:
        if weight_version is not None:
            payload["weight_version"] = str(weight_version)
        message = await self._post_expect_success(endpoint, payload, timeout_s)
        self.note_version(weight_version)
        return message

    async def update_weights_from_disk(
        self,
        model_path: str,
        *,
        load_format: str | None = None,
        abort_all_requests: bool = False,
        weight_version: str | int | None = None,
        flush_cache: bool = True,
        timeout_s: float | None = None,
    ) -> str:
        """`flush_cache=False` is required while requests are paused in place (SGLang asserts the flush)."""
        payload: dict[str, Any] = {
            "model_path": model_path,
            "abort_all_requests": abort_all_requests,
            "flush_cache": flush_cache,
        }
        if load_format is not None:
            payload["load_format"] = load_format
        return await self._update("/update_weights_from_disk", payload, weight_version, timeout_s)

    async def update_weights_from_tensor(
        self,
        named_tensors: Mapping[str, torch.Tensor],
        *,
        payload: TensorPayload = "safetensors",
        flush_cache: bool = True,
        weight_version: str | int | None = None,
        timeout_s: float | None = None,
    ) -> str:
        """safetensors (the embedded engine): tensors in request bodies as base64 safetensors, at most
        TENSOR_REQUEST_BYTES of tensor data per request (a body has a size limit; base64 adds a
        third); the version and the flush come with the last request, once every tensor is in.
        cuda_ipc (SGLang on the caller's GPU): one request with CUDA IPC handles of the tensors (its
        MultiprocessingSerializer payload); SGLang copies from them on the GPU, no byte crosses the
        host. The tensors must be complete on the device and unchanged and alive until this returns."""
        if payload == "cuda_ipc":
            serialized = await asyncio.to_thread(serialize_cuda_ipc, named_tensors)
            body: dict[str, Any] = {"serialized_named_tensors": [serialized], "flush_cache": flush_cache}
            return await self._update("/update_weights_from_tensor", body, weight_version, timeout_s)
        buckets: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, tensor in named_tensors.items():
            nbytes = tensor.numel() * tensor.element_size()
            if buckets[-1] and size + nbytes > TENSOR_REQUEST_BYTES:
                buckets.append({})
                size = 0
            buckets[-1][name] = tensor
            size += nbytes
        message = ""
        for i, bucket in enumerate(buckets):
            last = i == len(buckets) - 1
            serialized = await asyncio.to_thread(serialize_named_tensors, bucket)
            body = {
                "serialized_named_tensors": [serialized],
                "load_format": "safetensors",
                "flush_cache": flush_cache and last,
            }
            message = await self._update(
                "/update_weights_from_tensor", body, weight_version if last else None, timeout_s
            )
        return message

    async def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        *,
        rank_offset: int,
        world_size: int,
        group_name: str = "weight_update_group",
        backend: str = "nccl",
        timeout_s: float | None = None,
    ) -> str:
        """Returns once the engine joined the group, so the trainer (rank 0) must join concurrently."""
        payload = {
            "master_address": master_address,
            "master_port": master_port,
            "rank_offset": rank_offset,
            "world_size": world_size,
            "group_name": group_name,
            "backend": backend,
        }
        message = await self._post_expect_success("/init_weights_update_group", payload, timeout_s)
        self._groups.add(group_name)
        return message

    async def update_weights_from_distributed(
        self,
        names: Sequence[str],
        dtypes: Sequence[torch.dtype | str],
        shapes: Sequence[Sequence[int]],
        *,
        group_name: str = "weight_update_group",
        flush_cache: bool = True,
        weight_version: str | int | None = None,
        load_format: Literal["flattened_bucket"] | None = None,
        timeout_s: float | None = None,
    ) -> str:
        """Returns once the engine received every tensor: the trainer broadcasts them (in `names`
        order, from rank 0; with load_format flattened_bucket as one buffer, dist_group.broadcast_flattened)
        while this call is in flight."""
        if not len(names) == len(dtypes) == len(shapes):
            raise ValueError("names, dtypes and shapes must have the same length")
        if group_name not in self._groups:
            raise InvalidRequest(
                f"no weight-update group {group_name!r} was opened through this client "
                "(init_weights_update_group first)"
            )
        payload: dict[str, Any] = {
            "names": list(names),
            "dtypes": [_dtype_name(dtype) for dtype in dtypes],
            "shapes": [list(shape) for shape in shapes],
            "group_name": group_name,
            "flush_cache": flush_cache,
        }
        if load_format is not None:
            payload["load_format"] = load_format
        return await self._update("/update_weights_from_distributed", payload, weight_version, timeout_s)

    async def destroy_weights_update_group(
        self, group_name: str = "weight_update_group", *, timeout_s: float | None = None
    ) -> str:
        self._groups.discard(group_name)
        return await self._post_expect_success("/destroy_weights_update_group", {"group_name": group_name}, timeout_s)

    # -------------------------------------------------------------- memory
    async def release_memory_occupation(
        self, tags: Sequence[str] | None = None, *, timeout_s: float | None = None
    ) -> None:
        await self._post("/release_memory_occupation", {} if tags is None else {"tags": list(tags)}, timeout_s)

    async def resume_memory_occupation(
        self, tags: Sequence[str] | None = None, *, timeout_s: float | None = None
    ) -> None:
        await self._post("/resume_memory_occupation", {} if tags is None else {"tags": list(tags)}, timeout_s)

    # --------------------------------------------------------------- reads
    async def _read_first(self, endpoints: tuple[str, ...], timeout_s: float | None) -> tuple[bytes, str]:
        """The first of `endpoints` the server has (404 moves on): SGLang renames endpoints across releases."""
        for endpoint in endpoints[:-1]:
            try:
                return await self._read(endpoint, timeout_s), endpoint
            except EngineError as exc:
                if exc.status != 404:
                    raise
        return await self._read(endpoints[-1], timeout_s), endpoints[-1]

    async def get_model_info(self, *, timeout_s: float | None = None) -> ModelInfo:
        body, endpoint = await self._read_first(("/model_info", "/get_model_info"), timeout_s)
        info = _decode(body, ModelInfo, endpoint)
        self.note_version(info.weight_version)
        return info

    async def get_server_info(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        """Server args and state; their keys differ between engines, hence a plain dict."""
        body, endpoint = await self._read_first(("/server_info", "/get_server_info"), timeout_s)
        return _decode(body, dict[str, Any], endpoint)

    async def get_weight_version(self, *, timeout_s: float | None = None) -> str:
        """From /model_info (SGLang 0.5.17 answers 404 on /get_weight_version); older servers' own endpoint else."""
        info = await self.get_model_info(timeout_s=timeout_s)
        if info.weight_version is not None:
            return str(info.weight_version)
        reply = _decode(await self._read("/get_weight_version", timeout_s), _WeightVersionReply, "/get_weight_version")
        self.note_version(reply.weight_version)
        return "" if reply.weight_version is None else str(reply.weight_version)

    async def health(self, *, timeout_s: float | None = None) -> None:
        """Raises unless the engine answers 200."""
        await self._read("/health", timeout_s)

    async def health_generate(self, *, timeout_s: float | None = None) -> None:
        """Raises unless the engine can actually generate a token."""
        await self._read("/health_generate", timeout_s)

    async def is_healthy(self, *, timeout_s: float = 5.0) -> bool:
        """One /health probe, no retries: for polling loops."""
        try:
            await self._request("GET", "/health", timeout_s=timeout_s)
        except EngineClientError:
            return False
        return True


async def wait_until_healthy(
    clients: Sequence[EngineClient],
    timeout_s: float,
    poll_interval_s: float = 0.2,
    before_each: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Until every engine answers /health. Components start beside their engines and wait here,
    so their own start-up overlaps the engines'; EngineTimeoutError names the ones still silent.
    `before_each` runs before every round of probes (it may replace clients in the list: an engine
    that moved)."""
    deadline = time.monotonic() + timeout_s
    pending = list(range(len(clients)))
    while True:
        if before_each is not None:
            await before_each()
        healthy = await asyncio.gather(*(clients[i].is_healthy(timeout_s=2.0) for i in pending))
        pending = [i for i, ok in zip(pending, healthy) if not ok]
        if not pending:
            return
        if time.monotonic() >= deadline:
            raise EngineTimeoutError(f"/health of {', '.join(clients[i].url for i in pending)}", timeout_s)
        await asyncio.sleep(poll_interval_s)


def _decode(body: bytes, type_: Any, endpoint: str) -> Any:
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        raise EngineProtocolError(f"{endpoint}: unexpected response shape: {exc}: {body[:500]!r}") from exc
    except msgspec.DecodeError as exc:
        raise EngineProtocolError(f"{endpoint}: response is not JSON: {exc}: {body[:500]!r}") from exc


def _decode_stream_chunk(data: bytes) -> _WireGenerate:
    """SGLang reports a failure inside a stream as `data: {"error": ...}` after the 200 header."""
    try:
        return _decode(data, _WireGenerate, "/generate")
    except EngineProtocolError as protocol_error:
        try:
            payload = msgspec.json.decode(data)
        except msgspec.DecodeError:
            payload = None
        if isinstance(payload, dict) and "error" in payload:
            raise EngineError(200, _error_message(data), "/generate") from None
        raise protocol_error
