"""RoPE and its scalings as scheme configs: rope, linear (PI), ntk, dynamic_ntk, yarn, longrope, llama3.

Parameter names follow transformers' ``rope_parameters`` keys where it has them, so a spec reads the
same in both places, and :meth:`RotaryScheme.native_rope_parameters` writes the native form.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import InvalidParameterError
from . import rope_math as rm
from .base import ModelInfo, SchemeConfig, check_choice, check_int, check_number, register_scheme

REFRESH_MODES = ("exact", "none")


def check_context_factor(scheme: str, factor: float | None) -> None:
    """A context-extension factor below 1 would shrink the context (and max_position_embeddings)."""
    if factor is not None and factor < 1:
        raise InvalidParameterError(
            f"{scheme}: factor must be >= 1 (it multiplies the context length), got {factor!r}; "
            "factor=1 leaves the model's context unchanged."
        )


@dataclass(frozen=True, kw_only=True)
class RotaryScheme(SchemeConfig):
    """A scheme expressed as rotary frequencies (plus an optional cos/sin attention factor)."""

    kind: ClassVar[str] = "rotary"
    #: True when the frequencies depend on the current sequence length (see :meth:`length_bucket`).
    length_dependent: ClassVar[bool] = False
    #: transformers' ``rope_type`` for this scheme, or None where it has no native equivalent.
    native_rope_type: ClassVar[str | None] = None

    rope_theta: float | None = None
    partial_rotary_factor: float | None = None
    #: per-layer-type models (Gemma-3, OLMo-3, ...): the layer types this scheme replaces; None = the
    #: types transformers scales natively (full attention), the others keep their own tables
    layer_types: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.layer_types, str):
            object.__setattr__(self, "layer_types", (self.layer_types,))
        elif isinstance(self.layer_types, list | tuple):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        super().__post_init__()

    def validate(self) -> None:
        if self.layer_types is not None and (
            not self.layer_types or not all(isinstance(t, str) for t in self.layer_types)
        ):
            raise InvalidParameterError(
                f"{self.name}: layer_types must be a non-empty list of names, got {self.layer_types!r}."
            )
        check_number(self.name, "rope_theta", self.rope_theta, optional=True)
        check_number(self.name, "partial_rotary_factor", self.partial_rotary_factor, optional=True)
        if self.partial_rotary_factor is not None and self.partial_rotary_factor > 1:
            raise InvalidParameterError(
                f"{self.name}: partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}."
            )

    # -- resolution against a model ---------------------------------------------------------
    def resolve(self, info: ModelInfo) -> RotaryScheme:
        theta = self.rope_theta if self.rope_theta is not None else info.rope_theta
        if theta is None:
            raise InvalidParameterError(
                f"{self.name}: the model config has no rope_theta to inherit; pass rope_theta=..."
            )
        partial = self.partial_rotary_factor if self.partial_rotary_factor is not None else info.partial_rotary_factor
        dim = rm.rotary_dim(info.head_dim, partial)
        if dim < 2 or dim % 2:
            raise InvalidParameterError(
                f"{self.name}: head_dim {info.head_dim} x partial_rotary_factor "
                f"{partial} gives {dim} rotated channels; it must be even and >= 2."
            )
        resolved = dataclasses.replace(
            self,
            rope_theta=float(theta),
            partial_rotary_factor=float(partial),
            layer_types=self._resolve_layer_types(info),
        )
        return dataclasses.replace(resolved, **resolved._resolve_extra(info))

    def _resolve_layer_types(self, info: ModelInfo) -> tuple[str, ...] | None:
        if not info.layer_types:
            if self.layer_types is not None:
                raise InvalidParameterError(
                    f"{self.name}: layer_types={list(self.layer_types)} is for models with one rotary table per "
                    "layer type (Gemma-3, OLMo-3, ...); this model has a single table, so leave it out."
                )
            return None
        chosen = self.layer_types or info.scaled_layer_types or info.layer_types
        unknown = [t for t in chosen if t not in info.layer_types]
        if unknown:
            raise InvalidParameterError(
                f"{self.name}: layer_types {unknown} are not rotary layer types of this model; "
                f"valid: {', '.join(info.layer_types)}."
            )
        return tuple(chosen)

    def _resolve_extra(self, info: ModelInfo) -> dict[str, Any]:
        return {}

    def _original_length(self, info: ModelInfo, given: int | None) -> int:
        length = given or info.original_max_position_embeddings or info.max_position_embeddings
        if length is None:
            raise InvalidParameterError(
                f"{self.name}: original_max_position_embeddings is missing and the model config has no "
                "max_position_embeddings to take it from; pass original_max_position_embeddings=..."
            )
        return int(length)

    # -- frequencies ------------------------------------------------------------------------
    def frequencies(self, head_dim: int, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
        """Inverse frequencies for ``head_dim // 2`` channel pairs (zeros past the rotary part)."""
        if self.rope_theta is None:
            raise InvalidParameterError(f"{self.name}: resolve the config against a model first.")
        dim = rm.rotary_dim(head_dim, self.partial_rotary_factor)
        inv_freq = self.rotary_inv_freq(dim, self.rope_theta, seq_len)
        return rm.pad_to_head(inv_freq, head_dim), self.attention_scaling(seq_len)

    def rotary_inv_freq(self, dim: int, base: float, seq_len: int | None) -> torch.Tensor:
        return rm.default_inv_freq(dim, base)

    def attention_scaling(self, seq_len: int | None = None) -> float:
        return 1.0

    def length_bucket(self, seq_len: int) -> int:
        """A key that changes exactly when :meth:`frequencies` changes with the sequence length."""
        return 0

    # -- native transformers form -------------------------------------------------------------
    def native_rope_parameters(self, info: ModelInfo) -> dict[str, Any] | None:
        """``rope_parameters`` that make plain transformers compute the same, or None."""
        if self.native_rope_type is None or not self._native_partial_ok(info):
            return None
        out = {"rope_type": self.native_rope_type, "rope_theta": self.rope_theta, **self._native_extra()}
        if info.native_partial_rotary:
            out["partial_rotary_factor"] = self.partial_rotary_factor
        return out

    def _native_partial_ok(self, info: ModelInfo) -> bool:
        return self.partial_rotary_factor == 1.0 or info.native_partial_rotary

    def _native_extra(self) -> dict[str, Any]:
        return {}

    def native_max_position_embeddings(self) -> int | None:
        """The context length to write into ``config.max_position_embeddings``, if it changes."""
        return None


