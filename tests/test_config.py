"""Recipe loading: every bundled recipe parses, and bad configs fail with the key's path."""

from __future__ import annotations

import copy
import json

import pytest

from async_rl.config import (
    RECIPES_DIR,
    ConfigError,
    RunConfig,
    apply_override,
    import_function,
    load_config,
    parse_config,
)

TASK = {"task": {"generator": "recipes.tasks:digit_task"}}


def config_error(table: dict, *overrides: str) -> str:
    table = copy.deepcopy(table)
    for assignment in overrides:
        apply_override(table, assignment)
    with pytest.raises(ConfigError) as error:
        parse_config(table, source="recipe.toml")
    return str(error.value)


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES_DIR.glob("*.toml")))
def test_bundled_recipes_load_and_their_functions_import(recipe):
    config = load_config(recipe)
    assert isinstance(config, RunConfig)
    for spec in (config.rollout.reward, config.task.generator):
        if spec:
            assert callable(import_function(spec))


def test_defaults_and_derived_values(tmp_path):
    config = parse_config(dict(TASK))
    assert (
        config.staleness.eta == 1
        and config.engine.kind == "embedded"
        and config.trainer.loss.correction == "decoupled_ppo"
    )
    assert config.batch_size == config.trainer.groups_per_step * config.rollout.group_size
    assert config.output_path("", "buffer").as_posix() == "runs/latest/buffer"
    assert config.output_path("/x/wal", "buffer").as_posix() == "/x/wal"
    assert json.loads(config.to_json())["task"]["generator"] == "recipes.tasks:digit_task"


