"""Engine health for `async-rl run`: an engine that stops answering /health_generate is killed.

The supervisor restarts what died, but a hung engine (deadlocked, stopped, its GPU wedged) does
not die. Every `health_interval_s` each engine gets one /health_generate with a deadline; after
`health_failures` missed deadlines in a row it is SIGKILLed, so the supervisor restarts it (from
the newest weights) and the workers route around it until it serves the current version. Only
missed deadlines count: an engine that refuses connections is dead or starting, which the
supervisor handles, and like a restarted one it is watched again once it has answered once (its
start-up is not a hang).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from pathlib import Path

from async_rl.config import EngineConfig
from rollout_workers.client import EngineClient, EngineClientError, EngineConnectionError
from rollout_workers.engine_registry import follow_moved

log = logging.getLogger("engine_monitor")


async def monitor_engines(config: EngineConfig, urls: list[str], kill, run_dir: Path) -> None:
    """Runs until cancelled; `kill(name)` is the supervisor's. An engine restarted elsewhere is
    followed through the run's engine registry."""
    new_client = functools.partial(EngineClient, api_key=config.api_key, read_retries=0)
    clients = [new_client(url) for url in urls]
    missed = [0] * len(urls)
    watched = [True] * len(urls)  # False from a kill until the restarted engine first answers
    try:
        while True:
            await asyncio.sleep(config.health_interval_s)
            await follow_moved(clients, run_dir, new_client)
            answers = await asyncio.gather(*(_answers(client, config.health_timeout_s) for client in clients))
            for i, answer in enumerate(answers):
                if answer == "ok":
                    missed[i], watched[i] = 0, True
                    continue
                if answer == "unreachable":
                    missed[i], watched[i] = 0, False
                if not watched[i]:
                    continue
                missed[i] += 1
                if missed[i] >= config.health_failures:
                    print(
                        f"engine{i} ({clients[i].url}) missed {missed[i]} /health_generate deadlines of "
                        f"{config.health_timeout_s:g} s: killing it to restart it",
                        flush=True,
                    )
                    kill(f"engine{i}")
                    missed[i], watched[i] = 0, False
    finally:
        for client in clients:
            await client.close()


async def _answers(client: EngineClient, timeout_s: float) -> str:
    """ok | unreachable (nothing listens: dead or starting) | missed (no answer in time, or an error)."""
    try:
        await client.health_generate(timeout_s=timeout_s)
    except EngineConnectionError as exc:
        log.info("%s: %s", client.url, exc)
        return "unreachable"
    except EngineClientError as exc:
        log.info("%s: %s", client.url, exc)
        return "missed"
    return "ok"
