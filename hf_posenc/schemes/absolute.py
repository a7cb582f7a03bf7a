"""Absolute position embeddings added to the token embeddings: sinusoidal and learned tables."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import InvalidParameterError
from .base import ModelInfo, SchemeConfig, check_choice, check_int, check_number, register_scheme

EXTEND_METHODS = ("interpolate", "copy", "random")


def sinusoidal_table(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Vaswani et al. 2017: ``PE[p, 2i] = sin(p / base^(2i/d))``, ``PE[p, 2i+1] = cos(...)``; any length."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq
    table = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)
    return table[..., :dim]


def extend_table(table: torch.Tensor, length: int, method: str, std: float = 0.02) -> torch.Tensor:
    """Resize a learned ``(n, d)`` table to ``length`` rows, keeping the first ``min(n, length)`` rows.

    ``interpolate``: new rows by linear interpolation of the old table stretched to the new length
    (as for ViT/PI-style resizing), then the first ``n`` rows are restored exactly. ``copy``: tile the
    old table. ``random``: new rows drawn from N(0, std). Shrinking keeps the first ``length`` rows.
    """
    n, _ = table.shape
    if length <= n:
        return table[:length].clone()
    with torch.no_grad():
        if method == "interpolate":
            stretched = torch.nn.functional.interpolate(
                table.T[None].float(), size=length, mode="linear", align_corners=True
            )[0].T.to(table.dtype)
        elif method == "copy":
            stretched = table.repeat(math.ceil(length / n), 1)[:length].clone()
        else:
            stretched = torch.empty(length, table.shape[1], dtype=table.dtype, device=table.device)
            stretched.normal_(0.0, std)
        stretched[:n] = table
    return stretched


@register_scheme
@dataclass(frozen=True, kw_only=True)
class SinusoidalConfig(SchemeConfig):
    """Fixed sinusoidal embeddings added to the input embeddings (``scale`` multiplies them)."""

    name: ClassVar[str] = "sinusoidal"
    aliases: ClassVar[tuple[str, ...]] = ("sin", "sinusoid")
    kind: ClassVar[str] = "absolute"
    length_dependent: ClassVar[bool] = False
    base: float = 10000.0
    scale: float = 1.0

    def validate(self) -> None:
        check_number(self.name, "base", self.base)
        check_number(self.name, "scale", self.scale, positive=False)


@register_scheme
@dataclass(frozen=True, kw_only=True)
class LearnedConfig(SchemeConfig):
    """A learned absolute table. On a model that has one (GPT-2), it is resized to ``max_positions``
    (``extend`` picks how new rows are filled); elsewhere a new table is created (``init_std``)."""

    name: ClassVar[str] = "learned"
    aliases: ClassVar[tuple[str, ...]] = ("learned_absolute", "absolute")
    kind: ClassVar[str] = "absolute"
    length_dependent: ClassVar[bool] = False
    max_positions: int | None = None
    extend: str = "interpolate"
    init_std: float = 0.02
    new_table: bool = False

    def resolve(self, info: ModelInfo) -> LearnedConfig:
        if self.max_positions is not None:
            return self
        if info.max_position_embeddings is None:
            raise InvalidParameterError("learned: pass max_positions=N (the model config has no context length).")
        return dataclasses.replace(self, max_positions=int(info.max_position_embeddings))

    def validate(self) -> None:
        check_int(self.name, "max_positions", self.max_positions, optional=True)
        check_choice(self.name, "extend", self.extend, EXTEND_METHODS)
        check_number(self.name, "init_std", self.init_std)
        if not isinstance(self.new_table, bool):
            raise InvalidParameterError(f"learned: new_table must be a bool, got {self.new_table!r}.")
