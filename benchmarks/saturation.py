"""How close a finished run came to its limits: the engine-saturated and trainer-saturated rates.

- Engine-saturated: the run's engines (started as the run starts them) generate the run's kind of
  groups (its prompts, sample plan and lengths) with as many groups in flight as its admission
  allows ((eta + 1) x groups_per_step), nothing else running: complete samples per second.
- Trainer-saturated: a fresh trainer trains, back to back, on the batches the run's buffer served
  (read from its write-ahead log): samples per second of train_step alone.
- The run's own trained samples/s divided by min(the two), or, where engines and trainer share one
  GPU, by their harmonic combination 1 / (1/E + 1/T) (on a CPU the run gives each its own cores).
- Engine busy fraction (rollout_metrics.jsonl) and trainer idle fraction (1 - train step time / wall)
  over the same window.

    .venv/bin/python benchmarks/saturation.py RUN_DIR [--groups 64] [--steps 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from pathlib import Path

import msgspec

from async_rl.config import RunConfig, read_run_config
from async_rl.metrics import read_metrics
from async_rl.trace import Tracer

SKIP = 2  # steps of warm-up not counted, as in the run-level benchmarks


class Limits(msgspec.Struct, frozen=True):
    run_samples_s: float
    engine_samples_s: float
    trainer_samples_s: float
    colocated: bool
    engine_busy: float
    trainer_idle: float

    @property
    def bound_samples_s(self) -> float:
        e, t = self.engine_samples_s, self.trainer_samples_s
        return 1.0 / (1.0 / e + 1.0 / t) if self.colocated else min(e, t)

    @property
    def ratio(self) -> float:
        return self.run_samples_s / self.bound_samples_s

    def describe(self) -> str:
        how = "harmonic (shared device)" if self.colocated else "min (separate devices)"
        return (
            f"run {self.run_samples_s:.1f} samples/s, engine-saturated {self.engine_samples_s:.1f}, "
            f"trainer-saturated {self.trainer_samples_s:.1f}, bound {self.bound_samples_s:.1f} [{how}]: "
            f"run / bound = {self.ratio:.2f}; engine busy {self.engine_busy:.2f}, trainer idle {self.trainer_idle:.2f}"
        )


def run_window(run_dir: Path) -> tuple[float, float, float]:
    """(trained samples/s, trainer idle fraction, window start time) between the 3rd and the last step."""
    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if "samples" in r][SKIP:]
    if len(steps) < 2:
        raise RuntimeError(f"{run_dir}: too few steps logged")
    wall = steps[-1]["time"] - steps[0]["time"]
    trained = sum(r["samples"] for r in steps[1:]) / wall
    idle = 1.0 - sum(r["step_seconds"] for r in steps[1:]) / wall
    return trained, idle, steps[0]["time"]


def engine_busy(run_dir: Path, since: float) -> float:
    lines = [line for line in read_metrics(run_dir / "rollout_metrics.jsonl") if line["time"] > since]
    return sum(line["rollout/engine_busy_fraction"] for line in lines) / max(len(lines), 1)


async def engine_saturated(config: RunConfig, groups: int) -> float:
    """Complete samples per second of the run's engines generating alone."""
    from async_rl.orchestrator import engine_spec, thread_env
    from rollout_workers.engine.model import resolve_model_spec, vocab_size_of
    from rollout_workers.generate import RolloutPlugins, encode_prompt, load_tokenizer
    from rollout_workers.group import GroupRollout, drive
    from rollout_workers.launcher import EngineProcess
    from rollout_workers.rollout_metrics import RolloutMetrics
    from rollout_workers.tasks import task_samples
    from rollout_workers.worker import EnginePool

    model_dir = resolve_model_spec(config.model.spec)
    tokenizer = load_tokenizer(model_dir)
    plan = RolloutPlugins.from_config(config.rollout).plan
    if plan is None:
        raise ValueError("engine saturation drives groups itself: the recipe needs a sample plan, not rollout.generate")
    rollout = config.rollout
    params = {"max_new_tokens": rollout.max_new_tokens, "temperature": rollout.temperature, "top_p": rollout.top_p}
    tasks = task_samples(config.task)
    in_flight = (config.staleness.eta + 1) * config.trainer.groups_per_step
    with contextlib.ExitStack() as stack:
        engines = [
            stack.enter_context(
                EngineProcess(engine_spec(config, model_dir, 0, i), env=thread_env(config.engine.count))
            )
            for i in range(config.engine.count)
        ]
        pool = EnginePool([e.url for e in engines], config.engine.api_key, vocab_size_of(model_dir))
        metrics = RolloutMetrics(Path(config.run.output_dir) / "saturation", 0, len(engines), in_flight, Tracer(None))
        todo = [
            GroupRollout(
                group_id=f"sat-g{n}",
                task=task,
                prompt_ids=encode_prompt(tokenizer, task.prompt, rollout.chat_template),
                params=plan(params, rollout.group_size),
                samples=[None] * rollout.group_size,
            )
            for n, task in zip(range(groups + in_flight), tasks, strict=False)
        ]
        gate = asyncio.Semaphore(in_flight)

        async def one(group: GroupRollout) -> None:
            async with gate:
                await drive(group, pool, metrics)

        try:
            await asyncio.gather(*(one(g) for g in todo[:in_flight]))  # warm-up: kernels, caches
            started = time.perf_counter()
            await asyncio.gather(*(one(g) for g in todo[in_flight:]))
            elapsed = time.perf_counter() - started
        finally:
            await pool.close()
    return groups * rollout.group_size / elapsed


