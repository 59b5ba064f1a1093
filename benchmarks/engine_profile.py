"""Where the embedded engine's decode time goes: its core driven in-process under torch.profiler.

One warm-up run (graph captures, lazy initialisation), then the same requests again under the
profiler. Prints tokens/s of both runs, the engine's own step breakdown (launch, wait, row
bookkeeping, prefill) and the top operators by device and by host time; `--trace` writes a
Chrome/Perfetto trace.

    .venv/bin/python benchmarks/engine_profile.py                                   # CPU, tiny model
    python benchmarks/engine_profile.py --device cuda --model qwen2-0.5b --rows 128 --new-tokens 128
"""

from __future__ import annotations

import argparse
import threading
import time
from dataclasses import asdict


def run_once(core, rows: int, new_tokens: int, prompt: list[int], tag: str, timeout_s: float) -> float:
    """tok/s of `rows` greedy requests of `new_tokens` tokens submitted together."""
    from rollout_workers.engine.core import Sequence

    done = threading.Event()
    left = [rows]

    def on_update(seq: Sequence) -> None:
        if seq.finish_reason is not None:
            left[0] -= 1
            if not left[0]:
                done.set()

    seqs = [
        Sequence(
            sid=f"{tag}{i}",
            rid=f"{tag}{i}",
            prompt_ids=prompt,
            max_new_tokens=new_tokens,
            temperature=0.0,
            on_update=on_update,
        )
        for i in range(rows)
    ]
    started = time.perf_counter()
    core.submit(seqs)
    if not done.wait(timeout_s):
        raise TimeoutError(f"{tag}: {left[0]} of {rows} requests unfinished after {timeout_s} s")
    return rows * new_tokens / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny:llama", help="a model spec (tiny:llama, qwen2-0.5b, ...) or folder")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 (CUDA default)")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--top", type=int, default=15, help="operators listed per table")
    parser.add_argument("--trace", default=None, help="write the profiled run's Chrome trace here")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from rollout_workers.engine.core import EngineCore
    from rollout_workers.engine.model import load_model, resolve_model_spec

    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    if args.device == "cpu":
        torch.set_num_threads(1)
    loaded = load_model(resolve_model_spec(args.model), device=args.device, dtype=dtype)
    core = EngineCore(loaded.model, loaded.tokenizer, device=args.device, seed=0)
    core.start()
    prompt = [(7 * i) % 50 + 4 for i in range(args.prompt_len)]
    try:
        warm = run_once(core, args.rows, args.new_tokens, prompt, "warm", args.timeout)
        before = asdict(core.stats)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        prof = profile(activities=activities)
        # Started and stopped on the engine thread: the profiler records the host ops of its own thread
        # (Kineto then logs that its init callback ran on another thread than it registered on).
        core.call(prof.__enter__).result(30)
        profiled = run_once(core, args.rows, args.new_tokens, prompt, "prof", args.timeout)
        core.call(prof.__exit__, None, None, None).result(60)
    finally:
        core.stop(timeout_s=30)
    print(f"warm-up run {warm:.1f} tok/s, profiled run {profiled:.1f} tok/s (the profiler slows it)")
    print(f"profiled run: {core.stats.breakdown(since=before)}")
    averages = prof.key_averages()
    if args.device.startswith("cuda"):
        print(averages.table(sort_by="self_device_time_total", row_limit=args.top))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.top))
    if args.trace:
        prof.export_chrome_trace(args.trace)
    print(
        f"RESULT engine_profile device={args.device} model={args.model} dtype={dtype} rows={args.rows} "
        f"new_tokens={args.new_tokens} warm_tok_s={warm:.1f} profiled_tok_s={profiled:.1f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
