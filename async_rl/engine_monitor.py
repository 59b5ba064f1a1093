"""Engine health for `async-rl run`: an engine that stops answering /health_generate is killed.

The supervisor restarts what died, but a hung engine (deadlocked, stopped, its GPU wedged) does
not die. Every `health_interval_s` each engine gets one /health_generate with a deadline; after
`health_failures` missed deadlines in a row it is SIGKILLed, so the supervisor restarts it (from
the newest weights) and the workers route around it until it serves the current version. A
restarted engine is watched again once it has answered once: its start-up is not a hang.
"""

from __future__ import annotations

import asyncio
import logging

from async_rl.config import EngineConfig
from rollout_workers.client import EngineClient, EngineClientError

log = logging.getLogger("engine_monitor")


async def monitor_engines(config: EngineConfig, urls: list[str], kill) -> None:
    """Runs until cancelled; `kill(name)` is the supervisor's."""
    clients = [EngineClient(url, api_key=config.api_key, read_retries=0) for url in urls]
    missed = [0] * len(urls)
    watched = [True] * len(urls)  # False from a kill until the restarted engine first answers
    try:
        while True:
            await asyncio.sleep(config.health_interval_s)
            answers = await asyncio.gather(*(_answers(client, config.health_timeout_s) for client in clients))
            for i, ok in enumerate(answers):
                if ok:
                    missed[i], watched[i] = 0, True
                    continue
                if not watched[i]:
                    continue
                missed[i] += 1
                if missed[i] >= config.health_failures:
                    print(
                        f"engine{i} ({urls[i]}) missed {missed[i]} /health_generate deadlines of "
                        f"{config.health_timeout_s:g} s: killing it to restart it",
                        flush=True,
                    )
                    kill(f"engine{i}")
                    missed[i], watched[i] = 0, False
    finally:
        for client in clients:
            await client.close()


async def _answers(client: EngineClient, timeout_s: float) -> bool:
    try:
        await client.health_generate(timeout_s=timeout_s)
    except EngineClientError as exc:
        log.info("%s: %s", client.url, exc)
        return False
    return True
