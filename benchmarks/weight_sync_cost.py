"""Weight sync cost per phase against the bound of its path, side by side in one run.

A real trainer and a real embedded engine process; each method syncs --syncs times after one
warm-up (no request in flight: the phases themselves). The bound of a path is its bytes over the
bandwidth measured just before each sync, on the same folder (disk bandwidth drifts with the page
cache's writeback, so each sync is paired with its own measurement):
- disk: write the snapshot (safetensors, as the export does) + read it back (as the engine does):
  bytes / write bandwidth + bytes / read bandwidth of a plain file of the same size;
- tensor: the payload is encoded once and decoded once: 2 x bytes / copy bandwidth (torch clone);
- cuda_ipc (SGLang on the trainer's GPU): the snapshot is copied on the device once and the engine
  copies it into its parameters once: 2 x bytes / device copy bandwidth (a clone of the same size);
- distributed: one broadcast of the same bytes in one buffer between two processes on the trainer's
  and the engine's devices (NCCL on GPUs, gloo on CPU), measured once before the syncs (the sync
  itself broadcasts flattened buckets of weight_sync.BUCKET_BYTES, one update request each);
- on CUDA both paths also cross the host once each way: + bytes / device-to-host + bytes /
  host-to-device bandwidth (torch copies of the same size, measured beside the others).
The ratio is (export + write + update) / bound, the median over the pairs (export: what the trainer
waits for; write: the disk snapshot, written beside training); pause and continue beside it.

    .venv/bin/python benchmarks/weight_sync_cost.py [--model tiny:qwen2] [--methods disk,tensor] [--syncs 5]
    python benchmarks/weight_sync_cost.py --device cuda --engine sglang --engine-args "..." --methods disk
    python benchmarks/weight_sync_cost.py --device cuda:1 --engine-device cuda:0 --methods distributed,disk
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import statistics
import tempfile
import time
from pathlib import Path

PHASES = ("export", "write", "pause", "update", "continue")


CHUNK = 64 << 20


def file_seconds(folder: Path, size: int, chunk: memoryview, into: memoryview) -> float:
    """Writing `size` bytes to a plain file in `folder` and reading them back, in 64 MiB chunks."""
    path = folder / "bandwidth.bin"
    started = time.perf_counter()
    with path.open("wb", buffering=0) as out:
        for offset in range(0, size, CHUNK):
            out.write(chunk[: min(CHUNK, size - offset)])
    with path.open("rb", buffering=0) as source:
        while source.readinto(into):
            pass
    seconds = time.perf_counter() - started
    path.unlink()
    return seconds


def host_crossing_seconds(size: int, device: str) -> float:
    """Seconds to copy `size` bytes from `device` to the host and back (0 on the CPU)."""
    import torch

    if not device.startswith("cuda"):
        return 0.0
    on_device = torch.empty(size, dtype=torch.uint8, device=device)
    on_device.cpu()  # warm-up
    torch.cuda.synchronize()
    started = time.perf_counter()
    on_host = on_device.cpu()
    on_host.to(device)
    torch.cuda.synchronize()
    return time.perf_counter() - started


def broadcast_seconds(size: int, sender: str, receiver: str) -> float:
    """Median seconds of 3 broadcasts (after a warm-up) of `size` bytes in one buffer from a process on
    `sender` to one on `receiver`: NCCL between GPUs, gloo otherwise."""
    import torch.multiprocessing as mp

    from rollout_workers.launcher import free_port

    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    port = free_port("127.0.0.1")
    ranks = [
        context.Process(target=_broadcast_rank, args=(r, d, size, port, results))
        for r, d in enumerate((sender, receiver))
    ]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(300)
    if any(process.exitcode != 0 for process in ranks):
        raise RuntimeError(f"the broadcast bandwidth measurement failed (exit codes {[p.exitcode for p in ranks]})")
    return results.get()


def _broadcast_rank(rank: int, device: str, size: int, port: int, results) -> None:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on the lent machines
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    buffer = torch.empty(size, dtype=torch.uint8, device=device)
    seconds = []
    for attempt in range(4):
        dist.barrier()
        started = time.perf_counter()
        dist.broadcast(buffer, src=0)
        if backend == "nccl":
            torch.cuda.synchronize()
        if attempt:  # the first one sets up the channels
            seconds.append(time.perf_counter() - started)
    if rank == 0:
        results.put(statistics.median(seconds))
    dist.destroy_process_group()


def copy_bandwidth(size: int, device: str = "cpu") -> float:
    """Bytes/s of one clone of `size` bytes on `device`."""
    import torch

    source = torch.empty(size, dtype=torch.uint8, device=device)
    source.clone()  # warm-up
    if source.is_cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    source.clone()
    if source.is_cuda:
        torch.cuda.synchronize()
    return size / (time.perf_counter() - started)


async def measure(method: str, trainer, url: str, weights_dir: Path, syncs: int, bound) -> dict[str, float]:
    """Median phase times and (export + write + update) / bound of `syncs` syncs, each after its own bound."""
    from async_rl.weight_sync import broadcast_group, sync_weights
    from rollout_workers.client import EngineClient

    rows = []
    async with EngineClient(url) as client, contextlib.AsyncExitStack() as stack:
        group = None
        if method == "distributed":
            group = await stack.enter_async_context(broadcast_group([client], trainer.device))
        for i in range(syncs + 1):
            trainer.version += 1
            seconds = bound()
            result = await sync_weights(trainer, [client], method, "in_place", weights_dir, group)
            if i:  # the first one warms up the allocator and the page cache
                rows.append({**{p: getattr(result, f"{p}_s") for p in PHASES}, "bound": seconds})
    medians = {name: statistics.median(row[name] for row in rows) for name in (*PHASES, "bound")}
    medians["ratio"] = statistics.median((row["export"] + row["write"] + row["update"]) / row["bound"] for row in rows)
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny:qwen2", help="model.spec (qwen2-0.5b for a real size)")
    parser.add_argument("--device", default="cpu", help="the trainer's device")
    parser.add_argument("--engine-device", default=None, help="the engine's device (default: --device)")
    parser.add_argument("--methods", default="disk,tensor")
    parser.add_argument("--syncs", type=int, default=5)
    parser.add_argument("--engine", default="embedded", choices=("embedded", "sglang"))
    parser.add_argument("--engine-args", default="", help="extra engine flags, one string")
    args = parser.parse_args()

    from async_rl.trainer.config import TrainerConfig, TrainerContext
    from async_rl.trainer.trainer import Trainer
    from rollout_workers.engine.model import resolve_model_spec
    from rollout_workers.launcher import EngineProcess, EngineSpec

    engine_device = args.engine_device or args.device
    model_dir = resolve_model_spec(args.model)
    trainer = Trainer(TrainerConfig(), TrainerContext(model_path=str(model_dir), device=args.device))
    size = sum(t.numel() * t.element_size() for _, t in trainer.named_tensors())
    spec = EngineSpec(
        kind=args.engine,
        model=str(model_dir),
        device=engine_device,
        extra_args=["--weight-version", "0", *shlex.split(args.engine_args)],
    )
    with tempfile.TemporaryDirectory(prefix="sync-cost-") as scratch, EngineProcess(spec) as engine:
        weights_dir = Path(scratch)
        chunk, into = memoryview(os.urandom(CHUNK)), memoryview(bytearray(CHUNK))
        bounds = {
            "disk": lambda: file_seconds(weights_dir, size, chunk, into) + host_crossing_seconds(size, args.device),
            "tensor": lambda: 2 * size / copy_bandwidth(size) + host_crossing_seconds(size, args.device),
            "cuda_ipc": lambda: 2 * size / copy_bandwidth(size, args.device),
        }
        if "distributed" in args.methods.split(","):
            broadcast = broadcast_seconds(size, args.device, engine_device)
            print(f"one broadcast of {size / 2**20:.1f} MiB {args.device} -> {engine_device}: {broadcast * 1e3:.1f} ms")
            bounds["distributed"] = lambda: broadcast
        print(
            f"model {args.model}, {size / 2**20:.1f} MiB of weights, {args.device}, {args.engine} engine; "
            f"medians of {args.syncs} syncs"
        )
        print(
            f"{'method':<8} {'export ms':>9} {'write ms':>8} {'pause ms':>8} {'update ms':>9} {'continue ms':>11} "
            f"{'bound ms':>8} {'(export+write+update)/bound':>28}"
        )
        totals = {}
        for method in args.methods.split(","):
            m = asyncio.run(measure(method, trainer, engine.url, weights_dir, args.syncs, bounds[method]))
            totals[method] = m["export"] + m["write"] + m["update"]
            print(
                f"{method:<8} {m['export'] * 1e3:>9.1f} {m['write'] * 1e3:>8.1f} {m['pause'] * 1e3:>8.1f} "
                f"{m['update'] * 1e3:>9.1f} {m['continue'] * 1e3:>11.1f} {m['bound'] * 1e3:>8.1f} {m['ratio']:>28.2f}"
            )
        first, *others = totals
        for other in others:  # side by side in this run: how many times longer the other method's sync takes
            print(f"(export+write+update) {other} / {first}: {totals[other] / totals[first]:.2f}")


if __name__ == "__main__":
    main()
