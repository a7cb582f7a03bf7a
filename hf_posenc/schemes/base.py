"""Scheme configs: one tagged, validated dataclass per scheme, and the one scheme registry.

Pure Python and torch: nothing here imports transformers, so the math can be tested (and reused)
without a model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from .._version import __version__
from ..errors import InvalidParameterError, UnknownSchemeError, did_you_mean

_REGISTRY: dict[str, type[SchemeConfig]] = {}
_ALIASES: dict[str, str] = {}

S = TypeVar("S", bound="type[SchemeConfig]")


@dataclass(frozen=True)
class ModelInfo:
    """What a scheme needs to know about the model it is resolved against (read by an adapter)."""

    head_dim: int
    num_attention_heads: int
    max_position_embeddings: int | None
    rope_theta: float | None = None
    original_max_position_embeddings: int | None = None
    #: fraction of head_dim the family rotates by default, and whether its attention rotates only the
    #: first channels natively (GPT-NeoX) rather than every channel (LLaMA)
    partial_rotary_factor: float = 1.0
    native_partial_rotary: bool = False
    #: per-layer-type families: the model's rotary layer types, and those transformers scales natively
    layer_types: tuple[str, ...] = ()
    scaled_layer_types: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class SchemeConfig:
    """Base of every scheme config.

    Subclasses set ``name`` (the registry key), ``aliases`` and ``kind`` (what an adapter must be able
    to host: ``"rotary"`` for anything expressed as RoPE frequencies, ``"none"`` for NoPE).
    Fields left ``None`` are filled from the model by :meth:`resolve`, so the stored spec is complete.
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    kind: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`InvalidParameterError` on a bad value. Subclasses extend."""

    def resolve(self, info: ModelInfo) -> SchemeConfig:
        """Return a copy with every model-dependent default filled in from ``info``."""
        return self

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_params(cls, **params: Any) -> SchemeConfig:
        """Build from keyword parameters, rejecting unknown keys with a did-you-mean list."""
        valid = cls.field_names()
        for key in params:
            if key not in valid:
                raise InvalidParameterError(
                    f"Unknown parameter {key!r} for scheme {cls.name!r}." + did_you_mean(key, valid or ["(none)"])
                )
        return cls(**params)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``{"scheme": name, "version": ..., **fields}``."""
        out: dict[str, Any] = {"scheme": self.name, "version": __version__}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> SchemeConfig:
        """Inverse of :meth:`to_dict` (the ``version`` key is informational)."""
        if "scheme" not in data:
            raise InvalidParameterError(f"A scheme dict needs a 'scheme' key, got keys {sorted(data)}.")
        params = {k: v for k, v in data.items() if k not in ("scheme", "version")}
        return get_scheme_class(str(data["scheme"])).from_params(**params)


def register_scheme(cls: S) -> S:
    """Class decorator: add a scheme config to the registry under its name and aliases."""
    for key in (cls.name, *cls.aliases):
        if key in _REGISTRY or key in _ALIASES:
            raise ValueError(f"scheme name {key!r} registered twice")
    _REGISTRY[cls.name] = cls
    for alias in cls.aliases:
        _ALIASES[alias] = cls.name
    return cls


def canonical_scheme_name(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise UnknownSchemeError(f"Unknown scheme {name!r}." + did_you_mean(key, [*_REGISTRY, *_ALIASES]))
    return key


def get_scheme_class(name: str) -> type[SchemeConfig]:
    return _REGISTRY[canonical_scheme_name(name)]


def list_schemes() -> dict[str, tuple[str, ...]]:
    """Registered scheme names mapped to their aliases."""
    return {name: cls.aliases for name, cls in sorted(_REGISTRY.items())}


# ----------------------------------------------------------------------------- validation helpers


def check_number(
    scheme: str,
    key: str,
    value: Any,
    *,
    positive: bool = True,
    minimum: float | None = None,
    optional: bool = False,
) -> None:
    """Reject non-numbers (bools included), NaN/inf, and values out of range."""
    if value is None:
        if optional:
            return
        raise InvalidParameterError(f"{scheme}: parameter {key!r} is required.")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameterError(f"{scheme}: {key} must be a number, got {type(value).__name__} {value!r}.")
    if not math.isfinite(value):
        raise InvalidParameterError(f"{scheme}: {key} must be finite, got {value!r}.")
    if positive and value <= 0:
        raise InvalidParameterError(f"{scheme}: {key} must be > 0, got {value!r}.")
    if minimum is not None and value < minimum:
        raise InvalidParameterError(f"{scheme}: {key} must be >= {minimum}, got {value!r}.")


def check_int(scheme: str, key: str, value: Any, *, optional: bool = False) -> None:
    """Reject anything but a positive int (bools included)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidParameterError(f"{scheme}: {key} must be a positive int, got {value!r}.")


def check_choice(scheme: str, key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidParameterError(f"{scheme}: {key} must be one of {', '.join(map(repr, choices))}, got {value!r}.")