@register_scheme
@dataclass(frozen=True, kw_only=True)
class RoPEConfig(RotaryScheme):
    """Plain rotary embedding (RoFormer); ``rope_theta`` and ``partial_rotary_factor`` adjustable."""

    name: ClassVar[str] = "rope"
    aliases: ClassVar[tuple[str, ...]] = ("rotary", "default")
    native_rope_type: ClassVar[str | None] = "default"


@dataclass(frozen=True, kw_only=True)
class _FactorScheme(RotaryScheme):
    factor: float | None = None

    def validate(self) -> None:
        super().validate()
        check_number(self.name, "factor", self.factor)
        check_context_factor(self.name, self.factor)


@register_scheme
@dataclass(frozen=True, kw_only=True)
class LinearConfig(_FactorScheme):
    """Position interpolation (Chen et al. 2023): positions divided by ``factor``."""

    name: ClassVar[str] = "linear"
    aliases: ClassVar[tuple[str, ...]] = ("pi", "position_interpolation")
    native_rope_type: ClassVar[str | None] = "linear"
    original_max_position_embeddings: int | None = None

    def validate(self) -> None:
        super().validate()
        check_int(self.name, "original_max_position_embeddings", self.original_max_position_embeddings, optional=True)

    def _resolve_extra(self, info: ModelInfo) -> dict[str, Any]:
        return {"original_max_position_embeddings": self._original_length(info, self.original_max_position_embeddings)}

    def rotary_inv_freq(self, dim: int, base: float, seq_len: int | None) -> torch.Tensor:
        return rm.linear_inv_freq(dim, base, self.factor)

    def _native_extra(self) -> dict[str, Any]:
        return {"factor": self.factor}

    def native_max_position_embeddings(self) -> int | None:
        return int(self.original_max_position_embeddings * self.factor)


