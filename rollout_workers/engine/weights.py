"""Reading weight updates into name -> tensor dicts; the core then checks and applies them.

Tensors sent over HTTP are base64 safetensors, never pickles: we do not unpickle
network input (SGLang pickles here; this is a deliberate departure).
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

import torch


def load_folder(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {path}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


def decode_serialized(serialized: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(base64.b64decode(serialized, validate=True))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"serialized_named_tensors is not base64 of a safetensors file: {exc}") from exc
    except Exception as exc:  # safetensors raises its own error type for corrupt headers
        raise ValueError(f"serialized_named_tensors could not be read as safetensors: {exc}") from exc
