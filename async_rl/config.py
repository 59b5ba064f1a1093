"""A run's configuration: one TOML recipe decoded into typed, validated Structs.

Every recipe table is a msgspec Struct (`*Section`), so a typo or a wrong type
fails at startup with the key's path instead of as a strange error mid-run.
Components take their own section (or build their own config from it); the
loss table is the trainer's own `staleness.config.LossConfig`, reused as is.

    cfg = load_config("tiny", overrides=["trainer.lr=3e-3", "staleness.eta=2"])

"module:function" strings (task generator, generate and reward functions) are
only checked for shape here and imported where they run (`import_function`),
so loading a config never imports torch or user code.
"""

from __future__ import annotations

import importlib
import re
import tomllib
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import msgspec

# check_field raises "field=value must be rule"; the loader prefixes the section path.
from staleness.config import LossConfig, check_field

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
_FUNCTION_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class ConfigError(ValueError):
    """A recipe or override that cannot run; the message names the key path."""


def _check_device(device: str | None) -> None:
    check_field(device is None or bool(re.match(r"^(auto|cpu|cuda(:\d+)?)$", device)), "device", device,
                "auto, cpu, cuda or cuda:N")


def _check_function_spec(field: str, spec: str | None) -> None:
    check_field(spec is None or bool(_FUNCTION_SPEC.match(spec)), field, spec, 'of the form "package.module:function"')


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ModelSection(_Section):
    """[model] The policy every engine serves and the trainer optimises.

    spec: a local Hugging Face folder, or `tiny:llama` / `tiny:qwen2` (random-init
    char-level model, built once into the model cache) or `smollm2` (the bundled
    SmolLM2-135M-Instruct GGUF, dequantized). Hub ids are not fetched.
    dtype: weights/compute dtype for engines and trainer forward passes.
    device: auto (cuda if present, else cpu) | cpu | cuda | cuda:N; the default for
    engine.device and trainer.device (e.g. engines on cuda:0, trainer on cuda:1).
    """

    spec: str = "tiny:llama"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"

    def __post_init__(self) -> None:
        check_field(bool(self.spec), "spec", self.spec, "a model folder, tiny:llama, tiny:qwen2 or smollm2")
        _check_device(self.device)


class EngineSection(_Section):
    """[engine] Rollout engines: all speak SGLang's RL HTTP API.

    kind: embedded (this package's CPU/GPU engine) | sglang (real SGLang server).
    count: engine processes; workers spread requests over all of them.
    extra_args: appended verbatim to each engine's command line.
    api_key: engines require `Authorization: Bearer KEY`; None = open (loopback only).
    max_running_requests: per-engine concurrency cap (SGLang's flag of the same name).
    device: the engines' device; None = model.device. For SGLang a cuda:N becomes --base-gpu-id N
    (None: SGLang's own default, GPU 0).
    start_timeout_s: how long an engine may take to answer /health after it starts (SGLang
    compiles kernels on its first start); every component that needs the engines waits this long.
    """

    kind: Literal["embedded", "sglang"] = "embedded"
    count: int = 1
    extra_args: list[str] = []
    api_key: str | None = None
    host: str = "127.0.0.1"
    max_running_requests: int = 256
    device: str | None = None
    start_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        _check_device(self.device)
        check_field(self.count >= 1, "count", self.count, ">= 1")
        check_field(self.start_timeout_s > 0, "start_timeout_s", self.start_timeout_s, "> 0")
        check_field(self.max_running_requests >= 1, "max_running_requests", self.max_running_requests, ">= 1")