@register_scheme
@dataclass(frozen=True, kw_only=True)
class NTKConfig(RotaryScheme):
    """Fixed NTK-aware scaling: ``rope_theta * alpha^(d/(d-2))``; give ``alpha`` or ``factor``."""

    name: ClassVar[str] = "ntk"
    aliases: ClassVar[tuple[str, ...]] = ("ntk_aware", "fixed_ntk")
    native_rope_type: ClassVar[str | None] = "default"
    factor: float | None = None
    alpha: float | None = None
    #: the trained context; the native form declares ``original x scale`` as ``max_position_embeddings``,
    #: so engines that size their tables by it (vLLM) serve the extended context
    original_max_position_embeddings: int | None = None

    def validate(self) -> None:
        super().validate()
        check_int(self.name, "original_max_position_embeddings", self.original_max_position_embeddings, optional=True)
        if (self.factor is None) == (self.alpha is None):
            raise InvalidParameterError("ntk: give exactly one of factor or alpha (they are synonyms).")
        check_number(self.name, "factor", self.factor, optional=True)
        check_number(self.name, "alpha", self.alpha, optional=True)
        check_context_factor(self.name, self.scale)

    @property
    def scale(self) -> float:
        return self.alpha if self.alpha is not None else self.factor

    def scaled_theta(self, head_dim: int) -> float:
        return rm.ntk_base(rm.rotary_dim(head_dim, self.partial_rotary_factor), self.rope_theta, self.scale)

    def rotary_inv_freq(self, dim: int, base: float, seq_len: int | None) -> torch.Tensor:
        return rm.default_inv_freq(dim, rm.ntk_base(dim, base, self.scale))

    def _resolve_extra(self, info: ModelInfo) -> dict[str, Any]:
        given = self.original_max_position_embeddings
        if not (given or info.original_max_position_embeddings or info.max_position_embeddings):
            return {}  # a config without a context length (BLOOM's): the native form keeps what it has
        return {"original_max_position_embeddings": self._original_length(info, given)}

    def native_max_position_embeddings(self) -> int | None:
        original = self.original_max_position_embeddings
        return None if original is None else int(original * self.scale)

    def native_rope_parameters(self, info: ModelInfo) -> dict[str, Any] | None:
        # A fixed NTK model is a plain RoPE model with a larger theta.
        if not self._native_partial_ok(info):
            return None
        out = {"rope_type": "default", "rope_theta": self.scaled_theta(info.head_dim)}
        if info.native_partial_rotary:
            out["partial_rotary_factor"] = self.partial_rotary_factor
        return out


