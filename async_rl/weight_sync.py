"""Push the trainer's new weights to every engine, all engines concurrently.

disk: one safetensors folder per version, loaded by each engine (update_weights_from_disk);
tensor: the weights in the request body (same host, no disk). Each engine is paused with
the configured mode around the update so no request mixes two versions mid-token.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

from rollout_workers.client import EngineClient

KEEP_SNAPSHOTS = 2  # the one engines load now, and the previous one a slow engine may still read


async def sync_weights(trainer, clients: list[EngineClient], method: str, pause_mode: str, weights_dir: Path) -> tuple[float, str]:
    """Returns (seconds from the trainer's state to every engine serving it, snapshot path or "")."""
    started = time.perf_counter()
    version = trainer.version
    path = ""
    if method == "disk":
        folder = await asyncio.to_thread(trainer.save_weights_for_engine, weights_dir / f"v{version}")
        path = str(folder)
        update = lambda client: client.update_weights_from_disk(path, weight_version=str(version))  # noqa: E731
    elif method == "tensor":
        tensors = dict(trainer.named_tensors())
        update = lambda client: client.update_weights_from_tensor(tensors, weight_version=str(version))  # noqa: E731
    else:
        raise ValueError(f"weight_sync.method={method!r} is not supported by this trainer (use disk or tensor)")

    async def one(client: EngineClient) -> None:
        if pause_mode != "in_place":
            await client.pause_generation(pause_mode)
        try:
            await update(client)
        finally:
            if pause_mode != "in_place":
                await client.continue_generation()

    async with asyncio.TaskGroup() as group:
        for client in clients:
            group.create_task(one(client))
    if method == "disk":
        _prune_snapshots(weights_dir, version)
    return time.perf_counter() - started, path


def _prune_snapshots(weights_dir: Path, version: int) -> None:
    for folder in weights_dir.glob("v*"):
        suffix = folder.name[1:]
        if suffix.isdigit() and int(suffix) <= version - KEEP_SNAPSHOTS:
            shutil.rmtree(folder, ignore_errors=True)
