"""Recipe configuration: one validated dataclass, loaded from YAML plus ``key=value`` overrides."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import InvalidParameterError, did_you_mean
from ..specs import parse_scheme_spec
from .loss import LOSSES

METHODS = ("full", "lora")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("no", "bf16", "fp16")
ATTENTIONS = ("full", "s2_attn")


@dataclass
class TrainConfig:
    """Everything a fine-tuning run needs. Field docs are the README's recipe reference."""

    # model and patch
    model: str = "smollm2"  # hub id, local folder, "smollm2", or "tiny:<model_type>"
    # scheme spec applied before training, e.g. "yarn:factor=4"; must be "none" for a folder that records a
    # patch (saved by `hf-posenc patch` or an earlier recipe): that model loads patched and is trained as saved
    scheme: str = "none"
    attn_implementation: str | None = None
    tiny_context: int = 64  # original context of a tiny:<model_type> model
    tiny_width: int = 64
    tiny_layers: int = 2
    # method
    method: str = "lora"
    lora_r: int = 8
    lora_alpha: int = 16  # > 0
    lora_dropout: float = 0.0  # in [0, 1)
    lora_target_modules: list[str] | str = "all-linear"
    trainable_embeddings: bool = False  # LongLoRA: embeddings and norms trainable beside LoRA
    trainable_norms: bool = False
    # LongLoRA's S²-Attn while training (groups of s2_group_fraction x seq_len tokens); full attention when
    # evaluating and in the saved model
    attention: str = "full"
    s2_group_fraction: float = 0.25
    # data
    data: str = "kjv"
    seq_len: int = 512
    pose_target_len: int | None = None  # PoSE: positions span this length while windows stay seq_len
    val_fraction: float = 0.05
    num_proc: int = 1
    max_tokens: int | None = None  # cap on tokens read from the source (> 0, or null: no cap)
    # optimisation
    steps: int = 100
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0  # >= 0
    warmup_steps: int = 0  # >= 0 (a warning when >= steps: lr would never be reached)
    schedule: str = "cosine"
    max_grad_norm: float = 1.0  # gradient clipping norm, >= 0; 0 turns clipping off
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    # memory at long context (docs/scaling.md): how the LM loss is computed (plain: the model's own, holding
    # seq_len x vocab logits; chunked: pure torch, chunks of loss_chunk_size positions; liger / cce: fused
    # CUDA kernels), and checkpointed activations kept in host memory instead of on the device
    loss: str = "plain"
    loss_chunk_size: int = 1024
    offload_activations: bool = False
    # bookkeeping
    output_dir: str = "runs/default"
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 50
    keep_last: int = 2
    log_every: int = 10
    seed: int = 0  # in [0, 2**32)
    save_merged: bool = True  # LoRA: merge into the weights for the final save (else save the adapter)
    report_to: list[str] = field(default_factory=list)  # "tensorboard", "wandb" (off by default)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Type every field (``"1e-4"`` becomes ``1e-4``; see :func:`coerce_field`), then range-check."""
        for key in field_kinds():
            setattr(self, key, coerce_field(key, getattr(self, key)))

        def choice(key: str, options: tuple[str, ...]) -> None:
            if getattr(self, key) not in options:
                raise InvalidParameterError(f"{key} must be one of {', '.join(options)}, got {getattr(self, key)!r}.")

        choice("method", METHODS)
        choice("schedule", SCHEDULES)
        choice("mixed_precision", PRECISIONS)
        choice("attention", ATTENTIONS)
        choice("loss", tuple(LOSSES))
        if self.attention == "s2_attn":
            from ..patches.shifted import group_size

            if not 0 < self.s2_group_fraction < 1:
                raise InvalidParameterError(f"s2_group_fraction must be in (0, 1), got {self.s2_group_fraction!r}.")
            try:
                group_size(self.seq_len, self.s2_group_fraction)
            except ValueError as exc:
                raise InvalidParameterError(str(exc)) from exc
        for key in ("model", "scheme", "data", "output_dir"):
            if not getattr(self, key).strip():
                raise InvalidParameterError(f"{key} must be a non-empty string, got {getattr(self, key)!r}.")
        parsed = parse_scheme_spec(self.scheme)
        if parsed is not None:
            from ..api import make_scheme

            make_scheme(parsed[0], **parsed[1])  # unknown scheme or parameter: fail before loading a model
        positive = (
            "lora_r",
            "lora_alpha",
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
            "loss_chunk_size",
        )
        for key in positive:
            if getattr(self, key) <= 0:
                raise InvalidParameterError(f"{key} must be a positive int, got {getattr(self, key)!r}.")
        for key in ("max_tokens", "pose_target_len"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise InvalidParameterError(f"{key} must be a positive int or null, got {getattr(self, key)!r}.")
        if self.warmup_steps < 0:
            raise InvalidParameterError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}.")
        if self.warmup_steps and self.warmup_steps >= self.steps:  # legal (smoke tests of real recipes), but
            warnings.warn(  # rarely meant
                f"warmup_steps ({self.warmup_steps}) >= steps ({self.steps}): the learning rate never reaches lr.",
                stacklevel=3,
            )
        if not 0 <= self.seed < 2**32:
            raise InvalidParameterError(f"seed must be an int in [0, 2**32), got {self.seed!r}.")
        if not 0 < self.lr < 1:
            raise InvalidParameterError(f"lr must be in (0, 1), got {self.lr!r}.")
        for key in ("val_fraction", "lora_dropout"):
            if not 0 <= getattr(self, key) < 1:
                raise InvalidParameterError(f"{key} must be in [0, 1), got {getattr(self, key)!r}.")
        if self.weight_decay < 0:
            raise InvalidParameterError(f"weight_decay must be >= 0, got {self.weight_decay!r}.")
        if self.max_grad_norm < 0:
            raise InvalidParameterError(
                f"max_grad_norm must be >= 0 (0 turns clipping off), got {self.max_grad_norm!r}: a negative "
                "clip norm flips the gradient."
            )
        if self.pose_target_len is not None and self.pose_target_len < self.seq_len:
            raise InvalidParameterError(
                f"pose_target_len ({self.pose_target_len}) must be >= seq_len ({self.seq_len})."
            )
        unknown = [r for r in self.report_to if r not in ("tensorboard", "wandb")]
        if unknown:
            raise InvalidParameterError(f"report_to accepts tensorboard, wandb; got {unknown}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: recipe keys a resumed run may change: they decide how long the run goes on, what it saves, logs and
#: evaluates, and how fast it tokenizes, never the training math up to the resumed step. ``steps`` may not
#: go below the resumed step; the schedule follows the new total from there. Any other difference between
#: a rerun's recipe and the ``config.yaml`` in its ``output_dir`` is an error (``output_dir`` itself is not
#: compared: the run's folder is what identifies it).
RESUMABLE_KEYS = (
    "steps",
    "save_every",
    "eval_every",
    "eval_batches",
    "log_every",
    "keep_last",
    "report_to",
    "num_proc",
    "save_merged",
    # how memory is spent, not what is computed (the loss implementations agree to float rounding)
    "loss",
    "loss_chunk_size",
    "offload_activations",
)

#: dataclass annotation -> how :func:`coerce_field` types a value
_KINDS = {
    "int": "int",
    "float": "float",
    "bool": "bool",
    "str": "str",
    "str | None": "str or null",
    "int | None": "int or null",
    "list[str]": "list",
    "list[str] | str": "str or list",
}
_NULLS = ("none", "null", "~", "")


@functools.cache
def field_kinds() -> dict[str, str]:
    """Each :class:`TrainConfig` field and the kind of value it takes."""
    return {f.name: _KINDS[str(f.type)] for f in dataclasses.fields(TrainConfig)}


def _number(key: str, value: Any, kind: str, expected: str) -> int | float:
    parsed = value
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            parsed = float(value.strip())
            if kind == "int" and re.fullmatch(r"\s*[+-]?[\d_]+\s*", value):
                parsed = int(value.strip())  # exact, whatever its size
        except ValueError:
            raise InvalidParameterError(f"{key} must be {expected}, got {value!r}.") from None
    if isinstance(parsed, bool) or not isinstance(parsed, int | float):
        raise InvalidParameterError(f"{key} must be {expected}, got {value!r}.")
    if not math.isfinite(parsed):
        raise InvalidParameterError(f"{key} must be a finite number, got {value!r}.")
    if kind == "float":
        return float(parsed)
    if isinstance(parsed, float):
        if not parsed.is_integer():
            raise InvalidParameterError(f"{key} must be {expected}, got {value!r}.")
        return int(parsed)
    return parsed


def coerce_field(key: str, value: Any) -> Any:
    """``value`` typed for field ``key``: numbers from numbers or numeric strings (``"1e-4"``, ``"3"``,
    ``"2.5e-5"``; ints also from integral floats such as ``1e3``), ``null``/``none`` for optional fields, a
    comma-separated string for ``report_to``. Anything else of the wrong type is an
    :class:`InvalidParameterError` naming the key and the type it takes."""
    kind = field_kinds()[key]
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if kind in ("int or null", "str or null") and (
        value is None or (isinstance(value, str) and value.strip().lower() in _NULLS)
    ):
        return None
    if kind == "int":
        return _number(key, value, "int", "an int")
    if kind == "int or null":
        return _number(key, value, "int", "an int or null")
    if kind == "float":
        return _number(key, value, "float", "a number (float)")
    if kind == "bool":
        if not isinstance(value, bool):
            raise InvalidParameterError(f"{key} must be true or false, got {value!r}.")
        return value
    if kind in ("str", "str or null"):
        if not isinstance(value, str):
            raise InvalidParameterError(f"{key} must be a string{' or null' if kind != 'str' else ''}, got {value!r}.")
        return value
    if kind == "list":
        if value is None or (isinstance(value, str) and value.strip().lower() in _NULLS):
            return []
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return list(value)
        raise InvalidParameterError(f"{key} must be a list of strings, got {value!r}.")
    # "str or list"
    if isinstance(value, str) or (isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)):
        return value if isinstance(value, str) else list(value)
    raise InvalidParameterError(f"{key} must be a string or a list of strings, got {value!r}.")


