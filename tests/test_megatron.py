"""The megatron-core trainer backend.

On CPU (CI): HF -> megatron -> HF weight conversion round trips, tensor-parallel shards merge back,
the converted weights fit megatron's own GPTModel (built on the host, one and two tensor-parallel
ranks under torchrun with gloo) and come back out equal, and configs megatron cannot run are refused.
On CUDA (gpu-marked: megatron-core's forward pass needs a GPU): one step equals the torch backend's
on the same batch and weights, resume continues exactly, and the exported weights give the trainer's
logprobs in the embedded engine.
"""

import asyncio
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config

from async_rl.config import ConfigError, load_config
from async_rl.orchestrator import check_supported
from async_rl.trainer.config import MegatronConfig, TrainerConfig, TrainerContext
from async_rl.trainer.megatron_convert import (
    check_parallel_sizes,
    hf_to_megatron,
    layout_of,
    megatron_to_hf,
    tp_merge,
    tp_shard,
)

SHAPE = dict(
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
)
CONFIGS = {
    "llama": lambda: LlamaConfig(**SHAPE),
    "llama-tied": lambda: LlamaConfig(**SHAPE, tie_word_embeddings=True),
    "qwen2": lambda: Qwen2Config(**SHAPE),  # q/k/v biases
}


def hf_state(config) -> dict[str, torch.Tensor]:
    """An HF model's weights as its folder holds them (tied models: no lm_head)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return state


def save_model(config, folder):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(params=sorted(CONFIGS))
def hf_model(request, tmp_path):
    return save_model(CONFIGS[request.param](), tmp_path / request.param)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_to_megatron_to_hf_is_the_original(name):
    config = CONFIGS[name]()
    layout = layout_of(config)
    original = hf_state(config)
    mcore = hf_to_megatron(original, layout)
    assert ("output_layer.weight" in mcore) is not layout.tied
    qkv = mcore["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert qkv.shape == ((layout.heads + 2 * layout.groups) * layout.head_dim, layout.hidden)
    back = megatron_to_hf(mcore, layout)
    assert back.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key


def test_fused_qkv_is_laid_out_per_query_group():
    """Megatron reads linear_qkv as [q heads of group g, k_g, v_g] for each key/value group g."""
    config = CONFIGS["qwen2"]()
    layout = layout_of(config)
    state = hf_state(config)
    qkv = hf_to_megatron(state, layout)["decoder.layers.0.self_attention.linear_qkv.weight"]
    d, per_group = layout.head_dim, layout.heads // layout.groups
    grouped = qkv.view(layout.groups, (per_group + 2) * d, layout.hidden)
    q = state["model.layers.0.self_attn.q_proj.weight"].view(layout.groups, per_group * d, -1)
    k = state["model.layers.0.self_attn.k_proj.weight"].view(layout.groups, d, -1)
    assert torch.equal(grouped[1, : per_group * d], q[1])
    assert torch.equal(grouped[1, per_group * d : (per_group + 1) * d], k[1])


@pytest.mark.parametrize("tensor_parallel", [2])
def test_tensor_parallel_shards_merge_back(tensor_parallel):
    config = CONFIGS["qwen2"]()
    layout = layout_of(config)
    check_parallel_sizes(layout, tensor_parallel)
    full = hf_to_megatron(hf_state(config), layout)
    for name, tensor in full.items():
        shards = [tp_shard(name, tensor, tensor_parallel, rank) for rank in range(tensor_parallel)]
        assert torch.equal(tp_merge(name, shards), tensor), name
    gate_up = full["decoder.layers.0.mlp.linear_fc1.weight"]
    first = tp_shard("decoder.layers.0.mlp.linear_fc1.weight", gate_up, tensor_parallel, 0)
    half = layout.ffn // tensor_parallel  # each rank holds its part of gate, then its part of up
    assert torch.equal(first[:half], gate_up[:half])
    assert torch.equal(first[half:], gate_up[layout.ffn : layout.ffn + half])


def test_models_the_local_spec_cannot_express_are_refused():
    with pytest.raises(ValueError, match="attention_bias"):
        layout_of(LlamaConfig(**SHAPE, attention_bias=True))
    with pytest.raises(ValueError, match="rope_scaling"):
        layout_of(LlamaConfig(**SHAPE, rope_scaling={"rope_type": "linear", "factor": 2.0}))
    with pytest.raises(ValueError, match="converts"):
        layout_of(type("Config", (), {"model_type": "gpt2"})())
    with pytest.raises(ValueError, match="does not divide key/value heads"):
        check_parallel_sizes(layout_of(CONFIGS["llama"]()), 3)


LOAD_SCRIPT = """
import os, sys, torch, torch.distributed as dist
from transformers import AutoConfig
from safetensors.torch import load_file
from megatron.core import parallel_state
from async_rl.trainer.megatron_convert import layout_of
from async_rl.trainer.megatron_model import hf_tensors, load_gpt, transformer_config
folder, tp = sys.argv[1], int(sys.argv[2])
dist.init_process_group("gloo")
parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
hf_config = AutoConfig.from_pretrained(folder)
config = transformer_config(hf_config, tp, torch.float32, recompute=False)
model = load_gpt(folder, config, hf_config, tp, parallel_state.get_tensor_model_parallel_rank())
back = hf_tensors(model, layout_of(hf_config), tp)
original = load_file(os.path.join(folder, "model.safetensors"))
assert back.keys() == original.keys(), (sorted(back), sorted(original))
assert all(torch.equal(back[k], original[k]) for k in original)
os.write(1, f"rank {dist.get_rank()} ok\\n".encode())  # one write: the ranks share the pipe, print's pieces interleave
# Leave together: a rank whose peer already exited can abort in gloo's teardown (SIGABRT at exit).
dist.barrier()
parallel_state.destroy_model_parallel()
dist.destroy_process_group()
"""


@pytest.mark.parametrize("name, tensor_parallel", [("llama", 1), ("llama-tied", 2), ("qwen2", 2)])
def test_converted_weights_fit_megatrons_gpt_model_and_come_back_equal(tmp_path, name, tensor_parallel):
    folder = save_model(CONFIGS[name](), tmp_path / name)
    script = tmp_path / "load.py"
    script.write_text(LOAD_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tensor_parallel}"]
    done = subprocess.run(
        [*command, str(script), str(folder), str(tensor_parallel)], capture_output=True, text=True, timeout=240
    )
    # torchrun's summary fills the tail of stderr: the ranks' own errors come first in the message
    errors = [line for line in done.stderr.splitlines() if "rror" in line or "terminate" in line or "what()" in line]
    assert done.returncode == 0, "\n".join(errors[:40]) + "\n" + done.stderr[-1500:]
    assert done.stdout.count(" ok") == tensor_parallel


def test_config_refuses_what_megatron_cannot_run():
    with pytest.raises(ValueError, match="multiple of megatron.tensor_parallel"):
        TrainerConfig(backend="megatron", megatron=MegatronConfig(tensor_parallel=2))
    with pytest.raises(ValueError, match='unless backend = "megatron"'):
        TrainerConfig(megatron=MegatronConfig(distributed_optimizer=False))
    with pytest.raises(ConfigError, match="backend"):
        load_config("recipes/tiny.toml", ["trainer.backend='jax'"])
    TrainerConfig(backend="megatron", processes=4, megatron=MegatronConfig(tensor_parallel=2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no CUDA device")
def test_a_run_without_cuda_is_refused_before_anything_starts():
    config = load_config("recipes/tiny.toml", ["trainer.backend='megatron'", "model.device='cpu'"])
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        check_supported(config)
    from async_rl.trainer.megatron_trainer import MegatronTrainer

    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        MegatronTrainer(TrainerConfig(backend="megatron"), TrainerContext(model_path="unused", device="cpu"))


# ------------------------------------------------------------------ on CUDA


def tiny_batch(folder):
    from tests.test_trainer_core import make_batch

    return make_batch(folder, groups=3, group_size=4)


def weights(trainer) -> dict[str, torch.Tensor]:
    return {name: tensor.float().cpu().clone() for name, tensor in trainer.named_tensors()}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_megatron_step_equals_the_torch_backends(hf_model, dtype):
    """Same weights, same batch, one step. Each backend's first Adam step moves a weight by at most
    about lr (|m / sqrt(v)| = 1), so weights may differ by at most 2 lr where near-zero gradients
    disagree in sign, plus, in bfloat16, megatron's rounding of its weights when loaded and after the
    step (half an ulp each: 2^-9 |w|; the torch backend keeps float32 weights). float32 differs only in reduction order: loss within
    1e-5 relative, weights within 1e-2 lr. bfloat16: megatron keeps its residual stream in bfloat16,
    HF under autocast in float32, so the loss agrees to 1e-2 relative (measured 1.3e-3 here)."""
    from async_rl.trainer.megatron_trainer import MegatronTrainer
    from async_rl.trainer.trainer import Trainer

    folder = hf_model
    lr = 1e-3
    context = TrainerContext(model_path=str(folder), device="cuda", compute_dtype=dtype)
    reference = Trainer(TrainerConfig(lr=lr), context)
    trainer = MegatronTrainer(TrainerConfig(lr=lr, backend="megatron"), context)
    start = weights(reference)
    assert weights(trainer).keys() == start.keys()
    batch = tiny_batch(folder)
    want, got = reference.train_step(batch).metrics, trainer.train_step(batch).metrics
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5 if dtype == "float32" else 1e-2)
    expected, actual = weights(reference), weights(trainer)
    for name in expected:
        gap = (expected[name] - actual[name]).abs()
        rounding = 2**-8 * (start[name].abs() + expected[name].abs())  # at load and after the step, 2x slack
        bound = 1e-2 * lr if dtype == "float32" else 2 * lr + rounding
        assert bool((gap <= bound).all()), (name, float((gap / lr).max()))
    assert max(float((expected[name] - start[name]).abs().max()) for name in expected) > lr / 2  # it trained


def optimizer_tensors(trainer) -> list[torch.Tensor]:
    """The float32 master weights and Adam moments megatron's optimizer holds (on this rank)."""
    tensors = []
    for wrapper in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        inner = wrapper.optimizer
        for group in inner.param_groups:
            for parameter in group["params"]:
                state = inner.state.get(parameter, {})
                tensors += [t.float().cpu().clone() for t in (parameter, state.get("exp_avg"), state.get("exp_avg_sq"))
                            if t is not None]  # fmt: skip
    return tensors


