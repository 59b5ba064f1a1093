"""Weight sync cost per phase against the bound of its path, side by side in one run.

A real trainer and a real embedded engine process; each method syncs --syncs times after one
warm-up (no request in flight: the phases themselves). The bound of a path is its bytes over the
bandwidth measured here, on the same folder and tensors, in the same run:
- disk: write the snapshot (safetensors, as the export does) + read it back (as the engine does):
  bytes / write bandwidth + bytes / read bandwidth of a plain file of the same size;
- tensor: the payload is encoded once and decoded once: 2 x bytes / copy bandwidth (torch clone).
The ratio is (export + update) / bound; pause and continue are reported beside it.

    .venv/bin/python benchmarks/weight_sync_cost.py [--model tiny:qwen2] [--methods disk,tensor] [--syncs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path


def file_bandwidths(folder: Path, size: int) -> tuple[float, float]:
    """(write, read) bytes/s of one plain file of `size` bytes in `folder` (page cache, as the sync sees it)."""
    data = os.urandom(size)
    path = folder / "bandwidth.bin"
    started = time.perf_counter()
    with path.open("wb") as out:
        out.write(data)
    written = time.perf_counter() - started
    started = time.perf_counter()
    assert len(path.read_bytes()) == size
    read = time.perf_counter() - started
    path.unlink()
    return size / written, size / read


def copy_bandwidth(size: int) -> float:
    import torch

    source = torch.empty(size, dtype=torch.uint8)
    source.clone()  # warm-up
    started = time.perf_counter()
    source.clone()
    return size / (time.perf_counter() - started)


async def measure(method: str, trainer, url: str, weights_dir: Path, syncs: int) -> dict[str, float]:
    from async_rl.weight_sync import sync_weights
    from rollout_workers.client import EngineClient

    results = []
    async with EngineClient(url) as client:
        for i in range(syncs + 1):
            trainer.version += 1
            result = await sync_weights(trainer, [client], method, "in_place", weights_dir)
            if i:  # the first one warms up the allocator and the page cache
                results.append(result)
    return {
        phase: statistics.median(getattr(r, f"{phase}_s") for r in results)
        for phase in ("export", "pause", "update", "continue")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny:qwen2", help="model.spec (qwen2-0.5b for a real size)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", default="disk,tensor")
    parser.add_argument("--syncs", type=int, default=5)
    args = parser.parse_args()

    from async_rl.trainer.config import TrainerConfig, TrainerContext
    from async_rl.trainer.trainer import Trainer
    from rollout_workers.engine.model import resolve_model_spec
    from rollout_workers.launcher import EngineProcess, EngineSpec

    model_dir = resolve_model_spec(args.model)
    trainer = Trainer(TrainerConfig(), TrainerContext(model_path=str(model_dir), device=args.device))
    size = sum(t.numel() * t.element_size() for _, t in trainer.named_tensors())
    spec = EngineSpec(model=str(model_dir), device=args.device, extra_args=["--weight-version", "0"])
    with tempfile.TemporaryDirectory(prefix="sync-cost-") as scratch, EngineProcess(spec) as engine:
        weights_dir = Path(scratch)
        write_bw, read_bw = file_bandwidths(weights_dir, size)
        copy_bw = copy_bandwidth(size)
        bounds = {"disk": size / write_bw + size / read_bw, "tensor": 2 * size / copy_bw}
        print(f"model {args.model}, {size / 2**20:.1f} MiB of weights, {args.device}; medians of {args.syncs} syncs")
        print(
            f"measured: file write {write_bw / 2**30:.2f} GiB/s, read {read_bw / 2**30:.2f} GiB/s, "
            f"copy {copy_bw / 2**30:.2f} GiB/s"
        )
        print(
            f"{'method':<8} {'export ms':>9} {'pause ms':>8} {'update ms':>9} {'continue ms':>11} "
            f"{'bound ms':>8} {'(export+update)/bound':>22}"
        )
        for method in args.methods.split(","):
            phases = asyncio.run(measure(method, trainer, engine.url, weights_dir, args.syncs))
            ratio = (phases["export"] + phases["update"]) / bounds[method]
            print(
                f"{method:<8} {phases['export'] * 1e3:>9.1f} {phases['pause'] * 1e3:>8.1f} "
                f"{phases['update'] * 1e3:>9.1f} {phases['continue'] * 1e3:>11.1f} "
                f"{bounds[method] * 1e3:>8.1f} {ratio:>22.2f}"
            )


if __name__ == "__main__":
    main()
