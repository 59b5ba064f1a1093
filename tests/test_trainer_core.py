"""The torch trainer on a tiny random Llama: learning signal, exactness against
an unpadded reference, NaN guard, bad input, determinism and checkpoint/resume."""

import copy
import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from async_rl.logprobs import token_logprobs
from async_rl.messages import Trajectory, encode
from async_rl.trainer.batch import BatchError, pack_microbatches
from async_rl.trainer.checkpoint import latest_checkpoint
from async_rl.trainer.config import LossConfig, TrainerConfig, TrainerContext
from async_rl.trainer.distributed import full_tensor
from async_rl.trainer.reference import reference_loss
from async_rl.trainer.trainer import Trainer
from staleness import StalenessBoundError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


CONTEXT_FIELDS = ("ckpt_dir", "device", "compute_dtype", "max_staleness", "logprob_temperature")


def setup(model_dir, **fields) -> tuple[TrainerConfig, TrainerContext]:
    """A trainer's settings and the run-decided context, from one keyword list."""
    context = {name: fields.pop(name) for name in CONTEXT_FIELDS if name in fields}
    return TrainerConfig(**fields), TrainerContext(model_path=str(model_dir), **context)


def make_batch(model_dir, *, version=0, groups=2, group_size=4, seed=0, temperature=1.0):
    """GRPO groups with variable prompt/response lengths; behaviour logprobs from the saved model."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    trajectories = []
    for g in range(groups):
        prompt = torch.randint(
            1, 64, (int(torch.randint(2, 6, (1,), generator=generator)),), generator=generator
        ).tolist()
        for i in range(group_size):
            response = torch.randint(
                1, 64, (int(torch.randint(2, 8, (1,), generator=generator)),), generator=generator
            ).tolist()
            ids = torch.tensor([prompt + response])
            with torch.no_grad():
                logprobs = token_logprobs(model, ids, torch.ones_like(ids), temperature)[0, len(prompt) - 1 :].tolist()
            trajectories.append(
                Trajectory(
                    sample_id=f"s{g}-{i}",
                    group_id=f"g{g}",
                    group_size=group_size,
                    prompt_ids=prompt,
                    response_ids=response,
                    behavior_logprobs=logprobs,
                    token_versions=[version] * len(response),
                    reward=float(i % 2),
                )
            )
    return trajectories


def weights(trainer):
    return {name: tensor.clone() for name, tensor in trainer.named_tensors()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def sequence_logprob(model, trajectory):
    ids = torch.tensor([trajectory.prompt_ids + trajectory.response_ids])
    with torch.no_grad():
        return float(token_logprobs(model, ids, torch.ones_like(ids))[0, len(trajectory.prompt_ids) - 1 :].sum())


def test_steps_raise_rewarded_and_lower_unrewarded_responses(model_dir):
    batch = make_batch(model_dir)
    trainer = Trainer(*setup(model_dir, lr=1e-2))
    before = [sequence_logprob(trainer.model, t) for t in batch]
    for step in range(3):
        result = trainer.train_step(batch)
        assert result.version == step + 1 and not result.skipped
    after = [sequence_logprob(trainer.model, t) for t in batch]
    gains = [a - b for a, b in zip(after, before)]
    assert all(g > 0 for g, t in zip(gains, batch) if t.reward == 1)
    assert all(g < 0 for g, t in zip(gains, batch) if t.reward == 0)
    metrics = result.metrics
    assert metrics["is_weight/max"] > 1.0  # behaviour logprobs are now 2 versions old
    assert metrics["kl/behav_current_k3"] > 0 and metrics["grad_norm"] > 0
    assert result.staleness_histogram == {2: len(batch)}
    for name in (
        "loss",
        "reward/mean",
        "reward/std",
        "clip_frac",
        "is_weight/mean",
        "is_weight/capped_frac",
        "kl/behav_current_k1",
        "staleness/mean",
        "staleness/max",
        "tokens_per_s",
        "lr",
        "skipped_updates",
    ):
        assert name in metrics


@pytest.mark.parametrize("temperature", [0.5, 1.7])
def test_logprobs_are_recomputed_at_the_rollout_temperature(model_dir, temperature):
    """Behaviour logprobs of softmax(logits / T) match the trainer's own at that T (KL 0), not at T = 1."""
    batch = make_batch(model_dir, temperature=temperature)
    matched = Trainer(*setup(model_dir, lr=0.0, logprob_temperature=temperature)).train_step(batch)
    assert abs(matched.metrics["kl/behav_current_k1"]) < 1e-6
    unscaled = Trainer(*setup(model_dir, lr=0.0)).train_step(batch)
    assert abs(unscaled.metrics["kl/behav_current_k1"]) > 1e-4


