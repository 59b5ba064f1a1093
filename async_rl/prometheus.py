"""The run's Prometheus endpoint on the orchestrator (prometheus-client), read at scrape time.

What it shows comes from what the orchestrator already follows: the supervisor (each component's
up/restarts), the trainer's newest metrics.jsonl line (version, staleness, throughput, reward,
weight sync), each worker's newest rollout_metrics.jsonl line (tokens, engine busy fraction) and
the buffer's StatsRequest answer, polled every few seconds (depth by kind). Nothing is pushed: a
scrape reads the latest of each, so a slow scraper costs the run nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from async_rl.messages import BufferStats

log = logging.getLogger(__name__)
PREFIX = "async_rl"
# metrics.jsonl key -> (metric name, help)
STEP_GAUGES = {
    "version": ("trainer_version", "Policy version the trainer has published."),
    "staleness/mean": ("staleness_mean", "Mean staleness (trainer version - oldest token version) of the last batch."),
    "staleness/max": ("staleness_max", "Largest staleness in the last batch."),
    "throughput/samples_per_s": ("trained_samples_per_second", "Samples trained per second, last step."),
    "throughput/tokens_per_s": ("train_tokens_per_second", "Tokens trained per second, last step."),
    "reward/mean": ("reward_mean", "Mean reward of the last batch."),
    "weight_sync/seconds": ("weight_sync_seconds", "Duration of the last weight sync."),
    "buffer/dropped_stale": ("batch_dropped_stale_samples", "Samples dropped as stale while the last batch waited."),
}
ROLLOUT_COUNTERS = {
    "rollout/tokens_generated": ("rollout_tokens_generated", "Tokens the worker's engines generated."),
    "rollout/tokens_recycled": ("rollout_tokens_recycled", "Tokens of aborted requests kept and continued."),
    "rollout/tokens_wasted": ("rollout_tokens_wasted", "Tokens generated for groups that were dropped."),
    "rollout/groups_completed": ("rollout_groups_completed", "Complete groups the worker sent."),
}
ROLLOUT_GAUGES = {
    "rollout/engine_busy_fraction": ("engine_busy_fraction", "Share of the last interval the engines were generating."),
}
BUFFER_GAUGES = {
    "stored": ("buffer_stored_samples", "Finished samples in the buffer."),
    "complete_groups": ("buffer_complete_groups", "Groups ready to serve."),
    "incomplete_groups": ("buffer_incomplete_groups", "Groups still waiting for members."),
    "partials": ("buffer_partial_samples", "Retracted partial rollouts in the pool."),
}


class RunCollector(Collector):
    """Builds every metric family from the newest state at each scrape."""

    def __init__(self) -> None:
        self.components: Callable[[], dict[str, tuple[bool, int]]] = dict  # name -> (running, restarts)
        self.step: dict[str, Any] = {}
        self.rollout: dict[str, dict[str, Any]] = {}  # worker -> its newest line
        self.buffer: BufferStats | None = None

    def on_step(self, record: dict[str, Any]) -> None:
        self.step = record

    def on_rollout(self, record: dict[str, Any]) -> None:
        self.rollout[f"worker{record.get('worker', 0)}"] = record

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        up = GaugeMetricFamily(f"{PREFIX}_component_up", "1 while the component's process runs.", labels=["component"])
        restarts = CounterMetricFamily(
            f"{PREFIX}_component_restarts", "Times the supervisor restarted the component.", labels=["component"]
        )
        for name, (running, count) in sorted(self.components().items()):
            up.add_metric([name], float(running))
            restarts.add_metric([name], count)
        yield up
        yield restarts
        for key, (name, text) in STEP_GAUGES.items():
            if isinstance(value := self.step.get(key), (int, float)):
                yield GaugeMetricFamily(f"{PREFIX}_{name}", text, value=value)
        for table, family in ((ROLLOUT_COUNTERS, CounterMetricFamily), (ROLLOUT_GAUGES, GaugeMetricFamily)):
            for key, (name, text) in table.items():
                metric = family(f"{PREFIX}_{name}", text, labels=["worker"])
                for worker, record in sorted(self.rollout.items()):
                    if isinstance(value := record.get(key), (int, float)):
                        metric.add_metric([worker], value)
                yield metric
        if self.buffer is not None:
            for key, (name, text) in BUFFER_GAUGES.items():
                yield GaugeMetricFamily(f"{PREFIX}_{name}", text, value=getattr(self.buffer, key))
            yield CounterMetricFamily(
                f"{PREFIX}_buffer_dropped_stale_samples",
                "Samples the buffer dropped as stale.",
                value=self.buffer.dropped_stale,
            )

    async def poll_buffer(self, serve: str, curve=None, interval_s: float = 5.0) -> None:
        """Keep `buffer` fresh; while the buffer is down (restarting) the last answer stays.
        `curve`: the run's client keys where the buffer is secured."""
        from async_rl.transport import BufferClient

        while True:
            try:
                async with BufferClient(serve, curve=curve) as client:
                    while True:
                        self.buffer = await client.stats(timeout=interval_s)
                        await asyncio.sleep(interval_s)
            except Exception as exc:  # a metrics poll must never end the run
                log.debug("buffer stats for Prometheus: %s", exc)
                await asyncio.sleep(interval_s)


def serve_metrics(collector: RunCollector, host: str, port: int) -> tuple[Callable[[], None], int]:
    """Start the HTTP endpoint (its own thread); returns (stop, the bound port)."""
    from prometheus_client import start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    server, thread = start_http_server(port, addr=host, registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop, server.server_address[1]
