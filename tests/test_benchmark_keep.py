"""A benchmark's --keep folder that already holds runs is refused before anything starts: runs
started there would resume the finished ones and the benchmark would print their numbers again."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("script", ["april.py", "e2e_async_vs_sync.py", "soak.py"])
def test_a_keep_folder_that_holds_runs_is_refused(tmp_path: Path, script: str) -> None:
    (tmp_path / "april0").mkdir()
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--keep", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=BENCHMARKS.parent,
    )
    assert result.returncode == 2
    assert "already holds something" in result.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "april0"]
