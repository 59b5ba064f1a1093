"""How a component process ends once its own work is done and saved.

The interpreter's teardown with torch and transformers loaded takes about a second (more with
CUDA); every stop of a run, and every restart, would wait for it. Component mains close their
files, sockets and writers themselves before returning, so their `__main__` ends the process
directly after flushing what is buffered.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


def exit_now(code: int | None) -> NoReturn:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to save
            pass
    os._exit(code or 0)
