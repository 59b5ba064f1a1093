"""Where a run's prompts come from: its [task] section's generator or local dataset.

A task generator is `f(seed: int = 0, **kwargs) -> Iterator[TaskSample]`, named in a recipe as
"module:function" under [task] (recipes/tasks.py has the bundled ones); the same seed gives the same
prompts, so runs are reproducible. `metadata["answer"]` is what reward functions check against.
A dataset is a local .jsonl or .parquet file; bad rows are reported and skipped, never fatal.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

log = logging.getLogger(__name__)


class TaskSample(msgspec.Struct, frozen=True, kw_only=True):
    prompt: str
    # Always holds "answer" (a string); anything else a reward function may want.
    metadata: dict[str, Any]


# ---- local datasets -------------------------------------------------------------------------


class SkippedRow(msgspec.Struct, frozen=True):
    row: int  # 1-based line number for jsonl, 1-based row index for parquet
    reason: str


class DatasetRows(msgspec.Struct, frozen=True):
    samples: list[TaskSample]
    skipped: list[SkippedRow]


def read_dataset(path: str | Path, prompt_field: str = "prompt", answer_field: str = "answer") -> DatasetRows:
    """Read a .jsonl or .parquet file; a bad row is recorded in `skipped` (and logged), never fatal.

    Extra columns are kept in each sample's metadata for reward functions to use.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {path} does not exist")
    rows = _parquet_rows(path) if path.suffix == ".parquet" else _jsonl_rows(path)
    samples, skipped = [], []
    for number, row in rows:
        problem = _row_problem(row, prompt_field, answer_field)
        if problem:
            skipped.append(SkippedRow(number, problem))
            log.warning("%s row %d skipped: %s", path, number, problem)
            continue
        extra = {k: v for k, v in row.items() if k not in (prompt_field, answer_field)}
        samples.append(
            TaskSample(prompt=row[prompt_field], metadata={**extra, "answer": str(row[answer_field]), "row": number})
        )
    return DatasetRows(samples, skipped)


def dataset(
    seed: int = 0, path: str = "", prompt_field: str = "prompt", answer_field: str = "answer", shuffle: bool = True
) -> Iterator[TaskSample]:
    """Endless epochs over a dataset's good rows, reshuffled each epoch by `seed`."""
    rows = read_dataset(path, prompt_field, answer_field)
    if not rows.samples:
        raise ValueError(f"dataset {path} has no usable rows ({len(rows.skipped)} skipped; first: {rows.skipped[:1]})")
    rng = random.Random(seed)
    order = list(range(len(rows.samples)))
    while True:
        if shuffle:
            rng.shuffle(order)
        yield from (rows.samples[i] for i in order)


def task_samples(section) -> Iterator[TaskSample]:
    """The prompts a run's [task] section (async_rl.config.TaskConfig) asks for."""
    from async_rl.config import import_function

    if section.dataset is not None:
        return dataset(section.seed, section.dataset, section.prompt_field, section.answer_field)
    return iter(import_function(section.generator)(seed=section.seed, **section.kwargs))


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                yield number, f"invalid JSON: {exc}"


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise RuntimeError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    yield from enumerate(pq.read_table(path).to_pylist(), start=1)


def _row_problem(row: Any, prompt_field: str, answer_field: str) -> str | None:
    if isinstance(row, str):
        return row  # the reader's own parse error
    if not isinstance(row, dict):
        return f"expected an object, got {type(row).__name__}"
    prompt, answer = row.get(prompt_field), row.get(answer_field)
    if not isinstance(prompt, str) or not prompt.strip():
        return f"field {prompt_field!r} missing or not a non-empty string"
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or str(answer).strip() == "":
        return f"field {answer_field!r} missing or not a string/number"
    return None