class RolloutSection(_Section):
    """[rollout] How each prompt becomes a scored group of responses.

    workers: rollout worker processes. group_size: responses per prompt (the GRPO group).
    generate: "module:function" turning one prompt into a trajectory (single-turn by default;
    multi-turn/tool functions plug in here). reward: "module:function" with signature
    `(prompt, response, metadata) -> float` (or async); see recipes.rewards.
    chat_template: wrap each prompt as a user turn with the tokenizer's chat template
    (instruct models); off for the tiny char-level model, which has none.
    reward_timeout_s: a reward slower than this scores 0.0 with an error recorded.
    """

    workers: int = 1
    group_size: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    chat_template: bool = False
    generate: str = "rollout_workers.generate:single_turn"
    reward: str = "recipes.rewards:exact_match"
    reward_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        check_field(self.workers >= 1, "workers", self.workers, ">= 1")
        check_field(self.group_size >= 1, "group_size", self.group_size, ">= 1")
        check_field(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, ">= 1")
        check_field(self.temperature >= 0, "temperature", self.temperature, ">= 0")
        check_field(0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        check_field(self.reward_timeout_s > 0, "reward_timeout_s", self.reward_timeout_s, "> 0")
        _check_function_spec("generate", self.generate)
        _check_function_spec("reward", self.reward)


class TaskSection(_Section):
    """[task] Where prompts come from: exactly one of a generator or a dataset.

    generator: "module:function" called as `f(seed=seed, **kwargs)`, returning an
    iterator of recipes.tasks.TaskSample (e.g. "recipes.tasks:digit_task").
    dataset: a local .jsonl or .parquet file; rows give `prompt_field` and `answer_field`
    (bad rows are reported and skipped). seed: makes the prompt order reproducible.
    """

    generator: str | None = None
    kwargs: dict[str, Any] = {}
    dataset: str | None = None
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.generator is None) == (self.dataset is None):
            raise ValueError("set exactly one of generator or dataset")
        _check_function_spec("generator", self.generator)


