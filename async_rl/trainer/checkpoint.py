"""Checkpoint layout, atomic publication and RNG state.

ckpt_dir/
  step_{t}/                 an HF model folder (config.json, *.safetensors, tokenizer files):
                            what an engine loads for a disk weight sync
    trainer_state/          optimizer.pt, rng_rank{r}.pt, meta.json
  latest                    text file naming the newest complete step_{t}

A step folder is written under a temporary name and renamed into place, and
`latest` is replaced atomically after it, so a crash mid-save leaves the
previous checkpoint as the one resumed from. meta.json holds a CRC32 of every
other file: a checkpoint damaged later (a disk error, a partial copy) is found
at resume, reported, and the newest intact one is used instead.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import zlib
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LATEST = "latest"
STATE_DIR = "trainer_state"
META = "meta.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


def step_dir(ckpt_dir: str | Path, version: int) -> Path:
    return Path(ckpt_dir) / f"step_{version}"


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The newest intact checkpoint: the one `latest` names unless it is damaged, else the newest
    other step folder that verifies (each damaged one is logged); None before the first checkpoint;
    FileNotFoundError, with every reason, when there are checkpoints but none is intact."""
    folder = Path(ckpt_dir)
    pointer = folder / LATEST
    if not pointer.is_file():
        return None
    named = folder / pointer.read_text().strip()
    others = sorted(folder.glob("step_*"), key=lambda p: int(p.name.removeprefix("step_")), reverse=True)
    problems = []
    for candidate in [named, *(p for p in others if p != named)]:
        problem = damage(candidate)
        if problem is None:
            return candidate
        log.error("checkpoint %s is not usable (%s); trying an older one", candidate, problem)
        problems.append(f"{candidate.name}: {problem}")
    raise FileNotFoundError(f"no intact checkpoint in {folder}: {'; '.join(problems)}")


def damage(step_folder: Path) -> str | None:
    """Why `step_folder` is not an intact checkpoint, or None if it is."""
    meta_path = step_folder / STATE_DIR / META
    if not meta_path.is_file():
        return "no trainer_state/meta.json: incomplete"
    try:
        expected = json.loads(meta_path.read_text()).get("crc32", {})
    except (OSError, json.JSONDecodeError) as exc:
        return f"meta.json unreadable: {exc}"
    for name, crc in expected.items():
        path = step_folder / name
        if not path.is_file():
            return f"{name} is missing"
        if _crc32(path) != crc:
            return f"{name} does not match its checksum"
    return None


def read_meta(step_folder: Path) -> dict[str, Any]:
    """A checkpoint's version, rank count and seed (no torch needed: the orchestrator reads it)."""
    return json.loads((step_folder / STATE_DIR / META).read_text())


def write_meta(staging: Path, meta: dict[str, Any]) -> None:
    """Last, once every other file is written: it carries their checksums."""
    files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != META)
    checksums = {str(p.relative_to(staging)): _crc32(p) for p in files}
    (staging / STATE_DIR / META).write_text(json.dumps({**meta, "crc32": checksums}))


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as file:
        while chunk := file.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def publish(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place and point `latest` at it."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer_tmp = final.parent / f".{LATEST}.tmp"
    pointer_tmp.write_text(final.name + "\n")
    os.replace(pointer_tmp, final.parent / LATEST)


def prune(ckpt_dir: str | Path, keep: int) -> None:
    steps = sorted(Path(ckpt_dir).glob("step_*"), key=lambda p: int(p.name.removeprefix("step_")))
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def copy_tokenizer_files(source: str | Path, target: Path) -> None:
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, target / name)


def capture_rng() -> dict:
    """Every RNG a step might draw from, in types torch.load(weights_only=True) accepts."""
    import numpy as np
    import torch

    numpy_state = np.random.get_state(legacy=True)
    assert isinstance(numpy_state, tuple)  # the global RandomState is an MT19937, which has the legacy form
    algorithm, keys, pos, has_gauss, cached = numpy_state
    version, internal, gauss_next = random.getstate()
    return {
        "python": [version, list(internal), gauss_next],
        "numpy": [algorithm, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        # This rank's device only: touching every GPU would create a context on each.
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def restore_rng(state: dict) -> None:
    import numpy as np
    import torch

    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    algorithm, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((algorithm, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