def trainer_saturated(config: RunConfig, run_dir: Path, steps: int) -> float:
    """Samples per second of train_step alone, on the batches the run trained on."""
    import torch

    from async_rl.orchestrator import thread_env
    from async_rl.trainer.trainer import Trainer
    from async_rl.trainer_main import trainer_context
    from buffer.inspect import served_at_versions
    from rollout_workers.engine.model import resolve_model_spec

    batches = [batch for _, batch in served_at_versions(run_dir / "buffer")]
    if len(batches) < steps + 1:
        raise RuntimeError(f"{run_dir}: {len(batches)} served batches, need {steps + 1}")
    context = msgspec.structs.replace(
        trainer_context(config, resolve_model_spec(config.model.spec)), ckpt_dir="", max_staleness=None
    )
    if threads := thread_env(config.engine.count).get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(threads))  # as many as the run's trainer process has
    trainer = Trainer(config.trainer, context)
    trainer.train_step(batches[0])  # warm-up
    started = time.perf_counter()
    samples = 0
    for batch in batches[1 : steps + 1]:
        trainer.train_step(batch)
        samples += len(batch)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    return samples / (time.perf_counter() - started)


def measure(run_dir: Path, groups: int, steps: int) -> Limits:
    config = read_run_config(run_dir / "config.json")
    trained, idle, since = run_window(run_dir)
    trainer_device = config.trainer.device or config.model.device
    engine_device = config.engine.device or config.model.device
    return Limits(
        run_samples_s=trained,
        engine_samples_s=asyncio.run(engine_saturated(config, groups)),
        trainer_samples_s=trainer_saturated(config, run_dir, steps),
        colocated=trainer_device == engine_device and trainer_device.startswith("cuda"),
        engine_busy=engine_busy(run_dir, since),
        trainer_idle=idle,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished `async-rl run` folder")
    parser.add_argument("--groups", type=int, default=64, help="groups generated for the engine-saturated rate")
    parser.add_argument("--steps", type=int, default=10, help="train steps for the trainer-saturated rate")
    args = parser.parse_args()
    print(measure(args.run_dir, args.groups, args.steps).describe())


if __name__ == "__main__":
    main()
