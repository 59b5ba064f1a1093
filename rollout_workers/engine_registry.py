"""Where a run's engines listen now: RUN_DIR/engines.json, rewritten when one restarts elsewhere.

On one machine an engine restarts at its address. On a Ray cluster its bundle may be re-placed on
another node, where it listens at another address; the orchestrator then rewrites this file, and
every component that talks to engines (keeping its clients by engine index) looks here when one
stops answering (`follow_moved`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import msgspec

from rollout_workers.client import EngineClient

REGISTRY_NAME = "engines.json"


def write_engine_urls(run_dir: Path, urls: list[str]) -> None:
    """Replace the registry atomically: a reader sees the old list or the new one, never half."""
    path = run_dir / REGISTRY_NAME
    staging = path.with_name(f".{REGISTRY_NAME}.tmp")
    staging.write_bytes(msgspec.json.encode(urls))
    os.replace(staging, path)


def read_engine_urls(run_dir: Path) -> list[str] | None:
    """The registry's URLs; None where there is none (a component started outside `async-rl run`)."""
    try:
        return msgspec.json.decode((run_dir / REGISTRY_NAME).read_bytes(), type=list[str])
    except FileNotFoundError:
        return None


async def follow_moved(
    clients: list[EngineClient], run_dir: Path, new_client: Callable[[str], EngineClient]
) -> list[int]:
    """Replace, in place, the clients whose engine the registry now puts elsewhere; their indices."""
    urls = read_engine_urls(run_dir)
    if urls is None or len(urls) != len(clients):
        return []
    moved = [i for i, (client, url) in enumerate(zip(clients, urls)) if client.url != url]
    for i in moved:
        old, clients[i] = clients[i], new_client(urls[i])
        await old.close()
    return moved