def capture_gradients(trainer) -> list[dict[str, torch.Tensor]]:
    """The gradient each optimizer update applies (after clipping), one dict per update as they happen."""
    captured: list[dict[str, torch.Tensor]] = []

    def before_step(optimizer, args, kwargs) -> None:
        captured.append({name: full_tensor(p.grad).detach().clone() for name, p in trainer.model.named_parameters()})

    trainer.optimizer.register_step_pre_hook(before_step)
    return captured


def assert_float32_close(actual: torch.Tensor, expected: torch.Tensor, terms: int, name: str) -> None:
    """Equal up to float32 summation order: a sum of `terms` float32 values reordered differs by at
    most about terms * eps * (largest magnitude involved), taken here as the tensor's largest entry."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(
        actual,
        expected,
        rtol=0,
        atol=terms * torch.finfo(torch.float32).eps * scale + 1e-30,
        msg=lambda m: f"{name}: {m}",
    )


@pytest.mark.parametrize("correction", ["none", "decoupled_ppo"])
def test_step_matches_unpadded_single_sequence_reference(model_dir, correction):
    """Padding, micro-batching (budget forces several), LM-head chunks recomputed in backward and
    gradient accumulation change nothing beyond float32 accumulation order.

    The gradients are compared, not the weights after the AdamW step: a first Adam step moves each
    weight by about lr * g / (|g| + eps), so a weight whose gradient is near zero moves by an amount
    that float noise in g decides (seen: one gate_proj entry, 3e-6 apart on another CPU). The step
    itself is checked separately: it is AdamW's, applied to exactly the gradient the trainer computed.
    """
    batch = make_batch(model_dir, seed=1)
    config = setup(
        model_dir,
        lr=1e-3,
        max_grad_norm=1e9,
        max_tokens_per_microbatch=24,
        logprob_chunk_tokens=5,
        loss=LossConfig(correction=correction),
        gradient_checkpointing=correction == "decoupled_ppo",
    )
    trainer = Trainer(*config)
    initial = copy.deepcopy(trainer.model)
    updates = capture_gradients(trainer)
    result = trainer.train_step(batch)
    (applied,) = updates
    lengths = [len(t.prompt_ids) + len(t.response_ids) for t in batch]
    assert len(pack_microbatches(list(range(len(batch))), lengths, 24)) > 1

    reference = copy.deepcopy(initial)
    loss = reference_loss(reference, batch, LossConfig(correction="none"))
    loss.backward()
    assert result.metrics["loss"] == pytest.approx(loss.item(), abs=1e-6)
    for name, parameter in reference.named_parameters():  # each token's term adds to every weight's gradient
        assert_float32_close(applied[name], parameter.grad, sum(lengths), name)

    stepped = copy.deepcopy(initial)
    for name, parameter in stepped.named_parameters():
        parameter.grad = applied[name]
    torch.optim.AdamW(stepped.parameters(), lr=1e-3, weight_decay=0.0).step()
    assert_same_weights(weights(trainer), dict(stepped.named_parameters()))


def test_several_minibatches_use_the_step_start_policy_as_proximal(model_dir):
    batch = make_batch(model_dir, seed=2)
    trainer = Trainer(*setup(model_dir, lr=5e-2, num_minibatches=2))
    result = trainer.train_step(batch)
    assert result.version == 1 and not result.skipped
    assert result.metrics["clip_frac"] > 0  # the second update moved away from the proximal policy


def test_kl_penalty_towards_the_initial_policy(model_dir):
    batch = make_batch(model_dir, seed=6)
    trainer = Trainer(*setup(model_dir, lr=1e-2, loss=LossConfig(kl_coef=0.1)))
    first, second = trainer.train_step(batch), trainer.train_step(batch)
    assert first.metrics["kl/current_ref_k3"] == pytest.approx(0.0, abs=1e-6)
    assert second.metrics["kl/current_ref_k3"] > 1e-6


def test_non_finite_loss_skips_the_update_and_keeps_weights(model_dir):
    batch = make_batch(model_dir, seed=3)
    # A behaviour logprob of -1e30 gives an infinite ratio; with a negative advantage the loss is inf.
    first = batch[0]
    batch[0] = Trajectory(
        **{
            **{f: getattr(first, f) for f in first.__struct_fields__},
            "behavior_logprobs": [-1e30] * len(first.response_ids),
            "reward": -5.0,
        }
    )
    trainer = Trainer(*setup(model_dir, lr=1e-2, loss=LossConfig(correction="none")))
    before = weights(trainer)
    result = trainer.train_step(batch)
    assert result.skipped and "non-finite" in result.skip_reason
    assert result.metrics["skipped_updates"] == 1 and result.version == 1
    assert_same_weights(before, weights(trainer))
    assert not trainer.optimizer.state  # AdamW never stepped
    assert not trainer.train_step(make_batch(model_dir, version=1, seed=3)).skipped


def test_bad_batches_are_refused_before_any_change(model_dir):
    trainer = Trainer(*setup(model_dir, max_staleness=1))
    good = make_batch(model_dir, groups=1, group_size=2)
    broken = Trajectory(**{**{f: getattr(good[0], f) for f in good[0].__struct_fields__}, "behavior_logprobs": [-1.0]})
    with pytest.raises(BatchError, match="s0-0"):
        trainer.train_step([broken, good[1]])
    out_of_vocab = Trajectory(**{**{f: getattr(good[0], f) for f in good[0].__struct_fields__}, "prompt_ids": [64]})
    with pytest.raises(BatchError, match="vocabulary"):
        trainer.train_step([out_of_vocab])
    trainer.version = 3  # the batch's tokens are from version 0: staleness 3 > eta 1
    with pytest.raises(StalenessBoundError):
        trainer.train_step(good)
    assert trainer.version == 3 and not trainer.optimizer.state


def test_same_seed_and_data_give_identical_weights(model_dir):
    batch = make_batch(model_dir, seed=4)
    config = setup(model_dir, lr=1e-2, max_tokens_per_microbatch=40)
    runs = []
    for _ in range(2):
        trainer = Trainer(*config)
        trainer.train_step(batch)
        trainer.train_step(batch)
        runs.append(weights(trainer))
    assert_same_weights(*runs)


def test_resume_continues_bit_exactly(model_dir, tmp_path, caplog):
    config = setup(
        model_dir,
        ckpt_dir=str(tmp_path / "ckpt"),
        lr=1e-2,
        lr_schedule="cosine",
        warmup_steps=1,
        total_steps=10,
        weight_decay=0.1,
        keep_checkpoints=2,
    )
    batches = [make_batch(model_dir, version=v, seed=10 + v) for v in range(3)]
    trainer = Trainer(*config)
    trainer.save_checkpoint()  # step_0, pruned later
    for batch in batches[:2]:
        trainer.train_step(batch)
    trainer.save_checkpoint()
    draws_after_save = (torch.rand(3), np.random.rand(3), random.random())
    trainer.train_step(batches[2])
    uninterrupted = weights(trainer)
    trainer.save_checkpoint()

    resumed = Trainer.resume(*config, tmp_path / "ckpt" / "step_2")
    assert resumed.version == 2
    assert torch.equal(torch.rand(3), draws_after_save[0])  # every RNG is back where it was
    assert np.array_equal(np.random.rand(3), draws_after_save[1]) and random.random() == draws_after_save[2]
    resumed.train_step(batches[2])
    assert_same_weights(uninterrupted, weights(resumed))
    assert resumed.optimizer.state_dict()["state"][0]["step"] == trainer.optimizer.state_dict()["state"][0]["step"]

    ckpt = tmp_path / "ckpt"
    assert latest_checkpoint(ckpt) == ckpt / "step_3"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_2", "step_3"]
    assert Trainer.resume_or_new(*config).version == 3
    # the step folder is what an engine loads for a disk weight sync
    engine_model = AutoModelForCausalLM.from_pretrained(ckpt / "step_3", dtype=torch.float32)
    assert_same_weights(uninterrupted, dict(engine_model.named_parameters()))

    # Damaged after it was written: found by its checksums, reported, the older one used.
    shard = next((ckpt / "step_3").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR):
        assert latest_checkpoint(ckpt) == ckpt / "step_2"
    assert "step_3" in caplog.text and "does not match its checksum" in caplog.text
    assert Trainer.resume_or_new(*config).version == 2
    (ckpt / "step_2" / "trainer_state" / "optimizer.pt").unlink()
    with pytest.raises(FileNotFoundError, match="no intact checkpoint.*optimizer.pt is missing"):
        latest_checkpoint(ckpt)


def test_weights_for_sync_use_hf_names(model_dir, tmp_path):
    trainer = Trainer(*setup(model_dir))
    synced = trainer.state_dict_for_sync(dtype=torch.bfloat16)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert synced.keys() == dict(reference.named_parameters()).keys()
    assert all(t.dtype == torch.bfloat16 for t in synced.values())
    path = trainer.save_weights_for_engine(tmp_path / "weights")
    assert json.loads((path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    trainer.save_weights_for_engine(tmp_path / "weights")  # replacing an existing folder
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert_same_weights(weights(trainer), dict(loaded.named_parameters()))


@pytest.mark.parametrize("device, dtype", [("cpu", "float32"), pytest.param("cuda", "bfloat16", marks=pytest.mark.gpu)])
def test_disk_export_is_the_state_at_export_while_training_goes_on(model_dir, tmp_path, device, dtype):
    """In the compute dtype: what the engines serve (a bfloat16 run writes and loads half the bytes)."""
    trainer = Trainer(*setup(model_dir, device=device, compute_dtype=dtype))
    for version in range(2):  # the second write reuses the first one's host buffers
        before = {name: tensor.to("cpu", getattr(torch, dtype)) for name, tensor in weights(trainer).items()}
        export = trainer.export_weights("disk", tmp_path)
        assert export is not None and not Path(export.path).exists()  # written later, beside training
        trainer.train_step(make_batch(model_dir))
        assert any(not torch.equal(before[n], t.cpu()) for n, t in weights(trainer).items())
        path = trainer.write_export(export)
        assert path == tmp_path / f"v{version}"
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        assert_same_weights(before, dict(loaded.named_parameters()))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_cuda_ipc_export_is_a_device_snapshot_training_does_not_touch(model_dir, device):
    trainer = Trainer(*setup(model_dir, device=device, compute_dtype="bfloat16"))
    if device == "cpu":
        with pytest.raises(ValueError, match="needs one trainer rank on a CUDA device"):
            trainer.export_weights("cuda_ipc", "")
        return
    before = {name: tensor.to("cpu", torch.bfloat16) for name, tensor in weights(trainer).items()}
    export = trainer.export_weights("cuda_ipc", "")
    assert export is not None and export.path == "" and all(t.is_cuda for t in export.tensors.values())
    trainer.train_step(make_batch(model_dir))
    assert any(not torch.equal(before[n], t.to("cpu", torch.bfloat16)) for n, t in weights(trainer).items())
    assert_same_weights(before, {name: tensor.cpu() for name, tensor in export.tensors.items()})


def test_fsdp_shards_each_decoder_layer(model_dir):
    from async_rl.trainer.distributed import shard_units

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert shard_units(model) == ["model.layers.0", "model.layers.1"]


FSDP_WORKER = """
import sys, msgspec, torch
from safetensors.torch import save_file
from async_rl.messages import Trajectory, make_decoder
from async_rl.trainer.config import TrainerConfig, TrainerContext
from async_rl.trainer.trainer import Trainer
from async_rl.trainer.distributed import full_tensor
model_dir, batch_file, out_dir = sys.argv[1:4]
batch = make_decoder(list[Trajectory]).decode(open(batch_file, "rb").read())
trainer = Trainer(msgspec.json.decode(sys.argv[4], type=TrainerConfig), msgspec.json.decode(sys.argv[5], type=TrainerContext))
assert trainer.world_size == 2
first = {}  # the first update's whole gradients and resulting weights (gathering is a collective: every rank)

