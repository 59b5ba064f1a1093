"""Start a run's component processes, watch them, and stop them all together.

Each child runs in its own process group (its own session), so stopping it also
stops anything it spawned, and a terminal's Ctrl-C reaches only the supervisor,
which then shuts children down in order: SIGTERM to the group, a grace period,
SIGKILL. Every child writes to its own log file. A child that dies unexpectedly is
started again (same command, log appended) while its restart budget lasts, after a backoff
that doubles per restart; once the budget is spent the run stops and the report names it
with its exit code and the tail of its log.

Where a child runs is the spawner's business: `spawn_local` (a subprocess of this one) by
default, a Ray actor on a cluster node for `async-rl run --ray-address` (async_rl/ray_cluster.py);
everything above — restarts, ordering, reports — is the same code for both.

    async with Supervisor(run_dir / "logs") as supervisor:
        await supervisor.start(ProcessSpec(name="buffer", argv=[...]))
        await supervisor.guard(wait_until_healthy(...))   # raises ChildFailed if a child dies meanwhile
        await supervisor.start(ProcessSpec(name="trainer", argv=[...], finishes_run=True))
        outcome = await supervisor.wait()
    # leaving the block stops and reaps every child
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import msgspec

LOG_TAIL_LINES = 40
COMPONENT_ENV = "ASYNC_RL_COMPONENT"  # every child learns its name (stack dumps are named by it)
RESTARTS_ENV = "ASYNC_RL_RESTARTS"  # and how often it was started again (0 on its first start)
NODE_ADDRESS_ENV = "ASYNC_RL_NODE_ADDRESS"  # on a cluster: its node's address, to bind and advertise
T = TypeVar("T")


class RestartPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How a child that exits unexpectedly is started again (run.max_restarts and its neighbours)."""

    max_restarts: int = 0  # unexpected exits survived within window_s; one more ends the run
    backoff_s: float = 1.0  # wait before the first restart; doubles with each recent one (at most 30 s)
    window_s: float = 3600.0  # restarts longer ago than this no longer count


class ProcessSpec(msgspec.Struct, frozen=True, kw_only=True):
    name: str  # unique; also the log file's name
    argv: list[str]
    env: dict[str, str] = {}  # added to (and overriding) the supervisor's environment
    cwd: str | None = None
    # True for the component whose clean exit means the run is done (the trainer after its
    # last step); any other exit, of any child, is a failure.
    finishes_run: bool = False
    # Stopped (and gone) before the others: a component that uses them (a rollout worker) then does
    # not see its requests aborted by engines going down first.
    stop_early: bool = False
    restart: RestartPolicy = RestartPolicy()
    # Further processes of the same component (its ranks on other nodes), each with its own name and
    # log: started, stopped and restarted with it as one child, since a torch.distributed group cannot
    # lose a member. The first of them to fail ends them all.
    members: list[ProcessSpec] = []