class TrainerSection(_Section):
    """[trainer] The optimiser loop (fields share names with async_rl.trainer's TrainerConfig).

    groups_per_step: GRPO groups per optimizer step (batch = groups_per_step * rollout.group_size
    samples). max_tokens_per_microbatch: padded tokens per forward, bounding activation memory.
    total_steps: the run ends after this many published versions. ckpt_dir: "" = <run.output_dir>/checkpoints;
    checkpoint_interval: steps between checkpoints, 0 = only at the end. device: None = model.device.
    processes: data-parallel trainer ranks (FSDP2, one per GPU: device must then be cuda, or cpu for gloo),
    launched under torchrun; rank 0 talks to the buffer and the engines.
    [trainer.loss]: objective and off-policy correction (staleness.config.LossConfig).
    """

    lr: float = 1e-6
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    groups_per_step: int = 8
    max_tokens_per_microbatch: int = 16384
    total_steps: int = 100
    seed: int = 0
    ckpt_dir: str = ""
    checkpoint_interval: int = 0
    device: str | None = None
    processes: int = 1
    loss: LossConfig = msgspec.field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        _check_device(self.device)
        check_field(self.processes >= 1, "processes", self.processes, ">= 1")
        check_field(self.processes == 1 or not (self.device or "").startswith("cuda:"), "device", self.device,
                    "cuda, cpu or auto when processes > 1 (rank r takes cuda:r)")
        check_field(self.lr >= 0, "lr", self.lr, ">= 0")
        check_field(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0")
        check_field(self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm, "> 0")
        check_field(self.groups_per_step >= 1, "groups_per_step", self.groups_per_step, ">= 1")
        check_field(self.max_tokens_per_microbatch >= 1, "max_tokens_per_microbatch", self.max_tokens_per_microbatch, ">= 1")
        check_field(self.total_steps >= 1, "total_steps", self.total_steps, ">= 1")
        check_field(self.checkpoint_interval >= 0, "checkpoint_interval", self.checkpoint_interval, ">= 0")


class StalenessSection(_Section):
    """[staleness] The off-policy bound eta: nothing staler than eta versions is trained on,
    and admission control stops generating what would break it. max_in_flight caps
    concurrent rollouts regardless (None = only the staleness budget limits)."""

    eta: int = 1
    max_in_flight: int | None = None

    def __post_init__(self) -> None:
        check_field(self.eta >= 0, "eta", self.eta, ">= 0")
        check_field(self.max_in_flight is None or self.max_in_flight >= 1, "max_in_flight", self.max_in_flight, ">= 1")


class WeightSyncSection(_Section):
    """[weight_sync] How new weights reach the engines after each step.

    method: disk (safetensors folder + update_weights_from_disk) | tensor (in-memory
    tensors, same host) | distributed (NCCL broadcast group). pause_mode: what engines do
    with running requests during the update: abort (drop, retried later), retract (keep
    partial tokens and resume after), in_place (update between decode steps, no pause).
    dir: where disk snapshots go; "" = <run.output_dir>/weights.
    """

    method: Literal["disk", "tensor", "distributed"] = "disk"
    pause_mode: Literal["abort", "retract", "in_place"] = "retract"
    dir: str = ""


class BufferSection(_Section):
    """[buffer] The replay buffer service and its write-ahead log.

    dir: WAL location; "" = <run.output_dir>/buffer. fsync: make each acknowledged
    trajectory durable before the ack (off = faster, loses the last writes on power loss).
    capacity: most trajectories held; producers wait when full.
    """

    dir: str = ""
    fsync: bool = True
    capacity: int = 100_000

    def __post_init__(self) -> None:
        check_field(self.capacity >= 1, "capacity", self.capacity, ">= 1")


class AprilSection(_Section):
    """[april] Active partial rollouts (rollout_workers/april.py): rollout rounds of
    ceil((1 + alpha) x the batch) groups; once a round's batch of complete groups is in,
    its unfinished long tail is retracted and recycled as partial rollouts (tokens,
    behavior logprobs and per-token versions kept), resumed first when the next round starts.
    pause_mode: how engines stop the tail: abort (the pause returns every request, the ones
    not retracted are continued at once), retract (requests leave the batch, KV dropped)
    or in_place (requests stay put); with retract and in_place the tail's requests are
    then aborted one by one, which returns their partial output.
    Needs a resumable rollout.generate (rollout_workers/generate.py)."""

    enabled: bool = False
    alpha: float = 0.5
    pause_mode: Literal["abort", "retract", "in_place"] = "retract"

    def __post_init__(self) -> None:
        check_field(self.alpha >= 0, "alpha", self.alpha, ">= 0")


class RunSection(_Section):
    """[run] The run as a whole.

    output_dir: logs, metrics.jsonl, TensorBoard events, buffer, weights and checkpoints.
    sync: strictly on-policy baseline (generate, then train, then sync; needs staleness.eta = 0).
    log_interval: steps between metric lines. max_wall_s: stop cleanly after this long (None = no limit).
    """

    output_dir: str = "runs/latest"
    sync: bool = False
    log_interval: int = 1
    max_wall_s: float | None = None

    def __post_init__(self) -> None:
        check_field(self.log_interval >= 1, "log_interval", self.log_interval, ">= 1")
        check_field(self.max_wall_s is None or self.max_wall_s > 0, "max_wall_s", self.max_wall_s, "> 0")


class RunConfig(_Section):
    """The whole recipe; every table is optional and defaults to its Struct's defaults,
    except [task], which a run cannot guess."""

    task: TaskSection
    model: ModelSection = msgspec.field(default_factory=ModelSection)
    engine: EngineSection = msgspec.field(default_factory=EngineSection)
    rollout: RolloutSection = msgspec.field(default_factory=RolloutSection)
    trainer: TrainerSection = msgspec.field(default_factory=TrainerSection)
    staleness: StalenessSection = msgspec.field(default_factory=StalenessSection)
    weight_sync: WeightSyncSection = msgspec.field(default_factory=WeightSyncSection)
    buffer: BufferSection = msgspec.field(default_factory=BufferSection)
    april: AprilSection = msgspec.field(default_factory=AprilSection)
    run: RunSection = msgspec.field(default_factory=RunSection)

    def __post_init__(self) -> None:
        if self.weight_sync.method == "tensor" and self.engine.kind == "sglang":
            raise ValueError("weight_sync.method = \"tensor\" cannot drive SGLang engines: SGLang decodes tensor updates "
                             "with its pickle-based MultiprocessingSerializer (any other payload ends the server), and "
                             "this project never pickles; use \"disk\" or \"distributed\"")
        if self.run.sync and self.staleness.eta != 0:
            raise ValueError(f"run.sync = true trains strictly on-policy: set staleness.eta = 0 (got {self.staleness.eta})")

    @property
    def batch_size(self) -> int:
        """Samples (trajectories) per optimizer step."""
        return self.trainer.groups_per_step * self.rollout.group_size

    def output_path(self, configured: str, default_name: str) -> Path:
        """A section's directory: as configured, or `default_name` inside run.output_dir."""
        return Path(configured) if configured else Path(self.run.output_dir) / default_name

    def to_json(self) -> bytes:
        """The fully resolved config, saved beside a run's outputs for reproducibility."""
        return msgspec.json.format(msgspec.json.encode(self), indent=2)


# ---- loading -------------------------------------------------------------------------------


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A TOML path, or the name of a bundled recipe (`tiny` -> recipes/tiny.toml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = RECIPES_DIR / f"{name_or_path}.toml"
    if bundled.is_file():
        return bundled
    available = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.toml")))
    raise ConfigError(f"no recipe file {str(name_or_path)!r} and no bundled recipe of that name (bundled: {available})")


def load_config(recipe: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a recipe (path or bundled name), apply `--set key.sub=value` overrides, validate."""
    path = resolve_recipe(recipe)
    try:
        table = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read TOML: {exc}") from None
    for assignment in overrides:
        apply_override(table, assignment)
    return parse_config(table, source=str(path))


def parse_config(table: dict[str, Any], source: str = "<config>") -> RunConfig:
    """Validate a parsed TOML table; every problem names its key path."""
    unknown = _unknown_keys(table, RunConfig, "")
    if unknown:
        raise ConfigError(f"{source}: " + "; ".join(unknown))
    try:
        return msgspec.convert(table, RunConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(str(exc))}") from None


def apply_override(table: dict[str, Any], assignment: str) -> None:
    """`trainer.lr=3e-4`: the value is read as a TOML literal (numbers, bools, strings,
    arrays, inline tables); anything that is not one is taken as a plain string."""
    key, sep, raw = assignment.partition("=")
    path = [part.strip() for part in key.split(".")]
    if not sep or not all(path):
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    try:
        value = tomllib.loads(f"value = {raw.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    node = table
    for depth, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: {'.'.join(path[: depth + 1])} is a value, not a table")
        node = child
    node[path[-1]] = value


def import_function(spec: str) -> Callable[..., Any]:
    """Resolve "package.module:function" to the callable, with an error that says which part failed."""
    if not _FUNCTION_SPEC.match(spec):
        raise ConfigError(f'{spec!r} is not of the form "package.module:function"')
    module_name, function_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{spec!r}: cannot import module {module_name!r}: {exc}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"{spec!r}: module {module_name!r} has no function {function_name!r}")
    return function


def _struct_type(annotation: Any) -> type[msgspec.Struct] | None:
    """The Struct inside `annotation` (`X` or `X | None`), if any."""
    candidates = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, msgspec.Struct):
            return candidate
    return None


def _unknown_keys(table: Any, struct: type[msgspec.Struct], prefix: str) -> list[str]:
    if not isinstance(table, dict):
        return []  # a wrong type; msgspec.convert reports it with its path
    fields = {field.encode_name: field for field in msgspec.structs.fields(struct)}
    problems = []
    for key, value in table.items():
        path = f"{prefix}{key}"
        if key not in fields:
            kind = "table" if not prefix else "key"
            where = f" in [{prefix[:-1]}]" if prefix else ""
            problems.append(f"unknown {kind} {path!r}{where}; allowed: {', '.join(fields)}")
        elif (nested := _struct_type(fields[key].type)) is not None:
            problems += _unknown_keys(value, nested, path + ".")
    return problems


def _field_annotation(path: str) -> Any:
    annotation: Any = RunConfig
    for part in path.split("."):
        struct = _struct_type(annotation)
        fields = {f.encode_name: f.type for f in msgspec.structs.fields(struct)} if struct else {}
        if part not in fields:
            return None
        annotation = fields[part]
    return annotation


def _describe(message: str) -> str:
    """msgspec's "Expected `int`, got `str` - at `$.trainer.lr`" -> "trainer.lr: expected `int`, got `str`"."""
    match = re.fullmatch(r"(?s)(.*?)(?: - at `\$\.?(.*)`)?", message)
    text, path = match.group(1), match.group(2) or ""
    if missing := re.fullmatch(r"Object missing required field `(\w+)`", text):
        return f"missing required key {'.'.join(filter(None, (path, missing.group(1))))!r}"
    if re.match(r"^\w+=", text):  # a __post_init__ check: "eta=-1 must be >= 0"
        return f"{path}.{text}" if path else text
    if text.startswith("Invalid enum value"):
        choices = typing.get_args(_field_annotation(path))
        text += f" (expected one of {', '.join(map(str, choices))})" if choices else ""
    text = text[0].lower() + text[1:]
    return f"{path}: {text}" if path else text