def test_overrides_parse_toml_literals_and_fall_back_to_strings(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[task]\ngenerator = "recipes.tasks:digit_task"\n[trainer]\nlr = 1e-3\n')
    config = load_config(
        recipe,
        overrides=[
            "trainer.lr=3e-4",
            "staleness.eta=2",
            "run.sync=false",
            "engine.extra_args=['--x', '1']",
            "task.kwargs.kind=copy",
            "run.output_dir=/tmp/some run",
            "trainer.loss.is_cap=2",
        ],
    )
    assert config.trainer.lr == 3e-4 and config.staleness.eta == 2 and config.engine.extra_args == ["--x", "1"]
    assert config.task.kwargs == {"kind": "copy"} and config.run.output_dir == "/tmp/some run"
    assert config.trainer.loss.is_cap == 2.0


@pytest.mark.parametrize(
    "table, overrides, expected",
    [
        ({**TASK, "trainr": {}}, (), "unknown table 'trainr'; allowed: task, model, engine"),
        (dict(TASK), ("trainer.lrr=1",), "unknown key 'trainer.lrr' in [trainer]; allowed: lr, lr_schedule"),
        (
            dict(TASK),
            ("trainer.loss.clipp=1",),
            "unknown key 'trainer.loss.clipp' in [trainer.loss]; allowed: correction",
        ),
        (dict(TASK), ("trainer.lr=fast",), "trainer.lr: expected `float`, got `str`"),
        (dict(TASK), ("staleness.eta=-1",), "staleness.eta=-1 must be >= 0"),
        (dict(TASK), ("trainer.loss.clip_eps=0",), "trainer.loss.clip_eps=0.0 must be > 0"),
        (
            dict(TASK),
            ("weight_sync.method=carrier_pigeon",),
            "weight_sync.method: invalid enum value 'carrier_pigeon' (expected one of disk, tensor, distributed, cuda_ipc)",
        ),
        (
            dict(TASK),
            ("rollout.reward=no_colon",),
            "rollout.reward='no_colon' must be of the form \"package.module:function\"",
        ),
        (dict(TASK), ("task.dataset=data.jsonl",), "task: set exactly one of generator or dataset"),
        (dict(TASK), ("run.sync=true",), "run.sync = true trains strictly on-policy: set staleness.eta = 0 (got 1)"),
        (dict(TASK), ("trainer.device=gpu1",), "trainer.device='gpu1' must be auto, cpu, cuda or cuda:N"),
        (dict(TASK), ("cluster.ready_timeout_s=0",), "cluster.ready_timeout_s=0.0 must be > 0"),
        (
            dict(TASK),
            ("trainer.processes=3", "cluster.trainer_nodes=2"),
            "trainer.processes = 3 ranks cannot be spread evenly over cluster.trainer_nodes = 2 nodes",
        ),
        ({}, (), "missing required key 'task'"),
        ({"task": 3}, (), "task: expected `object`, got `int`"),
    ],
)
def test_bad_configs_name_the_key(table, overrides, expected):
    message = config_error(table, *overrides)
    assert message.startswith("recipe.toml: ") and expected in message


def test_unreadable_recipes_and_bad_overrides(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("[trainer\nlr = 1")
    with pytest.raises(ConfigError, match="broken.toml: cannot read TOML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="no bundled recipe of that name .bundled: .*tiny"):
        load_config("no_such_recipe")
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        apply_override({}, "trainer.lr")
    with pytest.raises(ConfigError, match="trainer.lr is a value, not a table"):
        apply_override({"trainer": {"lr": 1.0}}, "trainer.lr.x=1")


def test_import_function_errors_say_which_part_failed():
    assert import_function("recipes.rewards:exact_match").__name__ == "exact_match"
    with pytest.raises(ConfigError, match="cannot import module 'recipes.nope'"):
        import_function("recipes.nope:f")
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        import_function("recipes.rewards:nope")


def test_run_refuses_april_with_a_generate_function_it_cannot_resume():
    from async_rl.orchestrator import check_supported

    check_supported(load_config("april_tiny", ["rollout.workers=2"]))
    with pytest.raises(ConfigError, match="april.enabled retracts and resumes samples"):
        load_config("tiny", ["april.enabled=true", "rollout.generate=recipes.tool_calling:calculator"])
    with pytest.raises(ConfigError, match="unset when sample_plan is set"):
        load_config("april_tiny", ["rollout.generate=recipes.tool_calling:calculator"])


@pytest.mark.parametrize(
    "overrides, refused",
    [
        (["engine.kind=sglang"], "needs embedded engines"),
        (["trainer.backend=megatron"], "trainer.backend"),
        (["model.dtype=bfloat16"], "trainer.processes >= 2"),
    ],
)
def test_trainer_logprobs_are_refused_where_the_engine_cannot_compute_them(overrides, refused):
    assert refused in config_error(TASK, "engine.trainer_logprobs=true", *overrides)
    load_config("tiny", ["engine.trainer_logprobs=true", "model.dtype=bfloat16", "trainer.processes=2"])


def test_tensor_sync_is_refused_for_sglang_engines():
    message = config_error(TASK, "engine.kind=sglang", "weight_sync.method=tensor")
    assert "MultiprocessingSerializer" in message and "disk" in message


@pytest.mark.parametrize(
    "overrides, refused",
    [
        (["engine.kind=embedded"], "embedded engine never decodes"),
        (["trainer.processes=2"], "one trainer process"),
    ],
)
def test_cuda_ipc_sync_is_refused_unless_one_trainer_process_drives_sglang(overrides, refused):
    assert refused in config_error(TASK, "weight_sync.method=cuda_ipc", "engine.kind=sglang", *overrides)


@pytest.mark.parametrize(
    "overrides, refused",
    [
        (["trainer.device=cpu"], "trainer is on cpu"),
        (["trainer.device=cuda:1"], "engines on cuda:0"),  # SGLang's default GPU is 0
        (["trainer.device=cuda:1", "engine.device=cuda:0"], "engines on cuda:0"),
        (["trainer.device=cuda", "engine.device=cuda:0"], None),
        (["trainer.device=cuda:1", "engine.device=cuda:1", "engine.count=2"], None),  # engines may share it
    ],
)
def test_cuda_ipc_sync_needs_the_engines_on_the_trainers_gpu(overrides, refused):
    from async_rl.orchestrator import check_supported

    config = load_config("tiny", ["weight_sync.method=cuda_ipc", "engine.kind=sglang", *overrides])
    if refused is None:
        check_supported(config)
        with pytest.raises(ConfigError, match="separate Ray bundles"):
            check_supported(config, on_cluster=True)
    else:
        with pytest.raises(ConfigError, match=refused):
            check_supported(config)


@pytest.mark.parametrize(
    "overrides, refused",
    [
        (["trainer.device=cuda:0", "engine.device=cuda:0"], "different GPUs"),
        (["trainer.device=cuda", "engine.kind=sglang"], "different GPUs"),  # SGLang's default GPU is 0
        (["trainer.device=cuda:1", "engine.device=cuda:0", "engine.count=2"], "its own GPU"),
        (["trainer.device=cuda:1", "engine.device=cuda:0"], None),
        (["trainer.device=cpu", "engine.device=cpu", "engine.count=2"], None),  # gloo places anything
    ],
)
def test_an_nccl_broadcast_needs_one_gpu_per_process(overrides, refused):
    from async_rl.orchestrator import check_supported

    config = load_config("tiny", ["weight_sync.method=distributed", *overrides])
    if refused is None:
        check_supported(config)
    else:
        with pytest.raises(ConfigError, match=refused):
            check_supported(config)


@pytest.mark.parametrize(
    "overrides, refused",
    [
        (["rollout.max_new_tokens=2048"], "max_position_embeddings"),
        (["rollout.max_new_tokens=2047"], None),
        (["rollout.max_new_tokens=4096", "engine.kind=sglang", 'engine.extra_args=["--context-length","8192"]'], None),
        (
            ["rollout.max_new_tokens=4096", "engine.kind=sglang", 'engine.extra_args=["--context-length","4096"]'],
            "--context-length",
        ),
    ],
)
def test_a_response_budget_must_leave_room_for_a_prompt(tmp_path, overrides, refused):
    """SGLang answers prompt + max_new_tokens > context with HTTP 400 on every request (seen on the H200
    with max_new_tokens 2048 on a 2048-token model): the run refuses to start instead."""
    from async_rl.orchestrator import check_context

    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    config = load_config("tiny", overrides)
    if refused is None:
        check_context(config, tmp_path)
    else:
        with pytest.raises(ConfigError, match=refused):
            check_context(config, tmp_path)
