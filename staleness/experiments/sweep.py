"""`async-rl sweep RECIPE --grid staleness=0,1,2,4,8 [--grid april.alpha=0,0.5] [--seeds N]`.

Each point of the grid product x seeds is a real `async-rl run` subprocess with its
own run.output_dir under the sweep folder: one after another here, or as Ray tasks
with --ray-address (the folder must then be on a filesystem every node shares).
Every point is validated by the recipe loader before anything runs, so a typo in a
grid key costs nothing. A status file per point (staleness.experiments.sweep_status) lets an
interrupted sweep resume: finished points are kept, crashed or interrupted ones run
again from scratch, and their failures stay on record for the report.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from async_rl.config import ConfigError, load_config, resolve_recipe
from async_rl.orchestrator import check_supported, run_argv
from staleness.experiments.sweep_status import Failure, PointStatus, StatusError, SweepLayout

GRID_ALIASES = {"staleness": "staleness.eta"}
# Keys the sweep sets itself for every point.
RESERVED_KEYS = {
    "run.output_dir": "the sweep gives each point its own folder (use --out)",
    "trainer.seed": "use --seeds",
    "task.seed": "use --seeds",
}
STOP_GRACE_S = 30.0  # the run's supervisor needs ~10 s to stop its components after SIGTERM
LOG_TAIL_LINES = 20
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._=+-]")


class SweepError(ValueError):
    """A sweep that cannot start: bad grid, bad recipe value, or a folder holding another sweep's points."""


class GridAxis(NamedTuple):
    key: str
    values: list[str]


class RunResult(NamedTuple):
    exit_code: int
    started: float  # time.time() on the machine that ran the point
    ended: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="recipe TOML path or bundled recipe name (e.g. tiny)")
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="a recipe key and its values (repeatable; the points are the product); "
        "'staleness' is short for staleness.eta",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="seeds per grid point: seed k adds k to the recipe's trainer.seed and task.seed",
    )
    parser.add_argument("--out", type=Path, help="sweep folder (default: runs/sweep-RECIPE)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value for every point (repeatable)",
    )
    parser.add_argument(
        "--ray-address",
        help="run points as Ray tasks on this cluster ('auto', 'local', 'ray://host:port'); needs `pip install ray`",
    )
    parser.add_argument("--ray-cpus-per-point", type=float, default=1.0, help="Ray CPUs reserved per point")
    parser.add_argument("--ray-gpus-per-point", type=float, default=0.0, help="Ray GPUs reserved per point")
    parser.add_argument("--report-only", type=Path, metavar="DIR", help="re-render DIR's report without running")


