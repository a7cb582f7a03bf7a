"""NoPE: no position information at all (Kazemnejad et al. 2023; causal masking alone)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import SchemeConfig, register_scheme


@register_scheme
@dataclass(frozen=True, kw_only=True)
class NoPEConfig(SchemeConfig):
    """Remove every positional signal; the causal mask is the only source of order."""

    name: ClassVar[str] = "nope"
    aliases: ClassVar[tuple[str, ...]] = ("none_pe", "no_position")
    kind: ClassVar[str] = "none"
    length_dependent: ClassVar[bool] = False

    def frequencies(self, head_dim: int, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
        """All-zero frequencies: a rotary host then rotates by the identity."""
        return torch.zeros(head_dim // 2), 1.0

    def length_bucket(self, seq_len: int) -> int:
        return 0