@register_scheme
@dataclass(frozen=True, kw_only=True)
class DynamicNTKConfig(_FactorScheme):
    """Dynamic NTK: NTK scaling whose strength follows the current length past the original.

    ``refresh="exact"`` re-encodes the KV cache whenever the scale changes during cached decoding, so
    every cached step equals a fresh forward of the same prefix (transformers' native dynamic rope
    does not: huggingface/transformers#25104). ``bucket_ratio=1`` changes the scale at every length,
    matching transformers' formula exactly (a refresh per decoded token past the original length,
    O(n^2)); ``bucket_ratio=r>1`` rounds the length up to ``original * r^k``, so refreshes are rare
    and their total cost is amortised O(n). ``refresh="none"`` keeps stale cached keys, as transformers does.
    """

    name: ClassVar[str] = "dynamic_ntk"
    aliases: ClassVar[tuple[str, ...]] = ("dynamic",)
    native_rope_type: ClassVar[str | None] = "dynamic"
    length_dependent: ClassVar[bool] = True
    original_max_position_embeddings: int | None = None
    refresh: str = "exact"
    bucket_ratio: float = 1.0

    def validate(self) -> None:
        super().validate()
        check_int(self.name, "original_max_position_embeddings", self.original_max_position_embeddings, optional=True)
        check_choice(self.name, "refresh", self.refresh, REFRESH_MODES)
        check_number(self.name, "bucket_ratio", self.bucket_ratio, minimum=1.0)

    def _resolve_extra(self, info: ModelInfo) -> dict[str, Any]:
        # transformers' dynamic rope measures against config.max_position_embeddings.
        given = self.original_max_position_embeddings or info.max_position_embeddings
        return {"original_max_position_embeddings": self._original_length(info, given)}

    def effective_length(self, seq_len: int) -> int:
        original = self.original_max_position_embeddings
        if seq_len <= original:
            return original
        if self.bucket_ratio == 1.0:
            return seq_len
        steps = math.ceil(math.log(seq_len / original) / math.log(self.bucket_ratio) - 1e-9)
        return max(seq_len, math.ceil(original * self.bucket_ratio**steps))

    def length_bucket(self, seq_len: int) -> int:
        return self.effective_length(seq_len)

    def rotary_inv_freq(self, dim: int, base: float, seq_len: int | None) -> torch.Tensor:
        length = self.effective_length(seq_len or 0)
        return rm.dynamic_ntk_inv_freq(dim, base, self.factor, length, self.original_max_position_embeddings)

    def _native_extra(self) -> dict[str, Any]:
        return {"factor": self.factor}

    def native_rope_parameters(self, info: ModelInfo) -> dict[str, Any] | None:
        return super().native_rope_parameters(info) if self.bucket_ratio == 1.0 else None


