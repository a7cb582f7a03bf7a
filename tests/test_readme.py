"""The README's Python blocks run as written, on tiny models standing in for the hub checkpoints they
name (nothing is downloaded), so the examples cannot drift from the library."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import char_tokenizer, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_posenc.families import tiny_rotary_config

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
# hub ids in the README -> the tiny family that stands in for them
STAND_INS = {
    "gpt2": "gpt2",
    "bloom": "bloom",
    "opt": "opt",
    "pythia": "gpt_neox",
    "qwen3": "qwen3",
    "gemma-3": "gemma3_text",
    "smollm3": "smollm3",
    "llama-4": "llama4_text",
    "smollm": "llama",
    "llama": "llama",
}
#: stand-ins built from the family table's generic tiny config (the others: hf_posenc.tiny's)
GENERIC = ("qwen3", "gemma3_text", "smollm3", "llama4_text")


def python_blocks() -> list[str]:
    return BLOCK.findall(README.read_text())


def _is_local(name: str) -> bool:
    return Path(str(name)).exists()


@pytest.fixture
def offline_hub(monkeypatch):
    real_model = AutoModelForCausalLM.from_pretrained.__func__
    real_tokenizer = AutoTokenizer.from_pretrained.__func__

    def model(cls, name, *args, **kwargs):
        if _is_local(name):
            return real_model(cls, name, *args, **kwargs)
        family = next((f for key, f in STAND_INS.items() if key in str(name).lower()), None)
        assert family is not None, f"no tiny stand-in for {name!r}: add one to STAND_INS"
        if family in GENERIC:
            return AutoModelForCausalLM.from_config(tiny_rotary_config(family), attn_implementation="sdpa").eval()
        return tiny_model(family, attn="eager" if family == "bloom" else "sdpa")

    def tokenizer(cls, name, *args, **kwargs):
        return real_tokenizer(cls, name, *args, **kwargs) if _is_local(name) else char_tokenizer()

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(model))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(tokenizer))


def test_readme_has_python_examples():
    assert len(python_blocks()) >= 3


def test_readme_python_blocks_run_in_order(offline_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks save checkpoints to relative folders
    namespace: dict = {"__name__": "readme"}
    for i, block in enumerate(python_blocks()):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"README python block {i + 1} failed:\n{block}") from exc
