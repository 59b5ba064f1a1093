"""The megatron-core backend against the torch backend on one GPU, side by side in one run.

For each dtype: both trainers start from the same HF weights and train `--steps` steps on the same
batch (benchmarks/trainer_memory.py's synthetic one). Printed: the first step's loss of each and
their relative difference, the largest and mean weight gap afterwards in units of lr, train
tokens/s of each (steps after the first) and their ratio, peak GPU memory of each. Then the megatron
trainer's bfloat16 weights are exported and served by the embedded engine and by real SGLang; the
prompt logprobs each engine gives for the batch's sequences are compared with the trainer's.

    python benchmarks/megatron_parity.py --model qwen2-0.5b --sglang-args "--attention-backend triton ..."
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import shlex
import tempfile
import time
from pathlib import Path

import torch

from async_rl.trainer.batch import pad_trajectories
from async_rl.trainer.config import TrainerConfig, TrainerContext
from async_rl.trainer.megatron_trainer import MegatronTrainer
from async_rl.trainer.trainer import Trainer
from benchmarks.trainer_memory import make_batch
from rollout_workers.client import EngineClient
from rollout_workers.engine.model import resolve_model_spec
from rollout_workers.launcher import EngineProcess, EngineSpec


def run_backend(cls: type[Trainer], config: TrainerConfig, context: TrainerContext, batch, steps: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    trainer = cls(config, context)
    losses, speeds = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        started = time.perf_counter()
        metrics = trainer.train_step(batch).metrics
        torch.cuda.synchronize()
        losses.append(metrics["loss"])
        speeds.append(sum(len(t.prompt_ids) + len(t.response_ids) for t in batch) / (time.perf_counter() - started))
    result = {
        "loss": losses[0],
        "tokens_per_s": sum(speeds[1:]) / max(len(speeds) - 1, 1),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "weights": {name: tensor.float().cpu() for name, tensor in trainer.named_tensors()},
        "trainer": trainer,
    }
    return result


async def engine_logprobs(url: str, batch) -> list[list[float]]:
    async with EngineClient(url) as client:
        return [await client.prompt_logprobs(t.prompt_ids + t.response_ids, timeout_s=120) for t in batch]


def gaps(engine: list[list[float]], trainer: torch.Tensor) -> tuple[float, float]:
    values = [abs(a - b) for row, got in enumerate(engine) for a, b in zip(got, trainer[row].tolist(), strict=False)]
    return max(values), sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2-0.5b")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--response-len", type=int, default=448)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--sglang-args", default="", help="SGLang launch flags; empty: no SGLang side")
    args = parser.parse_args()

    folder = resolve_model_spec(args.model)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(folder).vocab_size
    batch = make_batch(args.groups, args.group_size, args.prompt_len, args.response_len, vocab)
    megatron_trainer = None
    for dtype in args.dtypes.split(","):
        context = TrainerContext(model_path=str(folder), device="cuda", compute_dtype=dtype)
        torch_side = run_backend(Trainer, TrainerConfig(lr=args.lr), context, batch, args.steps)
        del torch_side["trainer"]
        gc.collect()
        megatron_side = run_backend(
            MegatronTrainer, TrainerConfig(lr=args.lr, backend="megatron"), context, batch, args.steps
        )
        expected, actual = torch_side["weights"], megatron_side["weights"]
        gap = torch.cat([(expected[n] - actual[n]).abs().flatten() for n in expected]) / args.lr
        print(
            f"RESULT megatron_parity model={args.model} dtype={dtype} steps={args.steps} "
            f"tokens={sum(len(t.prompt_ids) + len(t.response_ids) for t in batch)} "
            f"loss_torch={torch_side['loss']:.6g} loss_megatron={megatron_side['loss']:.6g} "
            f"loss_rel_diff={abs(megatron_side['loss'] - torch_side['loss']) / abs(torch_side['loss']):.2e} "
            f"weight_gap_max_lr={float(gap.max()):.3f} weight_gap_mean_lr={float(gap.mean()):.4f} "
            f"tokens_s_torch={torch_side['tokens_per_s']:.0f} tokens_s_megatron={megatron_side['tokens_per_s']:.0f} "
            f"megatron/torch={megatron_side['tokens_per_s'] / torch_side['tokens_per_s']:.2f} "
            f"peak_gib_torch={torch_side['peak_gib']:.1f} peak_gib_megatron={megatron_side['peak_gib']:.1f}",
            flush=True,
        )
        megatron_trainer = megatron_side["trainer"] if dtype == "bfloat16" else None
        del torch_side, megatron_side
        gc.collect()

    if megatron_trainer is None:
        return
    sample = batch[:: args.group_size]  # one sequence per group
    padded = pad_trajectories(sample, megatron_trainer.device)
    with torch.no_grad():
        want = megatron_trainer._token_logprobs(megatron_trainer.model, padded).cpu()
    with tempfile.TemporaryDirectory() as scratch:
        exported = megatron_trainer.save_weights_for_engine(Path(scratch) / "weights", torch.bfloat16)
        del megatron_trainer
        gc.collect()
        torch.cuda.empty_cache()
        engines = {"embedded": EngineSpec(model=str(exported), device="cuda", extra_args=["--dtype", "bfloat16"])}
        if args.sglang_args:
            engines["sglang"] = EngineSpec(
                kind="sglang", model=str(exported), device="cuda", extra_args=shlex.split(args.sglang_args)
            )
        for name, spec in engines.items():
            engine = EngineProcess(spec, log_path=Path(scratch) / f"{name}.log").start()
            try:
                engine.wait_healthy(timeout_s=400)  # SGLang's first start compiles kernels
                worst, mean = gaps(asyncio.run(engine_logprobs(engine.url, sample)), want)
            finally:
                engine.stop()
            print(
                f"RESULT megatron_engine_logprobs model={args.model} engine={name} dtype=bfloat16 "
                f"sequences={len(sample)} max_abs_diff={worst:.4f} mean_abs_diff={mean:.5f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