@pytest.mark.gpu
def test_megatron_resume_restores_weights_master_weights_and_moments(hf_model, tmp_path):
    """Bit-exact continuation is tested on CPU for the torch backend; on CUDA, as there, the state
    itself must come back exactly (CUDA's atomic adds make later steps differ in the last bits)."""
    from async_rl.trainer.megatron_trainer import MegatronTrainer

    folder = hf_model
    config = TrainerConfig(lr=1e-3, backend="megatron")
    context = TrainerContext(
        model_path=str(folder), device="cuda", compute_dtype="bfloat16", ckpt_dir=str(tmp_path / "ckpt")
    )
    batch = tiny_batch(folder)
    trainer = MegatronTrainer(config, context)
    trainer.train_step(batch)
    trainer.save_checkpoint()
    resumed = MegatronTrainer.resume(config, context)
    assert resumed.version == 1
    expected, actual = weights(trainer), weights(resumed)
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    saved, restored = optimizer_tensors(trainer), optimizer_tensors(resumed)
    assert len(saved) == len(restored) > 0
    assert all(torch.equal(a, b) for a, b in zip(saved, restored, strict=True))
    assert not resumed.train_step(batch).skipped


@pytest.mark.gpu
def test_exported_weights_give_the_trainers_logprobs_in_the_embedded_engine(hf_model, tmp_path):
    from async_rl.trainer.batch import pad_trajectories
    from async_rl.trainer.megatron_trainer import MegatronTrainer
    from rollout_workers.client import EngineClient
    from rollout_workers.launcher import EngineProcess, EngineSpec

    folder = hf_model
    context = TrainerContext(model_path=str(folder), device="cuda", compute_dtype="bfloat16")
    trainer = MegatronTrainer(TrainerConfig(lr=1e-3, backend="megatron"), context)
    batch = tiny_batch(folder)
    trainer.train_step(batch)
    exported = trainer.save_weights_for_engine(tmp_path / "weights", torch.bfloat16)
    padded = pad_trajectories(batch, trainer.device)
    with torch.no_grad():
        want = trainer._token_logprobs(trainer.model, padded).cpu()

    async def engine_logprobs(url):
        async with EngineClient(url) as client:
            return [await client.prompt_logprobs(t.prompt_ids + t.response_ids) for t in batch]

    with EngineProcess(EngineSpec(model=str(exported), device="cuda", extra_args=["--dtype", "bfloat16"])) as engine:
        got = asyncio.run(engine_logprobs(engine.url))
    gaps = [abs(a - b) for row, values in enumerate(got) for a, b in zip(values, want[row].tolist(), strict=False)]
    assert max(gaps) < 2e-2 and sum(gaps) / len(gaps) < 1e-3, (max(gaps), sum(gaps) / len(gaps))


def test_a_megatron_weight_without_an_hf_name_is_an_error_not_dropped():
    config = CONFIGS["llama"]()
    layout = layout_of(config)
    mcore = hf_to_megatron(hf_state(config), layout)
    with pytest.raises(KeyError, match="embedding.position_embeddings.weight"):
        megatron_to_hf({**mcore, "embedding.position_embeddings.weight": torch.zeros(1)}, layout)
