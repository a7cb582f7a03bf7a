"""S²-Attn (shifted sparse attention, LongLoRA: Chen et al. 2024, ICLR): a training-time attention.

While the model trains, each sequence of length L is split into groups of ``g = L * group_fraction``
tokens and attention stays inside a group; half of the heads see the groups shifted by ``g / 2``, so
information flows between neighbouring groups. Attention costs O(L * g) instead of O(L^2). In eval mode
(and once :meth:`S2Attention.undo` ran) the model attends fully, as LongLoRA evaluates and serves.

Causality is kept by the tokens' original order: in the shifted heads the last group wraps around and
holds the sequence's last ``g / 2`` tokens followed by its first ``g / 2``; those first tokens never
attend to the last ones (LongLoRA's reference rolls the tokens and applies a plain causal mask per
group, which lets them).

Queries and keys arrive rotated by the family as usual (any frequency scheme, patched or native); the
term only regroups them. It runs on the eager, sdpa and flex backends (every group through sdpa).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedSchemeError
from .backends import TERM_ATTR, AttentionTerm, register_backends, registered_name, term_of
from .handle import PatchHandle


def group_size(length: int, fraction: float) -> int:
    """The group size for a sequence of ``length``: ``length * fraction``, even, dividing ``length``."""
    size = round(length * fraction)
    if size < 2 or size % 2 or length % size:
        raise ValueError(
            f"S²-Attn: a group of {fraction} x {length} = {length * fraction:g} tokens must be an even number "
            f">= 2 dividing the sequence length; choose seq_len and group_fraction so it is (e.g. 1/4 of a "
            "multiple of 8)."
        )
    return size


def shifted_order(length: int, size: int, device: torch.device) -> torch.Tensor:
    """Token order of the shifted heads: the sequence rolled left by ``size // 2``."""
    return torch.roll(torch.arange(length, device=device), -(size // 2))


class ShiftedShortTerm(AttentionTerm):
    """S²-Attn on one attention module while it trains; full attention otherwise."""

    def __init__(self, group_fraction: float) -> None:
        super().__init__()
        self.group_fraction = group_fraction

    def attend(self, backend, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        from .attention import PLAIN_FUNCTIONS

        length = query.shape[2]
        if not module.training or key.shape[2] != length:  # eval, or a cached step: full attention
            return PLAIN_FUNCTIONS[backend](
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        return shifted_short_attention(query, key, value, attention_mask, self.group_fraction, scaling, dropout)

    def extra_repr(self) -> str:
        return f"group_fraction={self.group_fraction}"


def shifted_short_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    fraction: float,
    scaling: float | None,
    dropout: float,
) -> tuple[torch.Tensor, None]:
    """S²-Attn of ``query`` (B, H, L, D) over ``key``/``value`` (B, Hkv, L, D): returns (B, L, H, D)."""
    batch, heads, length, dim = query.shape
    size = group_size(length, fraction)
    repeat = heads // key.shape[1]
    key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    if attention_mask is not None:
        return _masked_groups(query, key, value, attention_mask, size, scaling, dropout)
    groups, half, shift = length // size, heads // 2, size // 2
    # the second half of the heads sees the sequence rolled left by half a group
    q, k, v = (torch.cat((t[:, : heads - half], t[:, heads - half :].roll(-shift, 2)), 1) for t in (query, key, value))
    # 4-D (B, H * n, g, D): torch's fused sdpa kernels take 4-D inputs (5-D would run the math path)
    q, k, v = (t.reshape(batch, heads * groups, size, dim) for t in (q, k, v))
    # inside every group the slots are in original order (plain causal), except the shifted heads' last
    # group, which wraps: its first half holds the sequence's end, its second half the sequence's start
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scaling)
    if half:
        order = torch.roll(torch.arange(length, device=query.device), -shift)[-size:]
        wrapped = order[None, :] <= order[:, None]
        last = [t.view(batch, heads, groups, size, dim)[:, heads - half :, -1] for t in (q, k, v)]
        fixed = F.scaled_dot_product_attention(*last, attn_mask=wrapped, dropout_p=dropout, scale=scaling)
        out = out.view(batch, heads, groups, size, dim).clone()
        out[:, heads - half :, -1] = fixed
    out = out.reshape(batch, heads, length, dim)
    out = torch.cat((out[:, : heads - half], out[:, heads - half :].roll(shift, 2)), 1)
    return out.transpose(1, 2).contiguous(), None


def _masked_groups(query, key, value, attention_mask, size, scaling, dropout) -> tuple[torch.Tensor, None]:
    """S²-Attn with the model's own mask (padding, packed documents) applied inside every group."""
    batch, heads, length, dim = query.shape
    groups = length // size
    plain = torch.arange(length, device=query.device)
    shifted = shifted_order(length, size, query.device)
    half = heads // 2
    # per head: the original index of each slot (first half of the heads plain, second half shifted)
    order = torch.cat((plain.expand(heads - half, -1), shifted.expand(half, -1)))  # (H, L)
    index = order[None, :, :, None].expand(batch, heads, length, dim)
    q, k, v = (t.gather(2, index).view(batch, heads, groups, size, dim) for t in (query, key, value))
    slots = order.view(heads, groups, size)
    allowed = slots[:, :, None, :] <= slots[:, :, :, None]  # (H, n, g, g): causal by original position
    mask = allowed[None] & _grouped_mask(attention_mask, order, groups, size, batch)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
    out = out.view(batch, heads, length, dim)
    restored = torch.empty_like(out).scatter_(2, index, out)
    return restored.transpose(1, 2).contiguous(), None


def _grouped_mask(mask: Any, order: torch.Tensor, groups: int, size: int, batch: int) -> torch.Tensor:
    """The model's own mask (padding, packed documents) at each group's (query, key) slots, as booleans
    (B, H, n, g, g)."""
    from torch.nn.attention.flex_attention import BlockMask

    heads = order.shape[0]
    slots = order.view(heads, groups, size)
    q_idx, k_idx = slots[None, :, :, :, None], slots[None, :, :, None, :]
    b_idx = torch.arange(batch, device=order.device)[:, None, None, None, None]
    if isinstance(mask, BlockMask):
        zero = torch.zeros((), dtype=torch.long, device=order.device)
        return mask.mask_mod(b_idx, zero, q_idx, k_idx).expand(batch, heads, groups, size, size)
    keep = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return keep[b_idx, 0, q_idx, k_idx]


class S2Attention(PatchHandle):
    """S²-Attn on a model's attention modules (``enable_s2_attn``); :meth:`undo` removes it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, scheme=None, adapter=None)  # not a position patch: no scheme, no adapter

    def __repr__(self) -> str:
        return f"S2Attention({'active' if self.active else 'undone'})"


def enable_s2_attn(model: nn.Module, group_fraction: float = 0.25) -> S2Attention:
    """Train ``model`` (a transformers model, patched or not, or a peft model around one) with S²-Attn.

    Every attention module gets a :class:`ShiftedShortTerm`; the model runs through hf_posenc's
    registered backend of its current one (eager, sdpa or flex_attention). Refused for families whose
    attention does not go through transformers' attention interface, and on top of an attention-level
    scheme (ALiBi, Self-Extend, ReRoPE)."""
    from ..api import patch_target
    from .backends import BACKENDS, base_backend
    from .base import get_adapter
    from .rotary_family import RotaryFamilyAdapter

    if not (isinstance(group_fraction, float | int) and 0 < group_fraction < 1):
        raise ValueError(f"S²-Attn: group_fraction must be in (0, 1), got {group_fraction!r}.")
    target = patch_target(model)
    adapter = get_adapter(target)
    if not isinstance(adapter, RotaryFamilyAdapter):
        raise UnsupportedSchemeError(
            f"S²-Attn needs a rotary family on transformers' attention interface; {target.config.model_type} is "
            f"handled by the {adapter.name} adapter."
        )
    attentions = adapter.interface_attentions(adapter.decoder(target), target.config)
    taken = [type(term_of(a)).__name__ for a in attentions if term_of(a) is not None]
    if taken:
        raise UnsupportedSchemeError(
            f"S²-Attn cannot run on top of an attention-level scheme ({taken[0]}); use a frequency scheme."
        )
    backend = base_backend(getattr(target.config, "_attn_implementation", None) or "eager")
    if backend not in BACKENDS:
        raise UnsupportedSchemeError(f"S²-Attn runs on attn_implementation {', '.join(BACKENDS)}, not {backend!r}.")
    handle = S2Attention(target)
    term = ShiftedShortTerm(float(group_fraction))
    for attention in attentions:
        handle.set_attr(attention, TERM_ATTR, term)
    register_backends()
    if target.config._attn_implementation != registered_name(backend):
        handle.set_config(target.config, "_attn_implementation", registered_name(backend))
    return handle
