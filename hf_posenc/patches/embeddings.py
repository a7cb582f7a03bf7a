"""Position-embedding modules an adapter installs: zero, sinusoidal, learned (with a clear range check),
and the q/k rotation used where a family's attention has no rotary step of its own."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InvalidParameterError
from ..schemes.absolute import sinusoidal_table


def keep_retired_table(module: nn.Module, retired: torch.Tensor | None) -> None:
    """Keep a replaced table's values under the same state-dict key (``<path>.weight``, a buffer that
    shares its storage), so a saved checkpoint still holds the original model's table."""
    if retired is not None:
        module.register_buffer("weight", retired.detach(), persistent=True)


class ZeroPositions(nn.Module):
    """Stands in for a learned table (GPT-2's ``wpe``) when positions enter elsewhere or not at all.

    It never reads the position values, so no position information reaches the residual stream.
    """

    def __init__(
        self, hidden_size: int, dtype: torch.dtype = torch.float32, retired: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.register_buffer("dtype_ref", torch.zeros(0, dtype=dtype), persistent=False)  # follows .to()
        keep_retired_table(self, retired)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        shape = (*position_ids.shape, self.hidden_size)
        return torch.zeros(shape, device=position_ids.device, dtype=self.dtype_ref.dtype)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}"


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal embeddings computed for the given positions (no length limit)."""

    def __init__(
        self,
        hidden_size: int,
        base: float = 10000.0,
        scale: float = 1.0,
        dtype: torch.dtype = torch.float32,
        retired: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.hidden_size, self.base, self.scale = hidden_size, base, scale
        self.register_buffer("dtype_ref", torch.zeros(0, dtype=dtype), persistent=False)  # follows .to()
        keep_retired_table(self, retired)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        table = sinusoidal_table(position_ids, self.hidden_size, self.base) * self.scale
        return table.to(self.dtype_ref.dtype)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, base={self.base}, scale={self.scale}"


class LearnedPositions(nn.Embedding):
    """``nn.Embedding`` that names the table size when a position falls outside it."""

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        if position_ids.numel() and int(position_ids.max()) >= self.num_embeddings:
            raise InvalidParameterError(
                f"Position {int(position_ids.max())} is past the learned table ({self.num_embeddings} rows); "
                "patch with learned:max_positions=N (extend='interpolate'|'copy'|'random') to extend it."
            )
        return super().forward(position_ids)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim_axis_heads: int) -> torch.Tensor:
    """Rotate ``x`` whose head axis is ``head_dim_axis_heads`` (cos/sin are (B, L, D))."""
    cos = cos.unsqueeze(head_dim_axis_heads)
    sin = sin.unsqueeze(head_dim_axis_heads)
    return (x * cos) + (rotate_half(x) * sin)


def projection_rotation_hook(context, num_heads: int, head_dim: int, parts: int):
    """Forward hook for a projection whose output starts with ``parts`` blocks of (heads x head_dim)
    to rotate (2 for a fused q|k|v projection, 1 for a separate q or k projection)."""
    width = num_heads * head_dim

    def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        shape = (*output.shape[:-1], num_heads, head_dim)
        rotated = [
            apply_rotary(output[..., i * width : (i + 1) * width].view(shape), context.cos, context.sin, 2).flatten(-2)
            for i in range(parts)
        ]
        return torch.cat((*rotated, output[..., parts * width :]), dim=-1)

    return hook
