"""The worker's light tokenizer loader is the model's own tokenizer."""

from __future__ import annotations

import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from rollout_workers.engine.model import resolve_model_spec
from rollout_workers.generate import encode_prompt, load_tokenizer

TEXTS = ["What is 12+7? Answer: 19", " leading space\nnew line", "ünïcödé 你好 <s></s>"]


@pytest.mark.parametrize("spec", ["tiny:llama", "tiny:qwen2"])
def test_light_tokenizer_matches_auto_tokenizer(spec):
    folder = resolve_model_spec(spec)
    auto, light = AutoTokenizer.from_pretrained(str(folder)), load_tokenizer(folder)
    for text in TEXTS:
        ids = encode_prompt(auto, text, chat_template=False)
        assert encode_prompt(light, text, chat_template=False) == ids
        assert light.decode(ids, skip_special_tokens=True) == auto.decode(ids, skip_special_tokens=True)
    assert light.eos_token_id == auto.eos_token_id and len(light) == len(auto)


def test_loading_it_does_not_import_torch():
    folder = resolve_model_spec("tiny:llama")
    code = (
        f"import sys; from rollout_workers.generate import load_tokenizer; load_tokenizer({str(folder)!r}); "
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]
