"""Recipe configuration: one validated dataclass, loaded from YAML plus ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import InvalidParameterError, did_you_mean
from ..specs import parse_scheme_spec

METHODS = ("full", "lora")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("no", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Everything a fine-tuning run needs. Field docs are the README's recipe reference."""

    # model and patch
    model: str = "smollm2"  # hub id, local folder, "smollm2", or "tiny:<model_type>"
    scheme: str = "none"  # scheme spec applied before training, e.g. "yarn:factor=4"
    attn_implementation: str | None = None
    tiny_context: int = 64  # original context of a tiny:<model_type> model
    tiny_width: int = 64
    tiny_layers: int = 2
    # method
    method: str = "lora"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | str = "all-linear"
    trainable_embeddings: bool = False  # LongLoRA: embeddings and norms trainable beside LoRA
    trainable_norms: bool = False
    # data
    data: str = "kjv"
    seq_len: int = 512
    pose_target_len: int | None = None  # PoSE: positions span this length while windows stay seq_len
    val_fraction: float = 0.05
    num_proc: int = 1
    max_tokens: int | None = None  # cap on tokens read from the source
    # optimisation
    steps: int = 100
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    # bookkeeping
    output_dir: str = "runs/default"
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 50
    keep_last: int = 2
    log_every: int = 10
    seed: int = 0
    save_merged: bool = True  # LoRA: merge into the weights for the final save (else save the adapter)
    report_to: list[str] = field(default_factory=list)  # "tensorboard", "wandb" (off by default)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def choice(key: str, options: tuple[str, ...]) -> None:
            if getattr(self, key) not in options:
                raise InvalidParameterError(f"{key} must be one of {', '.join(options)}, got {getattr(self, key)!r}.")

        choice("method", METHODS)
        choice("schedule", SCHEDULES)
        choice("mixed_precision", PRECISIONS)
        parsed = parse_scheme_spec(self.scheme)
        if parsed is not None:
            from ..api import make_scheme

            make_scheme(parsed[0], **parsed[1])  # unknown scheme or parameter: fail before loading a model
        positive = (
            "lora_r",
            "seq_len",
            "steps",
            "batch_size",
            "grad_accum",
            "eval_every",
            "save_every",
            "keep_last",
            "log_every",
            "num_proc",
            "eval_batches",
            "tiny_context",
            "tiny_width",
            "tiny_layers",
        )
        for key in positive:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidParameterError(f"{key} must be a positive int, got {value!r}.")
        for key in ("lora_dropout", "val_fraction", "lr", "weight_decay", "max_grad_norm"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidParameterError(f"{key} must be a number, got {value!r}.")
        for key in ("trainable_embeddings", "trainable_norms", "gradient_checkpointing", "save_merged"):
            if not isinstance(getattr(self, key), bool):
                raise InvalidParameterError(f"{key} must be true or false, got {getattr(self, key)!r}.")
        if not 0 < self.lr < 1:
            raise InvalidParameterError(f"lr must be in (0, 1), got {self.lr!r}.")
        if not 0 <= self.val_fraction < 1:
            raise InvalidParameterError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}.")
        if self.pose_target_len is not None and self.pose_target_len < self.seq_len:
            raise InvalidParameterError(
                f"pose_target_len ({self.pose_target_len}) must be >= seq_len ({self.seq_len})."
            )
        unknown = [r for r in self.report_to if r not in ("tensorboard", "wandb")]
        if unknown:
            raise InvalidParameterError(f"report_to accepts tensorboard, wandb; got {unknown}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(raw: str, current: Any) -> Any:
    """YAML-parse an override; ints become floats for float fields, and string fields stay strings."""
    value = yaml.safe_load(raw)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, str) and not isinstance(value, str):
        return raw
    return value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML file and ``key=value`` overrides; unknown keys are errors."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise InvalidParameterError(f"{path}: expected a mapping of recipe keys, got {type(loaded).__name__}.")
        data.update(loaded)
    valid = [f.name for f in dataclasses.fields(TrainConfig)]
    defaults = TrainConfig()
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise InvalidParameterError(f"Overrides are key=value, got {item!r}.")
        if key not in valid:
            raise InvalidParameterError(f"Unknown recipe key {key!r}." + did_you_mean(key, valid))
        data[key] = _coerce(raw, getattr(defaults, key))
    for key in data:
        if key not in valid:
            raise InvalidParameterError(f"{path}: unknown recipe key {key!r}." + did_you_mean(key, valid))
    return TrainConfig(**data)
