"""Fine-tuning for longer context: ``hf-posenc finetune CONFIG [key=value ...]`` or
``accelerate launch recipes/finetune.py CONFIG [key=value ...]``."""

from __future__ import annotations

import sys

from .config import RESUMABLE_KEYS, TrainConfig, load_config
from .engine import RECIPE_FILE, TrainResult, latest_checkpoint, load_adapter_output, train

__all__ = [
    "RESUMABLE_KEYS",
    "TrainConfig",
    "TrainResult",
    "latest_checkpoint",
    "load_adapter_output",
    "load_config",
    "main",
    "train",
]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: hf-posenc finetune CONFIG.yaml [key=value ...]   (keys: see README, 'Recipes')")
        return 0 if argv else 2
    path, overrides = (None, argv) if "=" in argv[0] else (argv[0], argv[1:])
    result = train(load_config(path, overrides))
    if result.final_dir is not None:
        adapter = (result.final_dir / RECIPE_FILE).exists()
        loader = "hf_posenc.train.load_adapter_output" if adapter else "hf_posenc.from_pretrained"
        print(
            f"done at step {result.step}: train loss {result.train_loss:.4f}, eval loss {result.eval_loss}; "
            f"model in {result.final_dir} (load with {loader})"
        )
    return 0
