"""Task generators are deterministic and correct; dataset readers skip bad rows, never crash."""

from __future__ import annotations

import itertools
import json

import pytest

from async_rl.config import parse_config
from recipes.tasks import DIGIT_KINDS, arithmetic, digit_task
from rollout_workers.tasks import dataset, read_dataset, task_samples


def take(iterator, n):
    return list(itertools.islice(iterator, n))


@pytest.mark.parametrize("kind", DIGIT_KINDS)
def test_digit_tasks_are_deterministic_and_correct(kind):
    samples = take(digit_task(seed=3, kind=kind), 50)
    assert samples == take(digit_task(seed=3, kind=kind), 50) != take(digit_task(seed=4, kind=kind), 50)
    for sample in samples:
        digit = int(sample.prompt.rstrip(":=").split()[-1].split("+")[0])
        expected = {"succ": digit + 1, "copy": digit, "parity": digit % 2}[kind]
        assert sample.metadata["answer"] == str(expected) and len(sample.metadata["answer"]) == 1
    with pytest.raises(ValueError, match="unknown digit task kind 'nope'"):
        next(digit_task(kind="nope"))


@pytest.mark.parametrize("ops, digits", [("+", 1), ("+-*", 2), ("*", 1)])
def test_arithmetic_answers_are_right_and_operands_have_the_digits(ops, digits):
    for sample in take(arithmetic(seed=1, ops=ops, digits=digits, template="{a} {op} {b}"), 200):
        a, op, b = sample.prompt.split()
        assert op in ops and sample.metadata["answer"] == str(eval(sample.prompt))
        assert all(len(x) == digits for x in (a, b))
    with pytest.raises(ValueError, match="each character must be one of"):
        next(arithmetic(ops="+/"))


def test_jsonl_reader_reports_bad_rows_by_number_and_keeps_the_good(tmp_path, caplog):
    lines = [
        json.dumps({"prompt": "1+1=", "answer": "2", "level": 1}),
        "{not json",
        json.dumps([1, 2]),
        "",
        json.dumps({"prompt": "", "answer": "3"}),
        json.dumps({"prompt": "2+2="}),
        json.dumps({"prompt": "t?", "answer": True}),
        json.dumps({"question": "3+3=", "answer": 6}),
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rows = read_dataset(path)
    assert [s.prompt for s in rows.samples] == ["1+1="]
    assert rows.samples[0].metadata == {"answer": "2", "level": 1, "row": 1}
    assert [(r.row, r.reason.split(":")[0]) for r in rows.skipped] == [
        (2, "invalid JSON"),
        (3, "expected an object, got list"),
        (5, "field 'prompt' missing or not a non-empty string"),
        (6, "field 'answer' missing or not a string/number"),
        (7, "field 'answer' missing or not a string/number"),
        (8, "field 'prompt' missing or not a non-empty string"),
    ]
    assert "data.jsonl row 2 skipped" in caplog.text
    by_question = read_dataset(path, prompt_field="question")
    assert [(s.prompt, s.metadata["answer"]) for s in by_question.samples] == [("3+3=", "6")]


def test_dataset_generator_cycles_epochs_deterministically(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "answer": i}) + "\n" for i in range(5)))
    first = [s.prompt for s in take(dataset(seed=7, path=str(path)), 10)]
    assert first == [s.prompt for s in take(dataset(seed=7, path=str(path)), 10)]
    assert sorted(first[:5]) == sorted(first[5:]) == [f"p{i}" for i in range(5)]
    assert [s.prompt for s in take(dataset(path=str(path), shuffle=False), 6)] == ["p0", "p1", "p2", "p3", "p4", "p0"]
    (tmp_path / "bad.jsonl").write_text("nope\n")
    with pytest.raises(ValueError, match="no usable rows"):
        next(dataset(path=str(tmp_path / "bad.jsonl")))
    with pytest.raises(FileNotFoundError):
        read_dataset(tmp_path / "missing.jsonl")


def test_parquet_reader(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a", None, "c"], "answer": ["1", "2", None]}), path)
    rows = read_dataset(path)
    assert [s.prompt for s in rows.samples] == ["a"] and [r.row for r in rows.skipped] == [2, 3]


def test_task_samples_follows_the_task_section(tmp_path):
    section = parse_config({"task": {"generator": "recipes.tasks:arithmetic", "kwargs": {"ops": "*"}, "seed": 2}}).task
    assert take(task_samples(section), 5) == take(arithmetic(seed=2, ops="*"), 5)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"q": "x", "a": "y"}) + "\n")
    section = parse_config({"task": {"dataset": str(path), "prompt_field": "q", "answer_field": "a"}}).task
    assert next(task_samples(section)).metadata["answer"] == "y"
