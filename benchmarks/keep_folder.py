"""The `--keep` folder of a benchmark that starts runs: it must be new or empty, because a run started
into a folder that holds a finished run resumes it, ends at once and the benchmark would measure the
old run again under the new settings (an APRIL benchmark on the H200 printed η 1 over η 2's runs)."""

from __future__ import annotations

import argparse
from pathlib import Path


def keep_folder(text: str) -> Path:
    """argparse type of `--keep`: a folder that does not exist yet or is empty."""
    folder = Path(text)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise argparse.ArgumentTypeError(
            f"{folder} already holds something: runs started there would resume what it holds and be "
            "measured again; give a new folder or empty this one"
        )
    return folder
