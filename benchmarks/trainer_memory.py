"""Peak trainer memory and train tokens/s: chunked LM-head logprobs vs the whole micro-batch at once.

Each path runs in its own process (fresh peak counters) on the same weights and the same batch:
one `Trainer.train_step` to warm up, then `--steps` timed ones. Peak memory is
torch.cuda.max_memory_allocated on a GPU and the process's peak RSS on CPU. The logprobs of both
paths, computed with gradients on the initial weights, must agree to `--tolerance`.

    .venv/bin/python benchmarks/trainer_memory.py                        # tiny model, CPU
    python benchmarks/trainer_memory.py --model qwen2-0.5b --device cuda --dtype bfloat16 --tokens 16384
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_batch(groups: int, group_size: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0):
    from async_rl.messages import Trajectory

    rng = random.Random(seed)
    batch = []
    for g in range(groups):
        prompt = [rng.randrange(3, vocab) for _ in range(prompt_len)]
        for i in range(group_size):
            batch.append(
                Trajectory(
                    sample_id=f"g{g}-{i}",
                    group_id=f"g{g}",
                    group_size=group_size,
                    prompt_ids=prompt,
                    response_ids=[rng.randrange(3, vocab) for _ in range(response_len)],
                    behavior_logprobs=[-rng.uniform(0.5, 12.0) for _ in range(response_len)],
                    token_versions=[0] * response_len,
                    reward=float(rng.random() < 0.5),
                )
            )
    return batch


def measure(args: argparse.Namespace) -> dict:
    """One path, in this process: its logprobs go to args.logprobs_out, its numbers are returned."""
    import torch

    from async_rl.logprobs import token_logprobs
    from async_rl.trainer.config import TrainerConfig, TrainerContext
    from async_rl.trainer.trainer import Trainer
    from rollout_workers.engine.model import resolve_model_spec

    config = TrainerConfig(
        lr=1e-6, groups_per_step=args.groups, max_tokens_per_microbatch=args.tokens, logprob_chunk_tokens=args.chunk
    )
    context = TrainerContext(
        model_path=str(resolve_model_spec(args.model)), device=args.device, compute_dtype=args.dtype
    )
    trainer = Trainer(config, context)
    response_len = args.tokens // (args.groups * args.group_size) - args.prompt_len
    batch = make_batch(args.groups, args.group_size, args.prompt_len, response_len, trainer.vocab_size)
    cuda = trainer.device.type == "cuda"

    ids = torch.tensor(
        [list(t.prompt_ids) + list(t.response_ids) for t in batch[: args.group_size]], device=trainer.device
    )
    with trainer._autocast():
        logprobs = token_logprobs(trainer.model, ids, torch.ones_like(ids), chunk_tokens=args.chunk)
    logprobs.sum().backward()
    trainer.model.zero_grad(set_to_none=True)
    torch.save(logprobs.detach().float().cpu(), args.logprobs_out)
    del logprobs

    trainer.train_step(batch)  # warm-up: optimizer state, allocator, kernels
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(args.steps):
        started = time.perf_counter()
        trainer.train_step(batch)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tokens = sum(len(t.prompt_ids) + len(t.response_ids) for t in batch)
    return {"peak_bytes": peak, "tokens_per_s": tokens / sorted(seconds)[len(seconds) // 2], "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny:qwen2", help="model.spec (qwen2-0.5b: vocabulary 151,936)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=4096, help="padded tokens per micro-batch (and per batch)")
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=None, help="trainer.logprob_chunk_tokens (default: its default)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--logprobs-out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args)))
        return

    import torch

    from async_rl.trainer.config import TrainerConfig

    chunked = args.chunk if args.chunk is not None else TrainerConfig().logprob_chunk_tokens
    results, logprobs = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, chunk in (("unchunked", 0), (f"chunked {chunked}", chunked)):
            out = Path(scratch, f"{chunk}.pt")
            argv = [sys.argv[0], *sys.argv[1:], "--worker", "--chunk", str(chunk), "--logprobs-out", str(out)]
            completed = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
            if completed.returncode != 0:
                results[name] = {"error": completed.stderr.strip().splitlines()[-1]}
                continue
            results[name] = json.loads(completed.stdout.strip().splitlines()[-1])
            logprobs[name] = torch.load(out)
    print(f"model {args.model}, {args.device}, {args.dtype}, {args.tokens} tokens per micro-batch")
    print(f"{'path':<16} {'peak memory GiB':>16} {'train tokens/s':>15}")
    for name, result in results.items():
        if "error" in result:
            print(f"{name:<16} failed: {result['error']}")
        else:
            print(f"{name:<16} {result['peak_bytes'] / 2**30:>16.2f} {result['tokens_per_s']:>15,.0f}")
    base, new = results["unchunked"], results[f"chunked {chunked}"]
    if "error" not in base and "error" not in new:
        print(
            f"chunked / unchunked: memory {new['peak_bytes'] / base['peak_bytes']:.2f}x, "
            f"tokens/s {new['tokens_per_s'] / base['tokens_per_s']:.2f}x"
        )
    if len(logprobs) == 2:
        first, second = logprobs.values()
        difference = float((first - second).abs().max())
        verdict = "ok" if difference <= args.tolerance else f"ABOVE {args.tolerance:g}"
        print(f"max |logprob difference| {difference:.2e} ({verdict})")


if __name__ == "__main__":
    main()