class ChildExit(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    returncode: int  # negative: killed by that signal
    log_path: str
    log_tail: list[str]

    def describe(self) -> str:
        if self.returncode < 0:
            how = f"was killed by {signal.Signals(-self.returncode).name}"
        else:
            how = f"exited with code {self.returncode}"
        tail = "\n".join(f"    {line}" for line in self.log_tail) or "    (log is empty)"
        return f"component {self.name!r} {how}; last {len(self.log_tail)} lines of {self.log_path}:\n{tail}"


class RunOutcome(msgspec.Struct, frozen=True, kw_only=True):
    status: Literal["finished", "failed", "interrupted", "timed_out", "hung"]
    message: str
    child: ChildExit | None = None

    @property
    def exit_code(self) -> int:
        """For a CLI: 0 finished, 1 a component failed, 130 interrupted, 124 timed out, 3 hung (watchdog)."""
        return {"finished": 0, "failed": 1, "interrupted": 130, "timed_out": 124, "hung": 3}[self.status]


class RunEnded(RuntimeError):
    """The run ended (signal, wall-clock limit) while something was still being awaited."""

    def __init__(self, outcome: RunOutcome):
        super().__init__(outcome.message)
        self.outcome = outcome


class ChildFailed(RunEnded):
    """A component died; `child` has its exit code and log tail."""

    def __init__(self, outcome: RunOutcome):
        super().__init__(outcome)
        self.child = outcome.child


MAX_BACKOFF_S = 30.0


class ChildProcess(Protocol):
    """A started child, wherever it runs: the leader of its own process group."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None:
        """None while running; negative: killed by that signal."""

    async def wait(self) -> int: ...

    def signal_group(self, sig: signal.Signals) -> None:
        """Send `sig` to the child's whole process group (what it spawned too); no-op once gone."""


Spawner = Callable[[ProcessSpec, Path, int], Awaitable[ChildProcess]]
"""Starts `spec` with its output appended to the log path, told it is its Nth restart."""

# How long the other members of a component may take to finish after one exited cleanly.
MEMBERS_FINISH_S = 30.0


class MemberGroup:
    """A component of several processes (ProcessSpec.members) as one child: it exits when the first of
    them fails (the others are killed, with what they spawned) or when all have finished."""

    def __init__(self, processes: list[ChildProcess]):
        self.processes = processes
        self._exit = asyncio.ensure_future(self._await_exit())

    @property
    def pid(self) -> int:
        return self.processes[0].pid

    @property
    def returncode(self) -> int | None:
        return self._exit.result() if self._exit.done() else None

    async def _await_exit(self) -> int:
        exits = [asyncio.ensure_future(process.wait()) for process in self.processes]
        pending = set(exits)
        code = 0
        while pending and code == 0:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            code = next((task.result() for task in done if task.result() != 0), 0)
            if code == 0 and pending:  # one finished: the rest should follow shortly
                done, pending = await asyncio.wait(pending, timeout=MEMBERS_FINISH_S)
                code = next((task.result() for task in done if task.result() != 0), 0)
                if pending and code == 0:
                    code = -signal.SIGKILL  # a member that does not finish with the others hangs
        self.signal_group(signal.SIGKILL)
        await asyncio.gather(*exits)
        return code

    async def wait(self) -> int:
        return await asyncio.shield(self._exit)

    def signal_group(self, sig: signal.Signals) -> None:
        for process in self.processes:
            process.signal_group(sig)


async def spawn_members(spawn: Spawner, spec: ProcessSpec, log_path: Path, restarts: int) -> ChildProcess:
    """`spec` alone, or with its members (each logging beside it under its own name) as one MemberGroup."""
    if not spec.members:
        return await spawn(spec, log_path, restarts)
    processes: list[ChildProcess] = []
    try:
        for member in (spec, *spec.members):
            member_log = log_path if member is spec else log_path.with_name(f"{member.name}.log")
            processes.append(await spawn(member, member_log, restarts))
    except BaseException:
        for process in processes:
            process.signal_group(signal.SIGKILL)
        raise
    return MemberGroup(processes)


class LocalProcess:
    """A child process of this one, in its own session (so its group can be signalled)."""

    def __init__(self, process: asyncio.subprocess.Process):
        self._process = process

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    async def wait(self) -> int:
        return await self._process.wait()

    def signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, sig)  # start_new_session: the child leads its own group


async def spawn_local(spec: ProcessSpec, log_path: Path, restarts: int) -> LocalProcess:
    with log_path.open("ab") as log:
        return LocalProcess(
            await asyncio.create_subprocess_exec(
                *spec.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, **child_env(spec, restarts)},
                cwd=spec.cwd,
                start_new_session=True,
            )
        )


def child_env(spec: ProcessSpec, restarts: int) -> dict[str, str]:
    """What the supervisor adds to a child's environment: its name, its restart count, its spec's env."""
    return {COMPONENT_ENV: spec.name, RESTARTS_ENV: str(restarts), **spec.env}


class _Child:
    def __init__(self, spec: ProcessSpec, process: ChildProcess, log_path: Path):
        self.spec = spec
        self.process = process
        self.log_path = log_path
        self.stopping = False  # set when the supervisor itself asked it to stop
        self.restarts = 0  # in all: restarted processes are told their number (fresh ids, seeds)
        self.restarted_at: deque[float] = deque()  # monotonic times of the restarts in the window
        self.respec: Callable[[], Awaitable[ProcessSpec]] | None = None

    def recent_restarts(self) -> int:
        """Restarts within the spec's window: a component that fails once a day lives for ever."""
        horizon = time.monotonic() - self.spec.restart.window_s
        while self.restarted_at and self.restarted_at[0] < horizon:
            self.restarted_at.popleft()
        return len(self.restarted_at)