def keep_first(kind):
    def hook(*_):
        if kind not in first:
            first[kind] = {n: full_tensor(p.grad if kind == "grads" else p.detach()).clone()
                           for n, p in trainer.model.named_parameters()}
    return hook

trainer.optimizer.register_step_pre_hook(keep_first("grads"))
trainer.optimizer.register_step_post_hook(keep_first("weights"))
results = [trainer.train_step(batch) for _ in range(2)]
trainer.save_weights_for_engine(out_dir + "/weights")
trainer.save_checkpoint()
if trainer.rank == 0:
    save_file(first["grads"], out_dir + "/first_grads.safetensors")
    save_file(first["weights"], out_dir + "/first_weights.safetensors")
    print("LOSS", results[-1].metrics["loss"], "TOKENS", results[-1].metrics["response_tokens"])
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp_two_cpu_ranks_match_one_process(model_dir, tmp_path):
    """Two FSDP ranks compute the single process's gradient (up to float32 summation order) and
    apply AdamW to it; later steps are compared by their loss (weights after Adam steps are not
    compared elementwise: near-zero gradients make them flip with float noise, see above)."""
    from safetensors.torch import load_file

    batch = make_batch(model_dir, groups=3, group_size=3, seed=5)  # 9 rows: ranks get unequal work
    (tmp_path / "batch.msgpack").write_bytes(encode(batch))
    (tmp_path / "worker.py").write_text(FSDP_WORKER)
    config = setup(
        model_dir,
        ckpt_dir=str(tmp_path / "ckpt"),
        device="cpu",
        lr=1e-2,
        max_tokens_per_microbatch=24,
        logprob_chunk_tokens=7,  # the chunked LM head inside FSDP's root unit
        num_minibatches=2,
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(tmp_path / "worker.py"),
        str(model_dir),
        str(tmp_path / "batch.msgpack"),
        str(tmp_path),
        *(msgspec.json.encode(part).decode() for part in config),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    single = Trainer(*config)
    initial = copy.deepcopy(single.model)
    single_updates = capture_gradients(single)
    results = [single.train_step(batch) for _ in range(2)]
    loss_line = next(line for line in done.stdout.splitlines() if line.startswith("LOSS")).split()
    assert float(loss_line[1]) == pytest.approx(results[-1].metrics["loss"], abs=1e-5)
    assert float(loss_line[3]) == results[-1].metrics["response_tokens"]

    sharded_grads = load_file(tmp_path / "first_grads.safetensors")
    tokens = sum(len(t.prompt_ids) + len(t.response_ids) for t in batch)
    assert len(single_updates) == 4
    for name, gradient in single_updates[0].items():
        assert_float32_close(sharded_grads[name], gradient, tokens, name)
    stepped = copy.deepcopy(initial)
    for name, parameter in stepped.named_parameters():
        parameter.grad = sharded_grads[name]
    torch.optim.AdamW(stepped.parameters(), lr=1e-2, weight_decay=0.0).step()
    sharded_first = load_file(tmp_path / "first_weights.safetensors")
    for name, parameter in stepped.named_parameters():
        torch.testing.assert_close(sharded_first[name], parameter.detach(), rtol=1e-6, atol=1e-7, msg=name)

    sharded = AutoModelForCausalLM.from_pretrained(tmp_path / "weights", dtype=torch.float32)
    resumed = Trainer.resume(*config)  # saved by 2 ranks, resumed by 1: weights and optimizer are whole
    assert resumed.version == 2
    assert all(torch.equal(t, sharded.get_parameter(n)) for n, t in resumed.named_tensors())
    assert resumed.optimizer.state_dict()["state"][0]["step"] == 4  # 2 steps x 2 minibatches


@pytest.mark.gpu
def test_cuda_bfloat16_step_checkpoint_and_resume(model_dir, tmp_path):
    config = setup(
        model_dir,
        ckpt_dir=str(tmp_path / "ckpt"),
        device="cuda",
        compute_dtype="bfloat16",
        lr=1e-2,
        max_tokens_per_microbatch=24,
        num_minibatches=2,
    )
    trainer = Trainer(*config)
    batch = make_batch(model_dir, seed=7)
    result = trainer.train_step(batch)
    assert not result.skipped and result.metrics["response_tokens"] > 0
    assert all(t.device.type == "cuda" for _, t in trainer.named_tensors())
    trainer.save_checkpoint()
    resumed = Trainer.resume(*config)
    assert resumed.version == 1
    assert_same_weights(weights(trainer), weights(resumed))
    assert not resumed.train_step(batch).skipped