@register_scheme
@dataclass(frozen=True, kw_only=True)
class YarnConfig(_FactorScheme):
    """YaRN (Peng et al. 2023): NTK-by-parts interpolation plus an attention temperature."""

    name: ClassVar[str] = "yarn"
    native_rope_type: ClassVar[str | None] = "yarn"
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def validate(self) -> None:
        super().validate()
        check_int(self.name, "original_max_position_embeddings", self.original_max_position_embeddings, optional=True)
        check_number(self.name, "beta_fast", self.beta_fast)
        check_number(self.name, "beta_slow", self.beta_slow)
        if self.beta_fast < self.beta_slow:
            raise InvalidParameterError(f"yarn: beta_fast ({self.beta_fast}) must be >= beta_slow ({self.beta_slow}).")
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            check_number(self.name, key, getattr(self, key), optional=True)
        if not isinstance(self.truncate, bool):
            raise InvalidParameterError(f"yarn: truncate must be a bool, got {self.truncate!r}.")

    def _resolve_extra(self, info: ModelInfo) -> dict[str, Any]:
        return {"original_max_position_embeddings": self._original_length(info, self.original_max_position_embeddings)}

    def rotary_inv_freq(self, dim: int, base: float, seq_len: int | None) -> torch.Tensor:
        return rm.yarn_inv_freq(
            dim,
            base,
            self.factor,
            self.original_max_position_embeddings,
            self.beta_fast,
            self.beta_slow,
            self.truncate,
        )

    def attention_scaling(self, seq_len: int | None = None) -> float:
        return rm.yarn_attention_factor(self.factor, self.attention_factor, self.mscale, self.mscale_all_dim)

    def _native_extra(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "factor": self.factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "beta_fast": self.beta_fast,
            "beta_slow": self.beta_slow,
            "truncate": self.truncate,
        }
        for key in ("mscale", "mscale_all_dim"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.attention_factor is not None:
            out["attention_factor"] = float(self.attention_factor)
        return out

    def native_max_position_embeddings(self) -> int | None:
        return int(self.original_max_position_embeddings * self.factor)


@register_scheme
@dataclass(frozen=True, kw_only=True)
class LongRoPEConfig(RotaryScheme):
    """LongRoPE (Ding et al. 2024): searched per-channel factors, short set up to the original length.

    Switching from ``short_factor`` to ``long_factor`` changes every cached key; ``refresh="exact"``
    re-encodes the cache at that switch so cached decoding equals a fresh forward.
    """

    name: ClassVar[str] = "longrope"
    aliases: ClassVar[tuple[str, ...]] = ("long_rope",)
    native_rope_type: ClassVar[str | None] = "longrope"
    length_dependent: ClassVar[bool] = True
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    original_max_position_embeddings: int | None = None
    factor: float | None = None
    attention_factor: float | None = None
    refresh: str = "exact"

    def __post_init__(self) -> None:
        for key in ("short_factor", "long_factor"):
            value = getattr(self, key)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, key, tuple(value))
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        for key in ("short_factor", "long_factor"):
            value = getattr(self, key)
            if not isinstance(value, tuple) or not value:
                raise InvalidParameterError(f"longrope: {key} (a list of numbers) is required, got {value!r}.")
            for v in value:
                check_number(self.name, key, v)
        check_int(self.name, "original_max_position_embeddings", self.original_max_position_embeddings, optional=True)
        check_number(self.name, "factor", self.factor, optional=True)
        check_context_factor(self.name, self.factor)
        check_number(self.name, "attention_factor", self.attention_factor, optional=True)
        check_choice(self.name, "refresh", self.refresh, REFRESH_MODES)

    def _resolve_extra(self, info: ModelInfo) -> dict[str, Any]:
        original = self._original_length(info, self.original_max_position_embeddings)
        dim = rm.rotary_dim(info.head_dim, self.partial_rotary_factor)
        for key in ("short_factor", "long_factor"):
            if len(getattr(self, key)) != dim // 2:
                raise InvalidParameterError(
                    f"longrope: {key} needs {dim // 2} values (rotated channels / 2), got {len(getattr(self, key))}."
                )
        factor = self.factor
        if factor is None:
            factor = (info.max_position_embeddings or original) / original
        return {"original_max_position_embeddings": original, "factor": float(factor)}

    def length_bucket(self, seq_len: int) -> int:
        return int(seq_len > self.original_max_position_embeddings)

    def rotary_inv_freq(self, dim: int, base: float, seq_len: int | None) -> torch.Tensor:
        long = seq_len is not None and self.length_bucket(seq_len) == 1
        return rm.longrope_inv_freq(dim, base, self.long_factor if long else self.short_factor)

    def attention_scaling(self, seq_len: int | None = None) -> float:
        given = self.attention_factor
        if given is not None:
            return float(given)
        return rm.longrope_attention_factor(self.factor, self.original_max_position_embeddings)

    def _native_extra(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "short_factor": list(self.short_factor),
            "long_factor": list(self.long_factor),
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "factor": self.factor,
        }
        if self.attention_factor is not None:
            out["attention_factor"] = float(self.attention_factor)
        return out


@register_scheme
@dataclass(frozen=True, kw_only=True)
class Llama3Config(_FactorScheme):
    """Llama 3.1 scaling: long wavelengths interpolated, short kept, smooth band in between."""

    name: ClassVar[str] = "llama3"
    native_rope_type: ClassVar[str | None] = "llama3"
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None

    def validate(self) -> None:
        super().validate()
        check_number(self.name, "low_freq_factor", self.low_freq_factor)
        check_number(self.name, "high_freq_factor", self.high_freq_factor)
        if self.high_freq_factor <= self.low_freq_factor:
            raise InvalidParameterError(
                f"llama3: high_freq_factor ({self.high_freq_factor}) must exceed "
                f"low_freq_factor ({self.low_freq_factor})."
            )
        check_int(self.name, "original_max_position_embeddings", self.original_max_position_embeddings, optional=True)

    def _resolve_extra(self, info: ModelInfo) -> dict[str, Any]:
        return {"original_max_position_embeddings": self._original_length(info, self.original_max_position_embeddings)}

    def rotary_inv_freq(self, dim: int, base: float, seq_len: int | None) -> torch.Tensor:
        return rm.llama3_inv_freq(
            dim,
            base,
            self.factor,
            self.low_freq_factor,
            self.high_freq_factor,
            self.original_max_position_embeddings,
        )

    def _native_extra(self) -> dict[str, Any]:
        return {
            "factor": self.factor,
            "low_freq_factor": self.low_freq_factor,
            "high_freq_factor": self.high_freq_factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
        }

    def native_max_position_embeddings(self) -> int | None:
        return int(self.original_max_position_embeddings * self.factor)


