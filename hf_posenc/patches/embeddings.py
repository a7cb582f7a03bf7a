"""Position-embedding modules an adapter installs: zero, sinusoidal, learned (with a clear range check),
and the q/k rotation used where a family's attention has no rotary step of its own."""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

from ..errors import HookPointMissingError, InvalidParameterError
from ..schemes.absolute import sinusoidal_table
from .wrappers import ForwardWrapper, call_with_state, current_state

#: serialises moving a rotation hook onto a newly wrapped projection (threads may race to do it)
_HOOK_LOCK = threading.Lock()


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


class RotaryAttention(ForwardWrapper):
    """The forward of one attention module of a family whose attention has no rotary step (GPT-2, OPT).

    Each call takes the rotary tables for the ``position_ids`` the layer receives (those of the decoder
    call in progress, or, when gradient checkpointing recomputes the layer in backward, computed again
    from the same ``position_ids``), keeps them as this call's state, and rotates the outputs of the q/k
    ``projections`` in forward hooks. The hooks sit on whatever module is at each projection's name at
    call time: wrapping a projection after patching (peft's LoRA) moves the hook onto the wrapper, so
    the low-rank update is rotated too.
    """

    def __init__(
        self,
        attention: nn.Module,
        decoder: nn.Module,
        source: ForwardWrapper,
        *,
        rotary_attr: str,
        projections: tuple[str, ...],
        num_heads: int,
        head_dim: int,
        parts: int,
    ) -> None:
        super().__init__(attention)
        self.decoder = decoder
        self.source = source
        self.rotary_attr = rotary_attr
        self.projections = projections
        self.num_heads, self.head_dim, self.parts = num_heads, head_dim, parts
        #: projection name -> (module holding the hook, hook id)
        self.hooked: dict[str, tuple[nn.Module, int]] = {}
        self.ensure_hooks()

    def ensure_hooks(self) -> None:
        """Put the rotation hook on the module now at each projection name (moving it if it changed)."""
        for name in self.projections:
            current = getattr(self.module, name)
            if self.hooked.get(name, (None, 0))[0] is current:
                continue
            with _HOOK_LOCK:
                held = self.hooked.get(name)
                if held is not None and held[0] is current:
                    continue
                if held is not None:
                    held[0]._forward_hooks.pop(held[1], None)
                hook = RotateProjection(self, name)
                self.hooked[name] = (current, current.register_forward_hook(hook).id)

    def undo(self) -> None:
        for module, hook_id in self.hooked.values():
            module._forward_hooks.pop(hook_id, None)
        self.hooked.clear()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.ensure_hooks()
        position_ids = kwargs.get("position_ids")
        state = current_state(self.source)
        if state is not None and state.cos is not None and (position_ids is None or position_ids is state.positions):
            tables = (state.cos, state.sin)
        elif position_ids is not None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            tables = getattr(self.decoder, self.rotary_attr)(hidden, position_ids)
        else:
            raise HookPointMissingError(
                f"{type(self.module).__name__} was called without position_ids outside a decoder forward: "
                "hf_posenc cannot tell which positions to rotate (the installed transformers changed how "
                "this family passes positions)."
            )
        return call_with_state(self, tables, self.call_inner, *args, **kwargs)


class RotateProjection:
    """Forward hook rotating the first ``parts`` blocks of (heads x head_dim) of a projection's output
    (2 for a fused q|k|v projection, 1 for a separate q or k projection)."""

    def __init__(self, owner: RotaryAttention, name: str) -> None:
        self.owner = owner
        self.name = name

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        owner = self.owner
        if getattr(owner.module, self.name) is not module:
            return None  # a module that was wrapped since (e.g. LoRA's base layer): its wrapper rotates
        tables = current_state(owner)
        if tables is None:
            raise HookPointMissingError(
                f"{self.name} ran outside its attention module's forward; hf_posenc has no positions to rotate by."
            )
        cos, sin = tables
        width = owner.num_heads * owner.head_dim
        shape = (*output.shape[:-1], owner.num_heads, owner.head_dim)
        rotated = [
            apply_rotary(output[..., i * width : (i + 1) * width].view(shape), cos, sin, 2).flatten(-2)
            for i in range(owner.parts)
        ]
        return torch.cat((*rotated, output[..., owner.parts * width :]), dim=-1)
