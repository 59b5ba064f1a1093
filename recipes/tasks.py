"""Task generators: verifiable synthetic tasks, `f(seed: int = 0, **kwargs) -> Iterator[TaskSample]`,
named in a recipe's [task] generator (rollout_workers/tasks.py reads them and local datasets)."""

from __future__ import annotations

import random
from collections.abc import Iterator

from rollout_workers.tasks import TaskSample

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


def arithmetic(
    seed: int = 0, ops: str = "+", digits: int = 1, template: str = ARITHMETIC_TEMPLATE
) -> Iterator[TaskSample]:
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
