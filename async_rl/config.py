"""A run's configuration: one TOML recipe decoded into typed, validated Structs.

Every table is the Struct of the component that uses it, defined once: [trainer] is
async_rl.trainer.config.TrainerConfig, [staleness] staleness.config.StalenessConfig, [buffer]
buffer.config.BufferConfig; the tables below are read by the orchestrator, the engines, the workers
and the weight sync directly. Each field has its docstring. A typo or a wrong type fails at start-up
with the key's path instead of as a strange error mid-run. Every component process reads the
resolved config.json of its run (`read_run_config`).

    config = load_config("tiny", overrides=["trainer.lr=3e-3", "staleness.eta=2"])

"module:function" strings (task generator, sample plan, generate and reward functions) are only
checked for shape here and imported where they run (`import_function`), so loading a config never
imports torch or user code.
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

from async_rl.checks import check_device, check_field
from async_rl.trainer.config import TrainerConfig
from buffer.config import BufferConfig
from staleness.config import StalenessConfig

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
_FUNCTION_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class ConfigError(ValueError):
    """A recipe or override that cannot run; the message names the key path."""


def _check_function_spec(field: str, spec: str | None) -> None:
    check_field(spec is None or bool(_FUNCTION_SPEC.match(spec)), field, spec, 'of the form "package.module:function"')


class _Table(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ModelConfig(_Table, frozen=True):
    """[model] The policy every engine serves and the trainer optimises."""

    spec: str = "tiny:llama"
    """A local Hugging Face folder, or tiny:llama / tiny:qwen2 (random-init char-level model, built once
    into the model cache), qwen2-0.5b (random init, Qwen2-0.5B's shape and 151,936-token vocabulary) or
    smollm2 (the bundled SmolLM2-135M-Instruct GGUF, dequantized). Hub ids are not fetched."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights/compute dtype of engines and trainer forward passes."""
    device: str = "auto"
    """auto (cuda if present, else cpu) | cpu | cuda | cuda:N: the default of engine.device and trainer.device."""

    def __post_init__(self) -> None:
        check_field(bool(self.spec), "spec", self.spec, "a model folder, tiny:llama, tiny:qwen2, qwen2-0.5b or smollm2")
        check_device("device", self.device)


class EngineConfig(_Table, frozen=True):
    """[engine] Rollout engines: all speak SGLang's RL HTTP API."""

    kind: Literal["embedded", "sglang"] = "embedded"
    """embedded (this package's CPU/GPU engine) | sglang (a real `python -m sglang.launch_server`)."""
    count: int = 1
    """Engine processes; workers spread requests over all of them."""
    extra_args: list[str] = []
    """Appended verbatim to each engine's command line (SGLang flags go through unchanged)."""
    api_key: str | None = None
    """Engines require `Authorization: Bearer KEY`; None = open (loopback only)."""
    host: str = "127.0.0.1"
    """Where the engines listen."""
    max_running_requests: int = 256
    """Per-engine concurrency cap (SGLang's flag of the same name)."""
    device: str | None = None
    """The engines' device; None = model.device. For SGLang a cuda:N becomes --base-gpu-id N
    (None: SGLang's own default, GPU 0)."""
    start_timeout_s: float = 300.0
    """How long an engine may take to answer /health after it starts (SGLang compiles kernels on its
    first start); every component that needs the engines waits this long."""
    health_interval_s: float = 5.0
    """How often `async-rl run` asks each engine for /health_generate (a paused engine answers at once)."""
    health_timeout_s: float = 30.0
    """The deadline of one /health_generate."""
    health_failures: int = 3
    """Missed deadlines in a row after which the engine counts as hung: it is killed and restarted
    (run.max_restarts); 0 = no health monitor."""
    trainer_logprobs: bool = False
    """Embedded engines report, for every finished sample, the logprobs the trainer computes for it
    (its own function, one sequence per forward on both sides), so that on-policy importance ratios
    are exactly 1; the tokens are still sampled from the engine's fast forward. Costs one forward per
    sample in the engine and one sequence per micro-batch in the trainer."""

    def __post_init__(self) -> None:
        check_device("device", self.device)
        check_field(self.health_interval_s > 0, "health_interval_s", self.health_interval_s, "> 0")
        check_field(self.health_timeout_s > 0, "health_timeout_s", self.health_timeout_s, "> 0")
        check_field(self.health_failures >= 0, "health_failures", self.health_failures, ">= 0")
        check_field(self.count >= 1, "count", self.count, ">= 1")
        check_field(self.max_running_requests >= 1, "max_running_requests", self.max_running_requests, ">= 1")
        check_field(self.start_timeout_s > 0, "start_timeout_s", self.start_timeout_s, "> 0")


class RolloutConfig(_Table, frozen=True):
    """[rollout] How each prompt becomes a scored group of responses.

    Two ways to generate, named explicitly: by default the worker drives every group itself, one
    batched request per engine visit, and an interrupted sample (a weight sync in abort mode, an APRIL
    retraction) is continued from its partial response; `sample_plan` may change how each sample is
    asked for (e.g. a forced length). A custom `generate` function (multi-turn, tools) takes the whole
    group instead, and an interrupted group is generated again.
    """

    workers: int = 1
    """Rollout worker processes; each owns an equal share of every batch."""
    group_size: int = 8
    """Responses per prompt: the GRPO group."""
    max_new_tokens: int = 64
    """Response budget of one sample."""
    temperature: float = 1.0
    """Sampling temperature; behaviour logprobs are those of softmax(logits / T)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    chat_template: bool = False
    """Wrap each prompt as a user turn with the tokenizer's chat template (instruct models)."""
    sample_plan: str | None = None
    """"module:function" `(sampling_params, group_size) -> one params dict per sample` for the
    worker-driven path; None = the same params for every sample (rollout_workers.generate:same_params)."""
    generate: str | None = None
    """"module:function" `async (client, prompt_ids, sampling_params, group_size) -> list[Sample]`
    that generates a whole group itself (rollout_workers/generate.py); set at most one of the two."""
    reward: str = "recipes.rewards:exact_match"
    """"module:function" `(prompt, response, metadata) -> float` (or async); see recipes/rewards.py."""
    reward_timeout_s: float = 10.0
    """A reward slower than this scores 0.0 with the error recorded."""

    def __post_init__(self) -> None:
        check_field(self.workers >= 1, "workers", self.workers, ">= 1")
        check_field(self.group_size >= 1, "group_size", self.group_size, ">= 1")
        check_field(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, ">= 1")
        check_field(self.temperature >= 0, "temperature", self.temperature, ">= 0")
        check_field(0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        check_field(self.reward_timeout_s > 0, "reward_timeout_s", self.reward_timeout_s, "> 0")
        _check_function_spec("sample_plan", self.sample_plan)
        _check_function_spec("generate", self.generate)
        _check_function_spec("reward", self.reward)
        check_field(
            self.sample_plan is None or self.generate is None,
            "generate",
            self.generate,
            "unset when sample_plan is set: a custom generate function takes the whole group",
        )


class TaskConfig(_Table, frozen=True):
    """[task] Where prompts come from: exactly one of a generator or a dataset (rollout_workers/tasks.py)."""

    generator: str | None = None
    """"module:function" called as `f(seed=seed, **kwargs)`, returning an iterator of TaskSample
    (e.g. "recipes.tasks:digit_task")."""
    kwargs: dict[str, Any] = {}
    """Keyword arguments of the generator."""
    dataset: str | None = None
    """A local .jsonl or .parquet file; bad rows are reported and skipped."""
    prompt_field: str = "prompt"
    """The dataset column holding the prompt."""
    answer_field: str = "answer"
    """The dataset column holding what the reward checks against."""
    seed: int = 0
    """Makes the prompt order reproducible (worker w uses seed + w)."""

    def __post_init__(self) -> None:
        if (self.generator is None) == (self.dataset is None):
            raise ValueError("set exactly one of generator or dataset")
        _check_function_spec("generator", self.generator)


class WeightSyncConfig(_Table, frozen=True):
    """[weight_sync] How new weights reach the engines after each step (async_rl/weight_sync.py)."""

    method: Literal["disk", "tensor", "distributed", "cuda_ipc"] = "disk"
    """disk (safetensors folder + update_weights_from_disk) | tensor (in the request body; embedded
    engines only) | distributed (a broadcast group: NCCL on GPUs, gloo on CPU) | cuda_ipc (SGLang
    engines on the trainer's GPU copy a device snapshot through CUDA IPC handles; one trainer rank)."""
    pause_mode: Literal["abort", "retract", "in_place"] = "retract"
    """What engines do with running requests during the update: abort (they return their partial output
    and are continued from it), retract (they leave the batch and resume after, KV recomputed) or
    in_place (they stay, KV kept)."""
    dir: str = ""
    """Where disk snapshots go; "" = <run.output_dir>/weights."""
    timeout_s: float = 300.0
    """Deadline of each engine call of a sync (pause, update, continue): an engine that misses it is
    named and skipped (disk, tensor: it is updated at the next sync) or fails the run (distributed)."""

    def __post_init__(self) -> None:
        check_field(self.timeout_s > 0, "timeout_s", self.timeout_s, "> 0")


class AprilConfig(_Table, frozen=True):
    """[april] Active partial rollouts (rollout_workers/april.py): rounds of ceil((1 + alpha) x the batch)
    groups; once a round's batch of complete groups is in, its unfinished long tail is retracted and
    recycled as partial rollouts (tokens, behaviour logprobs and per-token versions kept), resumed first
    when the next round starts. Needs the worker-driven path (no rollout.generate)."""

    enabled: bool = False
    """Run rollouts in APRIL rounds instead of plain asynchronous admission."""
    alpha: float = 0.5
    """Over-provisioning: a round launches (1 + alpha) x its share of the batch."""

    def __post_init__(self) -> None:
        check_field(self.alpha >= 0, "alpha", self.alpha, ">= 0")


Strategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


class ClusterConfig(_Table, frozen=True):
    """[cluster] Placement on a Ray cluster (`async-rl run RECIPE --ray-address ADDR`; unused on one
    machine). Every component becomes a Ray actor in a placement-group bundle of these resources.
    run.output_dir must be a folder every node sees at the same path (logs, metrics, the buffer's
    log and the checkpoints a component re-placed on another node restarts from); the run checks it."""

    engine_gpus: float = 0
    """GPUs per engine (0: CPU-only engines)."""
    engine_cpus: float = 1
    """CPUs per engine."""
    engines_per_node: int = 0
    """Engines packed together on each node (one STRICT_PACK group per node); 0 = all engines in one
    group placed by engine_strategy."""
    engine_strategy: Strategy = "SPREAD"
    """How the engines' bundles are placed when engines_per_node is 0 (Ray's placement strategies)."""
    trainer_gpus: float = 0
    """GPUs per trainer rank."""
    trainer_cpus: float = 1
    """CPUs per trainer rank."""
    trainer_nodes: int = 1
    """Nodes the trainer.processes ranks are spread over, the same number on each (one bundle per node,
    STRICT_SPREAD; torchrun's rendezvous on the first node); 1 = all ranks on one node."""
    service_cpus: float = 1
    """CPUs of the buffer service and of each rollout worker."""
    service_strategy: Strategy = "PACK"
    """How the buffer's and the workers' bundles are placed."""
    ready_timeout_s: float = 120.0
    """How long the placement groups may take to be placed; then the run fails naming what the cluster lacks."""

    def __post_init__(self) -> None:
        for name in ("engine_gpus", "trainer_gpus"):
            check_field(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        for name in ("engine_cpus", "trainer_cpus", "service_cpus"):  # a bundle reserves something
            check_field(getattr(self, name) > 0, name, getattr(self, name), "> 0")
        check_field(self.engines_per_node >= 0, "engines_per_node", self.engines_per_node, ">= 0")
        check_field(self.trainer_nodes >= 1, "trainer_nodes", self.trainer_nodes, ">= 1")
        check_field(self.ready_timeout_s > 0, "ready_timeout_s", self.ready_timeout_s, "> 0")

    def trainer_node_names(self) -> list[str]:
        """The trainer's processes, one per node: "trainer" (global rank 0's, the one others address) first."""
        return ["trainer", *(f"trainer_node{r}" for r in range(1, self.trainer_nodes))]


class RunOptions(_Table, frozen=True):
    """[run] The run as a whole."""

    output_dir: str = "runs/latest"
    """Logs, metrics.jsonl, TensorBoard events, buffer, weights, checkpoints and the trace."""
    sync: bool = False
    """Strictly on-policy baseline: generate, then train, then sync (needs staleness.eta = 0)."""
    log_interval: int = 1
    """Steps between metric lines."""
    max_wall_s: float | None = None
    """Stop cleanly after this long; None = no limit."""
    max_restarts: int = 3
    """Unexpected exits each component survives within restart_window_s: it is started again (an engine from the newest
    weights, the buffer from its log, the trainer from its latest checkpoint, a worker aligned to
    the trainer's version); one more ends the run with its log tail. Engines are not restarted under
    weight_sync.method = "distributed" (the broadcast group cannot take a new member)."""
    restart_backoff_s: float = 1.0
    """Wait before a component's first restart; it doubles with each further one in the window (at most 30 s)."""
    restart_window_s: float = 3600.0
    """Restarts longer ago than this no longer count against max_restarts (nor lengthen the backoff):
    a long job survives a crash a day, a component that keeps dying still ends the run."""
    wandb: Literal["off", "offline", "online"] = "off"
    """Also log every step to Weights & Biases (beside metrics.jsonl and TensorBoard); offline needs
    no network (RUN_DIR/wandb, upload later with `wandb sync`). Needs `pip install wandb`."""
    wandb_project: str = "async-rl"
    """The W&B project; the run is named after run.output_dir and resumed by every restart."""
    prometheus: bool = True
    """Serve the orchestrator's Prometheus endpoint (/metrics: per-component up and restarts, version,
    staleness, throughput, buffer depth; its address is printed at start)."""
    prometheus_port: int = 0
    """Its port; 0 = a free one."""
    prometheus_host: str = "127.0.0.1"
    """Where that endpoint binds; loopback unless a scraper elsewhere needs it."""
    watchdog_s: float = 600.0
    """No trainer step, trajectory or weight sync for this long: every component dumps its stacks
    into RUN_DIR/stacks/, the console says where each one is, and the run ends (exit code 3); 0 = off."""
    watchdog_wait: bool = False
    """After the watchdog's report, keep waiting (and report again after another watchdog_s)."""

    def __post_init__(self) -> None:
        check_field(self.log_interval >= 1, "log_interval", self.log_interval, ">= 1")
        check_field(self.max_wall_s is None or self.max_wall_s > 0, "max_wall_s", self.max_wall_s, "> 0")
        check_field(self.max_restarts >= 0, "max_restarts", self.max_restarts, ">= 0")
        check_field(self.restart_backoff_s >= 0, "restart_backoff_s", self.restart_backoff_s, ">= 0")
        check_field(0 <= self.prometheus_port < 65536, "prometheus_port", self.prometheus_port, "a TCP port or 0")
        check_field(self.restart_window_s > 0, "restart_window_s", self.restart_window_s, "> 0")
        check_field(self.watchdog_s >= 0, "watchdog_s", self.watchdog_s, ">= 0")


class RunConfig(_Table, frozen=True):
    """The whole recipe; every table is optional and defaults to its Struct's defaults,
    except [task], which a run cannot guess."""

    task: TaskConfig
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)
    rollout: RolloutConfig = msgspec.field(default_factory=RolloutConfig)
    trainer: TrainerConfig = msgspec.field(default_factory=TrainerConfig)
    staleness: StalenessConfig = msgspec.field(default_factory=StalenessConfig)
    weight_sync: WeightSyncConfig = msgspec.field(default_factory=WeightSyncConfig)
    buffer: BufferConfig = msgspec.field(default_factory=BufferConfig)
    april: AprilConfig = msgspec.field(default_factory=AprilConfig)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)
    run: RunOptions = msgspec.field(default_factory=RunOptions)

    def __post_init__(self) -> None:
        if self.weight_sync.method == "tensor" and self.engine.kind == "sglang":
            raise ValueError(
                'weight_sync.method = "tensor" cannot drive SGLang engines: SGLang decodes tensor updates '
                "with its pickle-based MultiprocessingSerializer (any other payload ends the server), and "
                'tensor sends safetensors; use "cuda_ipc" (engines on the trainer\'s GPU), "disk" or "distributed"'
            )
        if self.weight_sync.method == "cuda_ipc":
            self._check_cuda_ipc()
        if self.run.sync and self.staleness.eta != 0:
            raise ValueError(
                f"run.sync = true trains strictly on-policy: set staleness.eta = 0 (got {self.staleness.eta})"
            )
        nodes = self.cluster.trainer_nodes
        if self.trainer.processes % nodes:
            raise ValueError(
                f"trainer.processes = {self.trainer.processes} ranks cannot be spread evenly over "
                f"cluster.trainer_nodes = {nodes} nodes"
            )
        if self.engine.trainer_logprobs:
            self._check_trainer_logprobs()
        if self.april.enabled and self.rollout.generate is not None:
            raise ValueError(
                f"april.enabled retracts and resumes samples, which the worker-driven path does: unset "
                f"rollout.generate ({self.rollout.generate}) and use rollout.sample_plan"
            )

    def _check_cuda_ipc(self) -> None:
        """IPC handles name GPU memory of one trainer process (the devices: orchestrator.check_supported)."""
        if self.engine.kind != "sglang":
            raise ValueError(
                'weight_sync.method = "cuda_ipc" drives SGLang engines (the payload is its pickle-based '
                'serializer, which the embedded engine never decodes): use "tensor" or "disk" for embedded engines'
            )
        if self.trainer.processes != 1 or self.cluster.trainer_nodes != 1:
            raise ValueError(
                f'weight_sync.method = "cuda_ipc" needs one trainer process holding the whole model '
                f"(trainer.processes = {self.trainer.processes}); use disk or distributed"
            )

    def _check_trainer_logprobs(self) -> None:
        """Only where the engine can run the trainer's exact numerics."""
        if self.engine.kind != "embedded":
            raise ValueError("engine.trainer_logprobs needs embedded engines (SGLang computes logprobs its own way)")
        if self.trainer.backend != "torch":
            raise ValueError('engine.trainer_logprobs needs trainer.backend = "torch" (the HF forward the engine has)')
        if self.model.dtype != "float32" and self.trainer.processes == 1:
            raise ValueError(
                f"engine.trainer_logprobs with model.dtype = {self.model.dtype!r} needs trainer.processes >= 2: one "
                "trainer process computes in autocast over float32 master weights, which the engine does not hold "
                "(FSDP's mixed precision computes with the same low-precision weights the engines get)"
            )

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


def read_run_config(path: str | Path) -> RunConfig:
    """A run's resolved config.json: how every component process reads its settings."""
    return msgspec.json.decode(Path(path).read_bytes(), type=RunConfig)


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
    assert match is not None  # the pattern matches every string
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
