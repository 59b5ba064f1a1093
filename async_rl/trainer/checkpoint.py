"""Checkpoint layout, atomic publication and RNG state.

ckpt_dir/
  step_{t}/                 an HF model folder (config.json, *.safetensors, tokenizer files):
                            what an engine loads for a disk weight sync
    trainer_state/          optimizer.pt, rng_rank{r}.pt, meta.json
  latest                    text file naming the newest complete step_{t}

A step folder is written under a temporary name and renamed into place, and
`latest` is replaced atomically after it, so a crash mid-save leaves the
previous checkpoint as the one resumed from.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

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
    """The step folder `latest` names, or None when there is no complete checkpoint."""
    pointer = Path(ckpt_dir) / LATEST
    if not pointer.is_file():
        return None
    path = Path(ckpt_dir) / pointer.read_text().strip()
    if not (path / STATE_DIR / META).is_file():
        raise FileNotFoundError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path


def read_meta(step_folder: Path) -> dict[str, Any]:
    """A checkpoint's version, rank count and seed (no torch needed: the orchestrator reads it)."""
    return json.loads((step_folder / STATE_DIR / META).read_text())


def write_meta(staging: Path, meta: dict[str, Any]) -> None:
    (staging / STATE_DIR / META).write_text(json.dumps(meta))


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