@register_scheme
@dataclass(frozen=True, kw_only=True)
class ProportionalConfig(RotaryScheme):
    """Proportional RoPE (Gemma-4's global layers): the first ``partial_rotary_factor`` of the channel
    pairs rotate with exponents measured against the whole head (``theta^(-2i / head_dim)``), the
    rest get zero frequency; every frequency is divided by ``factor``. Equal to transformers'
    ``proportional`` rope type."""

    name: ClassVar[str] = "proportional"
    native_rope_type: ClassVar[str | None] = "proportional"
    factor: float = 1.0

    def validate(self) -> None:
        super().validate()
        check_number(self.name, "factor", self.factor)
        check_context_factor(self.name, self.factor)

    def frequencies(self, head_dim: int, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
        if self.rope_theta is None:
            raise InvalidParameterError(f"{self.name}: resolve the config against a model first.")
        angles = int(self.partial_rotary_factor * head_dim // 2)
        exponents = torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / head_dim
        rotated = 1.0 / (self.rope_theta**exponents)
        inv_freq = torch.cat([rotated, torch.zeros(head_dim // 2 - angles)]) / self.factor
        return inv_freq, 1.0

    def _native_partial_ok(self, info: ModelInfo) -> bool:
        # zero-frequency pairs are part of the native definition, whose tables always span the whole head:
        # families that rotate only a prefix (GPT-NeoX, Phi) cannot take them natively
        return not info.native_partial_rotary

    def _native_extra(self) -> dict[str, Any]:
        return {"factor": self.factor, "partial_rotary_factor": self.partial_rotary_factor}


#: transformers' rope_type -> the hf_posenc scheme computing the same tables
NATIVE_ROPE_TYPES = {
    "default": "rope",
    "linear": "linear",
    "dynamic": "dynamic_ntk",
    "yarn": "yarn",
    "longrope": "longrope",
    "llama3": "llama3",
    "proportional": "proportional",
}
#: rope_parameters keys that carry no frequency information
_BOOKKEEPING_KEYS = ("rope_type", "type")


def scheme_from_rope_parameters(params: dict[str, Any]) -> RotaryScheme:
    """The scheme that reproduces a model's own ``rope_parameters`` (one layer type's), or an
    :class:`UnsupportedSchemeError` naming what hf_posenc does not model (e.g. multimodal RoPE sections)."""
    from ..errors import UnsupportedSchemeError
    from .base import get_scheme_class

    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in NATIVE_ROPE_TYPES:
        raise UnsupportedSchemeError(
            f"rope_type {rope_type!r} has no hf_posenc equivalent (known: {', '.join(NATIVE_ROPE_TYPES)})."
        )
    cls = get_scheme_class(NATIVE_ROPE_TYPES[rope_type])
    fields = set(cls.field_names())
    unknown = sorted(k for k, v in params.items() if k not in fields and k not in _BOOKKEEPING_KEYS and v is not None)
    if unknown:
        raise UnsupportedSchemeError(
            f"rope_parameters keys {unknown} (rope_type {rope_type!r}) have no hf_posenc equivalent"
            + (" (multimodal RoPE sections)" if any(k.startswith("mrope") for k in unknown) else "")
            + "."
        )
    kwargs = {k: v for k, v in params.items() if k in fields and v is not None and k != "layer_types"}
    return cls.from_params(**kwargs)
