"""Request bodies of SGLang's RL HTTP API, as msgspec Structs.

Decoding with these gives type errors that name the offending path, which the
server turns into 400s. Unknown fields are ignored, as SGLang ignores fields a
given build does not use, so one client drives both engines.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class SamplingParamsBody(msgspec.Struct, kw_only=True):
    """The server's reading of `sampling_params`: every field resolved to SGLang's default
    (the client's SamplingParams leaves unset fields out instead)."""

    temperature: Annotated[float, msgspec.Meta(ge=0.0)] = 1.0
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, msgspec.Meta(ge=-1)] = -1  # -1 or 0: no top-k filter
    min_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.0
    max_new_tokens: NonNegative | None = None  # None: 128, clipped to the context window
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 1
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    # Penalties change the sampling distribution; refused rather than silently ignored.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class GenerateRequest(msgspec.Struct, kw_only=True):
    text: str | list[str] | None = None
    input_ids: list[Any] | None = None  # list[int] or list[list[int]]; checked by the server
    sampling_params: SamplingParamsBody | list[SamplingParamsBody] = msgspec.field(default_factory=SamplingParamsBody)
    return_logprob: bool = False
    logprob_start_len: int = -1  # -1: no input-token logprobs
    top_logprobs_num: NonNegative = 0
    return_text_in_logprobs: bool = False
    stream: bool = False
    rid: str | list[str] | None = None


class PauseRequest(msgspec.Struct, kw_only=True):
    mode: Literal["abort", "retract", "in_place"] = "abort"


class AbortRequest(msgspec.Struct, kw_only=True):
    rid: str = ""
    abort_all: bool = False


class UpdateFromDiskRequest(msgspec.Struct, kw_only=True):
    model_path: str
    load_format: str | None = None
    abort_all_requests: bool = False
    flush_cache: bool = True
    weight_version: str | None = None


class UpdateFromTensorRequest(msgspec.Struct, kw_only=True):
    serialized_named_tensors: list[str]
    load_format: str | None = None
    flush_cache: bool = True
    weight_version: str | None = None


class InitGroupRequest(msgspec.Struct, kw_only=True):
    master_address: str
    master_port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    rank_offset: Annotated[int, msgspec.Meta(ge=1)]
    world_size: Annotated[int, msgspec.Meta(ge=2)]
    group_name: str = "weight_update_group"
    backend: str = "gloo"
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0


class UpdateFromDistributedRequest(msgspec.Struct, kw_only=True):
    names: list[str]
    dtypes: list[str]
    shapes: list[list[NonNegative]]
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    weight_version: str | None = None
    load_format: Literal["flattened_bucket"] | None = None  # None: one broadcast per tensor


class DestroyGroupRequest(msgspec.Struct, kw_only=True):
    group_name: str = "weight_update_group"


class MemoryRequest(msgspec.Struct, kw_only=True):
    tags: list[Literal["weights", "kv_cache"]] | None = None  # None: both
