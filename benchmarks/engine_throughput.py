"""Engine throughput: N concurrent requests through each engine, side by side in one run.

Sides (--sides): `embedded` (this project's engine), `sglang` (a real SGLang server, its own
interval of handing tokens to its HTTP side) and `sglang-every-token` (SGLANG_FORCE_STREAM_INTERVAL=1,
what a run sets where a waiting request may be aborted) run as server subprocesses driven by the real
client, one after the other; `hf` is `model.generate` in this
process, one prompt at a time. Same weights, greedy, same prompt and output lengths. Every ratio is
the first side over another. Each engine side also times a pause in abort mode with every request
in flight: SGLang's own pause_generation(abort) against EngineClient.pause("abort").

    .venv/bin/python benchmarks/engine_throughput.py                       # CPU, tiny model, embedded vs hf
    .venv/bin/python benchmarks/engine_throughput.py --device cuda --model qwen2-0.5b --sides embedded,sglang \
        --concurrency 128 --max-new-tokens 128 --prompt-len 64 --sglang-args "--attention-backend triton ..."
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shlex
import time
from pathlib import Path

MODEL_CHOICES = "tiny (= tiny:llama), tiny:qwen2, qwen2-0.5b, or a Hugging Face model folder"
# Qwen2's real vocabulary: its tied embedding / LM head is a quarter of the 0.5B model's weights and compute.


def model_folder(name: str) -> Path:
    from rollout_workers.engine.model import resolve_model_spec

    return resolve_model_spec("tiny:llama" if name == "tiny" else name)


def make_prompts(count: int, length: int, vocab_size: int, special_ids: set[int], seed: int = 0) -> list[list[int]]:
    """Random ordinary tokens: the content does not matter to throughput, only the lengths."""
    rng = random.Random(seed)
    ordinary = [token for token in range(vocab_size) if token not in special_ids]
    return [[rng.choice(ordinary) for _ in range(length)] for _ in range(count)]


async def pause_latency(client, prompts: list[list[int]], how: str) -> float:
    """Seconds one pause in abort mode takes with every prompt generating (then continue)."""
    from rollout_workers.client import SamplingParams

    params = SamplingParams(max_new_tokens=1024, temperature=1.0, ignore_eos=True)
    async with asyncio.TaskGroup() as group:
        for prompt in prompts:
            group.create_task(client.generate(prompt, sampling_params=params, return_logprob=False))
        await asyncio.sleep(0.5)  # a benchmark: let every request reach the batch
        started = time.perf_counter()
        await (client.pause_generation("abort") if how == "pause_generation" else client.pause("abort"))
        elapsed = time.perf_counter() - started
    await client.continue_generation()
    return elapsed


async def engine_run(
    url: str, prompts: list[list[int]], shapes: list[tuple[int, int]], repeats: int
) -> tuple[dict[tuple[int, int], float], dict[tuple[int, int], list[list[int]]], dict[str, float]]:
    """Best tok/s and the outputs of every (concurrency, max_new_tokens) shape, then the pause latencies."""
    from rollout_workers.client import EngineClient, SamplingParams

    rates, outputs = {}, {}
    async with EngineClient(url) as client:
        await client.generate(prompts[0], sampling_params=SamplingParams(max_new_tokens=4, ignore_eos=True))  # warm-up
        for concurrency, max_new_tokens in shapes:
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
            best = 0.0
            for _ in range(repeats):
                started = time.perf_counter()
                async with asyncio.TaskGroup() as group:
                    tasks = [
                        group.create_task(client.generate(p, sampling_params=params, return_logprob=False))
                        for p in prompts[:concurrency]
                    ]
                elapsed = time.perf_counter() - started
                done = [task.result().output_ids for task in tasks]
                best = max(best, sum(map(len, done)) / elapsed)
            rates[concurrency, max_new_tokens], outputs[concurrency, max_new_tokens] = best, done
            # printed now, so that it is kept if a later shape times out
            print(f"  {url}: {concurrency} x {max_new_tokens}: {best:.1f} tok/s", flush=True)
            print(f"    {await step_breakdown(client)}", flush=True)
        first = prompts[: shapes[0][0]]
        pauses = {how: await pause_latency(client, first, how) for how in ("pause_generation", "client.pause")}
    return rates, outputs, pauses


async def step_breakdown(client) -> str:
    """The embedded engine's own account of its decode steps so far (SGLang reports none of this)."""
    from dataclasses import fields

    from rollout_workers.engine.core import EngineStats

    state = ((await client.get_server_info()).get("internal_states") or [{}])[0]
    if "decode_wait_s" not in state:
        return "no step breakdown from this engine"
    return "so far: " + EngineStats(**{f.name: state[f.name] for f in fields(EngineStats)}).breakdown()


