"""ALiBi (Press et al. 2022): a per-head linear penalty on query-key distance instead of embeddings."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import InvalidParameterError
from .base import SchemeConfig, check_number, register_scheme


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The paper's geometric slopes ``2^(-8i/n)``; for n not a power of two, the paper's recipe (also
    BLOOM's): the slopes of the nearest lower power of two, then every other slope of the next one."""
    if num_heads < 1:
        raise InvalidParameterError(f"alibi: num_heads must be >= 1, got {num_heads}.")
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.full((), 2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = torch.full((), 2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        remaining = min(closest, num_heads - closest)
        extra = torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32))
        slopes = torch.cat([slopes, extra])
    return slopes


def alibi_bias(slopes: torch.Tensor, q_len: int, kv_len: int, rows: slice | None = None) -> torch.Tensor:
    """Dense ``(H, q_len, kv_len)`` bias ``-slope * (q_pos - k_pos)``; queries are the last ``q_len`` keys
    (only the query ``rows`` of them when given).

    Only the index difference matters: left padding and a cache offset shift query and key positions
    alike, so this equals ALiBi on position ids. Used by the eager and sdpa paths; flex attention
    computes the same value per score without materialising it.
    """
    q_pos = torch.arange(kv_len - q_len, kv_len, device=slopes.device)
    q_pos = q_pos if rows is None else q_pos[rows]
    k_pos = torch.arange(kv_len, device=slopes.device)
    distance = (k_pos[None, :] - q_pos[:, None]).to(torch.float32)
    return slopes.float()[:, None, None] * distance[None]


@register_scheme
@dataclass(frozen=True, kw_only=True)
class AlibiConfig(SchemeConfig):
    """ALiBi with the standard slopes (any head count); ``slope_scale`` multiplies every slope."""

    name: ClassVar[str] = "alibi"
    kind: ClassVar[str] = "alibi"
    length_dependent: ClassVar[bool] = False
    slope_scale: float = 1.0

    def validate(self) -> None:
        check_number(self.name, "slope_scale", self.slope_scale)

    def slopes(self, num_heads: int) -> torch.Tensor:
        return alibi_slopes(num_heads) * self.slope_scale