def main(args: argparse.Namespace) -> int:
    from staleness.experiments.report import write_report

    if args.report_only is not None:
        if args.config is not None or args.grid:
            print("error: --report-only DIR takes no recipe or --grid", file=sys.stderr)
            return 2
        if not SweepLayout(args.report_only).status.is_dir():
            print(f"error: {args.report_only} holds no sweep (no status/ folder)", file=sys.stderr)
            return 2
        try:
            print(f"report: {write_report(args.report_only)}")
        except StatusError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.config is None:
        print("error: give a recipe (or --report-only DIR)", file=sys.stderr)
        return 2
    try:
        config_path = str(resolve_recipe(args.config).resolve())
        points = plan_points(config_path, [parse_grid(spec) for spec in args.grid], args.seeds, args.overrides)
        if args.ray_address is not None:
            _import_ray()
    except (SweepError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    layout = SweepLayout(args.out or Path("runs") / f"sweep-{Path(config_path).stem}")
    layout.root.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with _exclusive(layout):
            try:
                pending = prepare(layout, points)
                print(
                    f"sweep {layout.root}: {len(points)} point(s), {len(points) - len(pending)} already done",
                    flush=True,
                )
                if args.ray_address is None:
                    run_sequentially(layout, pending)
                else:
                    run_on_ray(layout, pending, args.ray_address, args.ray_cpus_per_point, args.ray_gpus_per_point)
            finally:
                print(f"report: {write_report(layout.root)}", flush=True)
            failed = [point.name for point in points if not (layout.read_status(point.name) or point).done]
    except (SweepError, StatusError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sweep interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    if failed:
        print(f"{len(failed)} point(s) did not complete: {', '.join(failed)}; run again to retry them", file=sys.stderr)
    return 1 if failed else 0


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (a scheduler, `kill`) stops the sweep as cleanly as Ctrl-C: the running point is stopped and recorded."""
    raise KeyboardInterrupt


# ---- planning ------------------------------------------------------------------------------


def parse_grid(spec: str) -> GridAxis:
    """ "staleness=0,1,2" -> GridAxis("staleness.eta", ["0", "1", "2"])."""
    key, sep, raw = spec.partition("=")
    key = GRID_ALIASES.get(key.strip(), key.strip())
    values = [value.strip() for value in raw.split(",")]
    if not sep or not key or not all(values):
        raise SweepError(f"--grid {spec!r} must look like section.key=value1,value2,...")
    if key in RESERVED_KEYS:
        raise SweepError(f"--grid {key}: {RESERVED_KEYS[key]}")
    return GridAxis(key, values)


def plan_points(config_path: str, axes: list[GridAxis], seeds: int, overrides: list[str]) -> list[PointStatus]:
    """Every point's full override list, each checked by the recipe loader exactly as `async-rl run` will."""
    if seeds < 1:
        raise SweepError(f"--seeds {seeds} must be >= 1")
    keys = [axis.key for axis in axes]
    if len(set(keys)) != len(keys):
        raise SweepError(f"a --grid key is given twice: {keys}")
    for override in overrides:
        if (key := override.partition("=")[0].strip()) == "run.output_dir":
            raise SweepError(f"--set {override}: {RESERVED_KEYS[key]}")
    base = load_config(config_path, overrides)
    points = []
    for values in itertools.product(*(axis.values for axis in axes)):
        settings = dict(zip(keys, values))
        for k in range(seeds):
            seed = base.trainer.seed + k
            point_overrides = [
                *overrides,
                *(f"{key}={value}" for key, value in settings.items()),
                f"trainer.seed={seed}",
                f"task.seed={base.task.seed + k}",
            ]
            name = point_name(settings, seed)
            try:
                check_supported(load_config(config_path, point_overrides))
            except ConfigError as exc:
                raise SweepError(f"point {name}: {exc}") from None
            points.append(
                PointStatus(name=name, settings=settings, seed=seed, config=config_path, overrides=point_overrides)
            )
    if len({point.name for point in points}) != len(points):
        raise SweepError("two grid points map to the same folder name; use values that differ in letters or digits")
    return points


def point_name(settings: dict[str, str], seed: int) -> str:
    parts = [f"{key}={value}" for key, value in settings.items()] + [f"seed={seed}"]
    return _UNSAFE_NAME_CHARS.sub("_", "__".join(parts))


def prepare(layout: SweepLayout, points: list[PointStatus]) -> list[PointStatus]:
    """The points still to run, each carrying its recorded history; refuses (before writing anything)
    a folder whose point of the same name was run with other settings: its results would be mislabelled."""
    recorded = {point.name: layout.read_status(point.name) for point in points}
    for point in points:
        if (old := recorded[point.name]) is not None and (old.config, old.overrides) != (point.config, point.overrides):
            raise SweepError(
                f"{layout.status_path(point.name)} was run with {old.config} {old.overrides}, "
                f"not {point.config} {point.overrides}: use another --out, or delete that point"
            )
    pending = []
    for point in points:
        status = recorded[point.name]
        if status is None:
            layout.write_status(point)
            status = point
        elif status.state == "running":  # the sweep process died while this point ran
            _record_failure(layout, status, None, "the sweep stopped while this point was running")
        if not status.done:
            pending.append(status)
    return pending


@contextlib.contextmanager
def _exclusive(layout: SweepLayout):
    """One sweep process per folder: two would run and wipe each other's points."""
    with open(layout.root / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepError(f"another sweep is running in {layout.root}") from None
        yield


# ---- running -------------------------------------------------------------------------------


def run_point_process(argv: list[str], log_path: str) -> RunResult:
    """One `async-rl run` to its end, in the sweep process or in a Ray worker.

    The run gets its own session, so the user's Ctrl-C reaches only the sweep, which then
    stops the run exactly once (a second signal makes the run's supervisor SIGKILL everything).
    """
    started = time.time()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        try:
            exit_code = process.wait()
        except BaseException:  # KeyboardInterrupt, or Ray cancelling the task
            _stop(process)
            raise
    return RunResult(exit_code, started, time.time())


def _stop(process: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGTERM):  # the second skips the supervisor's grace period
        process.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=STOP_GRACE_S)
            return
    process.kill()
    process.wait()


def _start_attempt(layout: SweepLayout, status: PointStatus) -> tuple[list[str], str]:
    """Mark the point running and give it a clean run folder (a crashed run's half-written state is dropped)."""
    run_dir = layout.run_dir(status.name)
    shutil.rmtree(run_dir, ignore_errors=True)
    layout.logs.mkdir(parents=True, exist_ok=True)
    status.attempts += 1
    status.state, status.exit_code, status.started, status.ended = "running", None, None, None
    layout.write_status(status)
    return run_argv(status.config, run_dir, status.overrides), str(layout.log_path(status.name, status.attempts))


def _finish_attempt(layout: SweepLayout, status: PointStatus, result: RunResult) -> None:
    status.started, status.ended, status.exit_code = result.started, result.ended, result.exit_code
    if result.exit_code in (0, 124):  # 124: stopped at run.max_wall_s, as configured
        status.state = "finished" if result.exit_code == 0 else "timed_out"
        layout.write_status(status)
    else:
        log = layout.log_path(status.name, status.attempts)
        _record_failure(layout, status, result.exit_code, _tail(log))
    print(
        f"{status.name}: {status.state} (exit {result.exit_code}) in {result.ended - result.started:.1f} s", flush=True
    )


def _record_failure(layout: SweepLayout, status: PointStatus, exit_code: int | None, message: str) -> None:
    log = layout.log_path(status.name, status.attempts).relative_to(layout.root)
    status.failures = [
        *status.failures,
        Failure(attempt=status.attempts, exit_code=exit_code, message=message, log=str(log)),
    ]
    status.state, status.exit_code = "failed", exit_code
    layout.write_status(status)


def _tail(path: Path | str) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(lines[-LOG_TAIL_LINES:])


def run_sequentially(layout: SweepLayout, pending: list[PointStatus]) -> None:
    for index, status in enumerate(pending, 1):
        argv, log = _start_attempt(layout, status)
        print(f"[{index}/{len(pending)}] {status.name}  (log {log})", flush=True)
        try:
            result = run_point_process(argv, log)
        except KeyboardInterrupt:
            _record_failure(layout, status, None, "interrupted by the user")
            raise
        _finish_attempt(layout, status, result)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise SweepError("--ray-address needs Ray: pip install 'ray[default]'") from None
    return ray


def run_on_ray(layout: SweepLayout, pending: list[PointStatus], address: str, cpus: float, gpus: float) -> None:
    """All pending points at once as Ray tasks; the cluster's resources decide how many run together."""
    ray = _import_ray()
    ray.init(address=address)
    try:
        task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(run_point_process)
        running = {}
        for status in pending:
            argv, log = _start_attempt(layout, status)
            running[task.remote(argv, log)] = status
        print(f"submitted {len(running)} point(s) to Ray at {address}", flush=True)
        try:
            while running:
                ready, _ = ray.wait(list(running), num_returns=1)
                status = running.pop(ready[0])
                try:
                    _finish_attempt(layout, status, ray.get(ready[0]))
                except ray.exceptions.RayError as exc:  # the worker or its node died
                    _record_failure(layout, status, None, f"Ray task failed: {exc}")
        except KeyboardInterrupt:
            for ref, status in running.items():
                ray.cancel(ref)
                _record_failure(layout, status, None, "interrupted by the user")
            raise
    finally:
        ray.shutdown()