def hf_sequential_run(
    folder: Path, prompts: list[list[int]], max_new_tokens: int, device: str, dtype: str, repeats: int
):
    import torch

    from rollout_workers.engine.model import load_model

    model = load_model(folder, device=device, dtype=dtype).model
    # The engine's ignore_eos: EOS may be generated but does not stop (min_new_tokens would ban it instead).
    model.generation_config.eos_token_id = None

    def generate(prompt: list[int], new_tokens: int) -> list[int]:
        input_ids = torch.tensor([prompt], device=device)
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=model.config.pad_token_id or 0,
        )
        return output[0, len(prompt) :].tolist()

    with torch.inference_mode():
        generate(prompts[0], 4)  # warm-up
        best = 0.0
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
            outputs = [generate(prompt, max_new_tokens) for prompt in prompts]
            elapsed = time.perf_counter() - started  # .tolist() above already synchronised
            best = max(best, sum(map(len, outputs)) / elapsed)
    return best, outputs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny", help=MODEL_CHOICES)
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 (CUDA default) | float16")
    parser.add_argument(
        "--sides",
        default="embedded,hf",
        help="comma list of embedded, sglang, sglang-every-token, hf; ratios are the first over each other",
    )
    parser.add_argument("--sglang-args", default="", help="extra flags for the SGLang server, one string")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--shapes",
        default=None,
        help="comma list of CONCURRENCYxMAX_NEW_TOKENS run on one start of each engine (default: the two above)",
    )
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads for every side; default 1 on CPU (steady on a shared machine), torch's default on CUDA",
    )
    parser.add_argument("--repeats", type=int, default=1, help="report the best of this many timed runs per side")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    args = parser.parse_args()
    sides = args.sides.split(",")
    if unknown := set(sides) - {"embedded", "sglang", "sglang-every-token", "hf"}:
        parser.error(f"unknown sides {sorted(unknown)}")
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    engine_env = {}
    threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else 0)
    if threads:
        import torch

        torch.set_num_threads(threads)
        engine_env["OMP_NUM_THREADS"] = str(threads)

    from transformers import AutoConfig, AutoTokenizer

    from rollout_workers.launcher import EngineProcess, EngineSpec

    folder = model_folder(args.model)
    vocab_size = AutoConfig.from_pretrained(folder).vocab_size
    tokenizer = AutoTokenizer.from_pretrained(folder)
    specials = set(tokenizer.all_special_ids) | set(range(len(tokenizer), vocab_size))
    shapes = parse_shapes(args.shapes) if args.shapes else [(args.concurrency, args.max_new_tokens)]
    prompts = make_prompts(max(c for c, _ in shapes), args.prompt_len, vocab_size, specials)

    rates: dict[str, dict] = {}
    outputs: dict[str, dict] = {}
    pauses: dict[str, dict[str, float]] = {}
    for side in sides:
        if side == "hf":
            rates[side], outputs[side] = {}, {}
            for shape in shapes:
                rates[side][shape], outputs[side][shape] = hf_sequential_run(
                    folder, prompts[: shape[0]], shape[1], args.device, dtype, args.repeats
                )
            continue
        if side == "embedded":
            spec = EngineSpec(model=str(folder), device=args.device, extra_args=["--dtype", dtype])
        else:
            spec = EngineSpec(
                kind="sglang",
                model=str(folder),
                extra_args=["--dtype", dtype, "--weight-version", "0", *shlex.split(args.sglang_args)],
                hand_over_every_token=side == "sglang-every-token",
            )
        engine = EngineProcess(spec, env=engine_env)
        engine.start()
        try:  # stopped before the next side starts, so two sides never share the machine
            engine.wait_healthy(args.startup_timeout)
            rates[side], outputs[side], pauses[side] = asyncio.run(
                engine_run(engine.url, prompts, shapes, args.repeats)
            )
        finally:
            engine.stop()

    first = sides[0]
    model_name = args.model if args.model in ("tiny", "tiny:qwen2", "qwen2-0.5b") else Path(args.model).name
    for side, p in pauses.items():
        print(
            f"{side:>18}: pause(abort): SGLang's {p['pause_generation']:.3f} s, EngineClient.pause {p['client.pause']:.3f} s"
        )
    for concurrency, max_new_tokens in shapes:
        shape = (concurrency, max_new_tokens)
        print(
            "   ".join(f"{side}: {rates[side][shape]:.1f} tok/s" for side in sides),
            f"({concurrency} x {max_new_tokens})",
        )
        result = [
            f"RESULT engine_throughput device={args.device} model={model_name} dtype={dtype} "
            f"threads={threads or 'default'} concurrency={concurrency} prompt_len={args.prompt_len} "
            f"max_new_tokens={max_new_tokens}"
        ]
        result += [f"{side}_tok_s={rates[side][shape]:.1f}" for side in sides]
        for other in sides[1:]:
            # Sanity, not speed: the same greedy tokens (batched numerics may flip a near-tie, more so in bf16).
            same = sum(a == b for a, b in zip(outputs[first][shape], outputs[other][shape])) / concurrency
            result += [
                f"ratio_{first}_over_{other}={rates[first][shape] / rates[other][shape]:.2f}",
                f"greedy_agreement_{other}={same:.2f}",
            ]
        print(" ".join(result))
    print(
        " ".join(
            f"RESULT pause_abort {side}_pause_abort_s={p['pause_generation']:.3f} "
            f"{side}_client_pause_abort_s={p['client.pause']:.3f}"
            for side, p in pauses.items()
        )
    )
    return 0


def parse_shapes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(part) for part in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(shape) != 2 or min(shape) < 1 for shape in shapes):
        raise SystemExit(f"--shapes {text!r}: expected a comma list like 32x64,128x1024")
    return [(c, n) for c, n in shapes]


if __name__ == "__main__":
    raise SystemExit(main())
