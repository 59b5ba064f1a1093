"""Prompt sources: verifiable synthetic tasks and local datasets.

A task generator is `f(seed: int = 0, **kwargs) -> Iterator[TaskSample]`, named in a
recipe as "module:function" under [task]; the same seed gives the same prompts, so
runs are reproducible. `metadata["answer"]` is what reward functions check against.
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


# ---- the tiny task: learnable from random init in ~100 GRPO steps on CPU ----------------------

DIGIT_KINDS = ("succ", "copy", "parity")


def digit_task(seed: int = 0, kind: str = "succ") -> Iterator[TaskSample]:
    """One-character answers a random-init char-level model can discover by sampling:
    succ "3+1=" -> "4", copy "copy 3:" -> "3", parity "parity 3:" -> "1".

    Each has ~1/100 chance per sample at random init, so a GRPO group of 16 finds a
    reward often enough to start, and the answer needs the prompt (no constant wins).
    """
    if kind not in DIGIT_KINDS:
        raise ValueError(f"unknown digit task kind {kind!r}; expected one of {', '.join(DIGIT_KINDS)}")
    rng = random.Random(seed)
    while True:
        if kind == "succ":
            digit = rng.randrange(9)
            prompt, answer = f"{digit}+1=", str(digit + 1)
        else:
            digit = rng.randrange(10)
            prompt, answer = (f"copy {digit}:", str(digit)) if kind == "copy" else (f"parity {digit}:", str(digit % 2))
        yield TaskSample(prompt=prompt, metadata={"answer": answer, "task": f"digit_{kind}"})


# ---- arithmetic -----------------------------------------------------------------------------

ARITHMETIC_TEMPLATE = "What is {a}{op}{b}? Answer with just the number."
_OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def arithmetic(seed: int = 0, ops: str = "+", digits: int = 1, template: str = ARITHMETIC_TEMPLATE) -> Iterator[TaskSample]:
    """`a op b` with `digits`-digit operands (1: 0..9, 2: 10..99) and an op drawn from `ops`."""
    unknown = set(ops) - set(_OPERATIONS)
    if not ops or unknown:
        raise ValueError(f"ops={ops!r}: each character must be one of {' '.join(_OPERATIONS)}")
    if digits < 1:
        raise ValueError(f"digits={digits} must be >= 1")
    low, high = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
    rng = random.Random(seed)
    while True:
        a, b, op = rng.randint(low, high), rng.randint(low, high), rng.choice(ops)
        yield TaskSample(
            prompt=template.format(a=a, b=b, op=op),
            metadata={"answer": str(_OPERATIONS[op](a, b)), "task": f"arithmetic{digits}{op}"},
        )


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
        samples.append(TaskSample(prompt=row[prompt_field], metadata={**extra, "answer": str(row[answer_field]), "row": number}))
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
    """The prompts a run's [task] section (async_rl.config.TaskSection) asks for."""
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
    for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield number, row


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
