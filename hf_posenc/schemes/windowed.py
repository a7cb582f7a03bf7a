"""Attention-level rotary schemes: each score sees ordinary rotary positions inside a neighbour window
and remapped positions beyond it (one softmax over both). The math is in :mod:`.relative_math`.

- ``self_extend`` (Jin et al. 2024): beyond the window, query ``i // G + W - W // G``, key ``j // G``.
- ``rerope`` (Su 2023): beyond the window every distance reads as W (query W, key 0); leaky
  (``leak=k``): ``W + (d - W) / k`` (query ``i / k + W - W / k``, key ``j / k``).

Both run on top of any rotary frequency scheme (``rope=`` a scheme spec such as
``{"scheme": "yarn", "factor": 2}``; default: the model's own RoPE). A length-dependent one (dynamic NTK,
LongRoPE) picks its frequencies from the sequence length (the largest ordinary position + 1), the same
for the near and the far rotations, and with ``refresh="exact"`` (its default) cached decoding re-encodes
the prefix when they change, as it does under the frequency scheme alone. Neither exists in
transformers' configs or in serving engines: a saved model reloads patched with
``hf_posenc.from_pretrained`` only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import InvalidParameterError
from .base import ModelInfo, SchemeConfig, check_number, register_scheme
from .relative_math import check_group_window, grouped_key_positions, grouped_query_positions
from .rope import RoPEConfig, RotaryScheme


@dataclass(frozen=True, kw_only=True)
class WindowedScheme(SchemeConfig):
    """Base of the windowed rotary schemes: ``window_size`` and the frequency scheme underneath."""

    kind: ClassVar[str] = "windowed"
    window_size: int
    #: the frequency scheme underneath, as a spec dict ({"scheme": "yarn", "factor": 2.0}); None: plain RoPE
    #: with the model's own parameters
    rope: Mapping[str, Any] | None = None

    def validate(self) -> None:
        if self.rope is not None:
            self.frequency_scheme()  # raises on a bad spec

    def frequency_scheme(self) -> RotaryScheme:
        """The frequency scheme the rotations use (unresolved unless :meth:`resolve` ran); built once."""
        built = self.__dict__.get("_frequency_scheme")
        if built is None:
            built = self._build_frequency_scheme()
            object.__setattr__(self, "_frequency_scheme", built)  # a cache, not a field: replace() drops it
        return built

    # the cache refresh and the rotary module ask these of the scheme; the frequency scheme answers
    @property
    def length_dependent(self) -> bool:
        return self.frequency_scheme().length_dependent

    @property
    def refresh(self) -> str:
        return getattr(self.frequency_scheme(), "refresh", "none")

    def length_bucket(self, seq_len: int) -> int:
        return self.frequency_scheme().length_bucket(seq_len)

    def _build_frequency_scheme(self) -> RotaryScheme:
        if self.rope is None:
            return RoPEConfig()
        if not isinstance(self.rope, Mapping) or "scheme" not in self.rope:
            raise InvalidParameterError(
                f"{self.name}: rope must be a scheme spec such as {{'scheme': 'yarn', 'factor': 2.0}}, "
                f"got {self.rope!r}."
            )
        scheme = SchemeConfig.from_dict(self.rope)
        if not isinstance(scheme, RotaryScheme) or scheme.kind != "rotary":
            raise InvalidParameterError(f"{self.name}: rope must name a rotary frequency scheme, got {scheme.name!r}.")
        return scheme

    def resolve(self, info: ModelInfo) -> WindowedScheme:
        resolved = self.frequency_scheme().resolve(info).to_dict()
        resolved.pop("version", None)
        return dataclasses.replace(self, rope=resolved)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.rope is not None:
            out["rope"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.rope.items()}
        return out

    def far_positions(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (float) the query and key rotations use for scores beyond the window."""
        raise NotImplementedError


@register_scheme
@dataclass(frozen=True, kw_only=True)
class SelfExtendConfig(WindowedScheme):
    """Self-Extend: neighbour attention inside ``window_size``, grouped attention (groups of
    ``group_size`` positions) beyond it. Requires ``window_size >= group_size``. When the window is not a
    multiple of the group, the shift uses ``window_size // group_size`` (floor), in prefill and decode alike."""

    name: ClassVar[str] = "self_extend"
    aliases: ClassVar[tuple[str, ...]] = ("selfextend", "longlm")
    group_size: int

    def validate(self) -> None:
        check_group_window(self.group_size, self.window_size)
        super().validate()

    def far_positions(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        far_q = grouped_query_positions(query, self.group_size, self.window_size)
        return far_q.float(), grouped_key_positions(key, self.group_size).float()


@register_scheme
@dataclass(frozen=True, kw_only=True)
class ReRoPEConfig(WindowedScheme):
    """ReRoPE: distances beyond ``window_size`` read as ``window_size``; with ``leak=k`` (leaky ReRoPE)
    as ``window_size + (d - window_size) / k``."""

    name: ClassVar[str] = "rerope"
    aliases: ClassVar[tuple[str, ...]] = ("leaky_rerope",)
    leak: float | None = None

    def validate(self) -> None:
        if isinstance(self.window_size, bool) or not isinstance(self.window_size, int) or self.window_size < 1:
            raise InvalidParameterError(f"rerope: window_size must be an integer >= 1, got {self.window_size!r}.")
        check_number(self.name, "leak", self.leak, minimum=1.0, optional=True)
        super().validate()

    def far_positions(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.leak is None:
            return torch.full_like(query, self.window_size, dtype=torch.float), torch.zeros_like(key, dtype=torch.float)
        shift = self.window_size - self.window_size / self.leak
        return query.float() / self.leak + shift, key.float() / self.leak
