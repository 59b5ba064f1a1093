"""Stack dumps on demand: SIGUSR1 makes a component write where it is into the run's stacks folder.

`async-rl run` sets ASYNC_RL_STACKS_DIR for every component it starts; each component's main calls
`install(name)`, which registers the process there (NAME-PID.pid: only registered processes are
signalled, since SIGUSR1 ends a process that has no handler) and, on SIGUSR1, writes NAME-PID.txt:
first every thread's stack from faulthandler (C level, so it works while Python is stuck in a C
call), then, once the interpreter runs Python again, the stack of every asyncio task (an event
loop's main thread is always in select(); the tasks say what each one awaits).
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import signal
import sys
import sysconfig
import traceback
from pathlib import Path
from types import FrameType
from typing import IO, Any

STACKS_ENV = "ASYNC_RL_STACKS_DIR"
MAIN_HEADER = "--- main thread (outermost first) ---"
TASKS_HEADER = "--- asyncio tasks ---"
_files: list[IO[str]] = []  # kept open for faulthandler, which writes to the file descriptor


def install(kind: str) -> None:
    """Register this process for stack dumps, if the run asked for them (ASYNC_RL_STACKS_DIR), under
    the name its supervisor gave it (a torchrun rank adds its rank), else `kind`."""
    directory = os.environ.get(STACKS_ENV)
    if not directory:
        return
    name = os.environ.get("ASYNC_RL_COMPONENT", kind)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        name += f"-rank{os.environ.get('RANK', '0')}"
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{os.getpid()}"
    dump = open(folder / f"{stem}.txt", "w")  # noqa: SIM115 - open for the process's lifetime
    _files.append(dump)

    def dump_tasks(signum: int, frame: FrameType | None) -> None:
        dump.write(f"\n{MAIN_HEADER}\n")  # the frame a signal handler gets is the main thread's
        dump.writelines(f'  File "{f.filename}", line {f.lineno} in {f.name}\n' for f in traceback.extract_stack(frame))
        dump.write(f"{TASKS_HEADER}\n")
        for task in _all_tasks():
            dump.write(f"task {task.get_name()}:\n")
            dump.writelines(f'  File "{path}", line {line} in {name}\n' for path, line, name in _awaiting(task))
        dump.flush()

    signal.signal(signal.SIGUSR1, dump_tasks)
    faulthandler.register(signal.SIGUSR1, file=dump, all_threads=True, chain=True)
    (folder / f"{stem}.pid").write_text(f"{os.getpid()}\n")


def _all_tasks() -> list[asyncio.Task]:
    try:  # the handler runs in the main thread, inside the loop's select() when there is a loop
        return list(asyncio.all_tasks(asyncio.get_running_loop()))
    except RuntimeError:
        return []


def _awaiting(task: asyncio.Task) -> list[tuple[str, int, str]]:
    """(file, line, function) from the task's coroutine down the chain of what each one awaits:
    Task.get_stack gives only the outermost frame of a suspended coroutine."""
    frames = []
    coroutine: Any = task.get_coro()
    while coroutine is not None:
        frame = getattr(coroutine, "cr_frame", None) or getattr(coroutine, "gi_frame", None)
        if frame is None:
            break
        frames.append((frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
        coroutine = getattr(coroutine, "cr_await", None) or getattr(coroutine, "gi_yieldfrom", None)
    return frames


def registered(directory: Path) -> dict[str, int]:
    """NAME-PID -> pid of every process registered in `directory` that is still alive."""
    found = {}
    for path in directory.glob("*.pid"):
        try:
            pid = int(path.read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):  # gone, or being written
            continue
        found[path.stem] = pid
    return found


def where(dump: str, most: int = 4) -> str:
    """One line saying where a dump's process is: the main thread's innermost frame of the run's own
    code (not the standard library's or a package's), then the same for the asyncio tasks, grouped."""
    threads, _, python_level = dump.partition(MAIN_HEADER)
    main, _, tasks = python_level.partition(TASKS_HEADER)
    found = []
    if main_frames := _frames(main):
        found.append(f"main thread in {_short(_innermost_own(main_frames))}")
    else:  # stuck in C: only faulthandler's dump, where the current thread comes first, innermost first
        for section in threads.split("\n\n"):
            if "Current thread" in section and (frames := _frames(section)):
                found.append(f"a thread in {_short(_innermost_own(frames[::-1]))}")
    places: dict[str, int] = {}
    for block in tasks.split("\ntask ")[1:]:
        frames = _frames(block)
        if frames and any(_own(f) for f in frames):
            place = _short(_innermost_own(frames))
            places[place] = places.get(place, 0) + 1
    if places:
        ranked = sorted(places.items(), key=lambda item: -item[1])
        shown = [f"{n} in {place}" if n > 1 else place for place, n in ranked[:most]]
        more = f" (+{len(ranked) - most} more places)" if len(ranked) > most else ""
        found.append("tasks awaiting " + "; ".join(shown) + more)
    return "; ".join(found) or "no stack was written"


def _frames(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("File ")]


def _own(frame_line: str) -> bool:
    """A frame of the run's code: neither the standard library nor an installed package."""
    path = frame_line.split('"')[1] if '"' in frame_line else ""
    library = (sys.base_prefix, sys.prefix, sysconfig.get_paths()["purelib"])
    return bool(path) and "site-packages" not in path and not path.startswith(library) and "<frozen" not in path


def _innermost_own(frames: list[str]) -> str:
    """`frames` outermost first."""
    return next((f for f in reversed(frames) if _own(f)), frames[-1])


def _short(frame_line: str) -> str:
    """'File "/x/async_rl/trainer_main.py", line 60 in get_batch' -> 'get_batch (async_rl/trainer_main.py:60)'."""
    try:
        path, rest = frame_line.split('"')[1], frame_line.split('"')[2]
        line = rest.split("line ")[1].split()[0].rstrip(",")
        function = rest.split(" in ")[-1].strip()
    except IndexError:
        return frame_line
    for root in (os.getcwd(), *sys.path):
        if root and path.startswith(root.rstrip("/") + "/"):
            path = path[len(root.rstrip("/")) + 1 :]
            break
    return f"{function} ({path}:{line})"