class Supervisor:
    """Owns child processes for the lifetime of an `async with` block.

    SIGINT/SIGTERM to the supervisor end `wait()` with status "interrupted"; a second
    signal skips the grace period and SIGKILLs everything at once.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike,
        grace_s: float = 10.0,
        handle_signals: bool = True,
        on_restart: Callable[[str, ChildExit], Awaitable[None]] | None = None,
        spawn: Spawner = spawn_local,
    ):
        self.log_dir = Path(log_dir)
        self.spawn = spawn
        self.grace_s = grace_s
        self.handle_signals = handle_signals
        self.on_restart = on_restart  # awaited after a child was started again (it need not be healthy yet)
        self._children: dict[str, _Child] = {}
        self._watchers = asyncio.TaskGroup()
        self._ended: asyncio.Future[RunOutcome] | None = None
        self._kill_now = asyncio.Event()
        self._signals_installed: list[signal.Signals] = []

    async def __aenter__(self) -> Supervisor:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._ended = asyncio.get_running_loop().create_future()
        await self._watchers.__aenter__()
        if self.handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._on_signal, sig)
                self._signals_installed.append(sig)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self.stop_all()
        finally:
            await self._watchers.__aexit__(None, None, None)
            loop = asyncio.get_running_loop()
            for sig in self._signals_installed:
                loop.remove_signal_handler(sig)
            self._signals_installed.clear()

    @property
    def pids(self) -> dict[str, int]:
        return {name: child.process.pid for name, child in self._children.items()}

    @property
    def restarts(self) -> dict[str, int]:
        return {name: child.restarts for name, child in self._children.items()}

    @property
    def returncodes(self) -> dict[str, int | None]:
        """None while running; negative: killed by that signal."""
        return {name: child.process.returncode for name, child in self._children.items()}

    async def start(self, spec: ProcessSpec, respec: Callable[[], Awaitable[ProcessSpec]] | None = None) -> int:
        """Start one child (its output to `log_dir/NAME.log`) and watch it; returns its pid.

        `respec` gives the command of a restart where it must differ from the first start
        (an engine restarts from the newest weights, not the ones the run began with)."""
        if self._ended is None:
            raise RuntimeError("use Supervisor inside `async with`")
        if spec.name in self._children:
            raise ValueError(f"a component named {spec.name!r} is already running")
        if self._ended.done():
            raise _ended_error(self._ended.result())
        log_path = self.log_dir / f"{spec.name}.log"
        child = _Child(spec, await spawn_members(self.spawn, spec, log_path, 0), log_path)
        child.respec = respec
        self._children[spec.name] = child
        self._watchers.create_task(self._watch(child), name=f"watch-{spec.name}")
        return child.process.pid

    async def wait(self, timeout_s: float | None = None) -> RunOutcome:
        """Until the run ends: the finishing child exits 0, a child fails, a signal arrives,
        or `timeout_s` passes. Children keep running until the `async with` block exits."""
        assert self._ended is not None
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(self._ended)
        except TimeoutError:
            return RunOutcome(status="timed_out", message=f"stopped after the wall-clock limit of {timeout_s:g} s")

    async def guard(self, awaitable: Awaitable[T]) -> T:
        """Await `awaitable` unless the run ends first (a child died, a signal): then cancel
        it and raise ChildFailed (or RunEnded for a signal)."""
        assert self._ended is not None
        work = asyncio.ensure_future(awaitable)
        ended = asyncio.shield(self._ended)
        either: set[asyncio.Future[Any]] = {work, ended}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()  # cancels only the shield's view; `_ended` itself stays intact
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
        if work.done() and not work.cancelled():
            return work.result()
        raise _ended_error(self._ended.result())

    def kill(self, name: str) -> None:
        """SIGKILL a child (and what it spawned); its watcher then restarts it or ends the run."""
        self._children[name].process.signal_group(signal.SIGKILL)

    async def stop_all(self) -> None:
        """Stop every child (SIGTERM to its group, grace period, SIGKILL) and reap it: first, together,
        those marked stop_early, then the rest together."""
        for child in self._children.values():
            child.stopping = True  # none is restarted any more
        for early in (True, False):
            async with asyncio.TaskGroup() as group:
                for child in self._children.values():
                    if child.spec.stop_early == early:
                        group.create_task(self._stop(child))

    # ---- internals ------------------------------------------------------------------------

    async def _watch(self, child: _Child) -> None:
        while True:
            returncode = await child.process.wait()
            if child.stopping:
                return
            if child.spec.finishes_run and returncode == 0:
                self._end(RunOutcome(status="finished", message=f"{child.spec.name} finished"))
                return
            exit_ = ChildExit(
                name=child.spec.name,
                returncode=returncode,
                log_path=str(child.log_path),
                log_tail=log_tail(child.log_path),
            )
            recent = child.recent_restarts()
            if recent >= child.spec.restart.max_restarts:
                window = f"{child.spec.restart.window_s:g} s"
                budget = f" (after {recent} restarts within {window})" if recent else ""
                self._end(RunOutcome(status="failed", message=exit_.describe() + budget, child=exit_))
                return
            try:
                await self._restart(child, exit_)
            except (OSError, RuntimeError) as exc:  # it cannot be started again (a cluster lost its node)
                message = f"{exit_.describe()}\nits restart failed: {exc}"
                self._end(RunOutcome(status="failed", message=message, child=exit_))
                return

    async def _restart(self, child: _Child, exit_: ChildExit) -> None:
        recent = child.recent_restarts()
        policy = child.spec.restart
        delay = min(policy.backoff_s * 2**recent, MAX_BACKOFF_S)
        child.restarts += 1
        child.restarted_at.append(time.monotonic())
        child.process.signal_group(signal.SIGKILL)  # what it spawned goes with it
        print(
            f"restarting {child.spec.name} in {delay:g} s ({recent + 1} of {policy.max_restarts} "
            f"within {policy.window_s:g} s): {exit_.describe().splitlines()[0]}",
            flush=True,
        )
        with child.log_path.open("ab") as log:
            log.write(f"\n--- supervisor: exit {exit_.returncode}, restart {child.restarts} ---\n".encode())
        await asyncio.sleep(delay)
        if child.stopping or (self._ended is not None and self._ended.done()):
            return
        if child.respec is not None:
            child.spec = await child.respec()
        child.process = await spawn_members(self.spawn, child.spec, child.log_path, child.restarts)
        if self.on_restart is not None:
            await self.on_restart(child.spec.name, exit_)

    async def _stop(self, child: _Child) -> None:
        process = child.process
        if process.returncode is None:
            process.signal_group(signal.SIGTERM)
            kill = asyncio.ensure_future(self._kill_now.wait())
            exited = asyncio.ensure_future(process.wait())
            try:
                await asyncio.wait({kill, exited}, timeout=self.grace_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                kill.cancel()
        # Also reaches grandchildren left in the group after the leader exited.
        process.signal_group(signal.SIGKILL)
        await process.wait()

    def _on_signal(self, sig: signal.Signals) -> None:
        assert self._ended is not None
        if self._ended.done():
            self._kill_now.set()  # second signal: no more grace
        self._end(RunOutcome(status="interrupted", message=f"received {sig.name}; stopping all components"))

    def _end(self, outcome: RunOutcome) -> None:
        assert self._ended is not None
        if not self._ended.done():
            self._ended.set_result(outcome)


def _ended_error(outcome: RunOutcome) -> RunEnded:
    return ChildFailed(outcome) if outcome.child is not None else RunEnded(outcome)


def log_tail(path: str | os.PathLike, lines: int = LOG_TAIL_LINES, max_bytes: int = 256 * 1024) -> list[str]:
    """The last `lines` lines of a (possibly huge, possibly binary-garbled) log file."""
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            size = file.tell()
            file.seek(max(0, size - max_bytes))
            data = file.read()
    except OSError as exc:
        return [f"(cannot read log: {exc})"]
    text = data.decode("utf-8", errors="replace")
    return list(deque(text.splitlines(), maxlen=lines))