def _parse_override(key: str, raw: str) -> Any:
    """An override's value: YAML-parsed (``true``, ``null``, ``[a, b]``, numbers), except that string
    fields keep the text as written (``model=1:20`` is a path, not YAML's sexagesimal 80)."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    kind = field_kinds()[key]
    if kind in ("str", "str or null", "str or list") and not isinstance(value, str | list | type(None)):
        return raw
    if kind == "str" and value is None:
        return raw
    return value


def recipe_differences(stored: Mapping[str, Any], cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """``{key: (stored value, cfg's value)}`` for each recipe key whose value differs, ``output_dir``
    excepted. Stored values are typed as :func:`coerce_field` types them (an old JSON ``config.yaml``
    holds ``2e-05``, a string to YAML); keys the stored recipe lacks are not compared."""
    changed = {}
    for key, new in cfg.to_dict().items():
        if key == "output_dir" or key not in stored:
            continue
        old = stored[key]
        with contextlib.suppress(InvalidParameterError):  # not valid today: it differs from the (valid) new one
            old = coerce_field(key, old)
        if old != new or type(old) is not type(new):
            changed[key] = (old, new)
    return changed


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML file and ``key=value`` overrides; unknown keys are errors."""
    data: dict[str, Any] = {}
    valid = list(field_kinds())
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise InvalidParameterError(f"{path}: expected a mapping of recipe keys, got {type(loaded).__name__}.")
        for key, value in loaded.items():
            if key not in valid:
                raise InvalidParameterError(f"{path}: unknown recipe key {key!r}." + did_you_mean(str(key), valid))
            try:
                data[key] = coerce_field(key, value)
            except InvalidParameterError as err:
                raise InvalidParameterError(f"{path}: {err}") from None
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise InvalidParameterError(f"Overrides are key=value, got {item!r}.")
        if key not in valid:
            raise InvalidParameterError(f"Unknown recipe key {key!r}." + did_you_mean(key, valid))
        data[key] = _parse_override(key, raw)
    return TrainConfig(**data)
