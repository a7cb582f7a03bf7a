"""flash-attn 2 as an hf_posenc backend: ALiBi through its ``alibi_slopes`` argument, so no bias tensor
exists at all (the kernel adds ``-slope * |i + kv_len - q_len - j|`` per score, causal and aligned to the
last key, i.e. the same relative bias as the other backends).

Padding (a 2D mask) and packed sequences (``position_ids`` restarting, or transformers' padding-free
``cu_seq_lens_*`` kwargs) run through the variable-length kernel, so ALiBi distances never cross a
document or padding boundary. flash-attn itself is imported only when the function runs.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .context import document_starts

NAME = "flash_attention_2"


def flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def _unpad(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Flat indices of the kept tokens of a (B, L) boolean mask, cumulative lengths, longest length."""
    lengths = mask.sum(-1, dtype=torch.int32)
    return mask.flatten().nonzero().flatten(), _cumulative(lengths), int(lengths.max())


def packed_segments(position_ids: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """Cumulative document lengths over the flattened (B, L) batch where positions restart inside a row
    (a new document starts wherever a position is not its predecessor + 1), else None."""
    batch, length = position_ids.shape
    starts = document_starts(position_ids)
    if not bool(starts[:, 1:].any()):
        return None
    starts[:, 0] = True
    flat_starts = starts.flatten().nonzero().flatten()
    bounds = torch.cat([flat_starts, flat_starts.new_tensor([batch * length])])
    lengths = torch.diff(bounds)
    return _cumulative(lengths), int(lengths.max())


def flash_alibi_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_ids: torch.Tensor | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention through flash-attn; ``query`` (B, H, q, D), ``key``/``value`` (B, Hkv, kv, D)."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    from .attention import _slopes  # attention imports this module

    slopes = _slopes(module, query.shape[1])
    if slopes is not None:
        slopes = slopes.to(device=query.device, dtype=torch.float32).contiguous()
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, L, heads, D)
    batch, q_len, heads, dim = q.shape
    kv_len = k.shape[1]
    options = {"dropout_p": dropout, "softmax_scale": scaling, "causal": True, "alibi_slopes": slopes}

    def varlen(qi, ki, vi, cu_q, cu_k, max_q, max_k):
        return flash_attn_varlen_func(qi, ki, vi, cu_q, cu_k, max_q, max_k, **options)

    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(
                f"The flash-attn backend takes a 2D padding mask, got a {attention_mask.dim()}D mask; pass "
                "position_ids for packed sequences, or use eager, sdpa or flex_attention for custom masks."
            )
        mask = attention_mask[:, -kv_len:].bool()
        keys, cu_k, max_k = _unpad(mask)
        # prefill (queries = keys): one unpad serves both; decode: the last q_len columns
        queries, cu_q, max_q = (keys, cu_k, max_k) if q_len == kv_len else _unpad(mask[:, -q_len:])
        flat_k, flat_v = k.reshape(batch * kv_len, *k.shape[2:]), v.reshape(batch * kv_len, *v.shape[2:])
        flat_q = q.reshape(batch * q_len, heads, dim)
        packed = varlen(flat_q[queries], flat_k[keys], flat_v[keys], cu_q, cu_k, max_q, max_k)
        out = packed.new_zeros(batch * q_len, heads, dim).index_copy_(0, queries, packed)
        return out.view(batch, q_len, heads, dim), None
    segments = None
    if cu_seq_lens_q is not None and cu_seq_lens_k is not None:
        segments = (cu_seq_lens_q, cu_seq_lens_k, int(max_length_q), int(max_length_k))
    elif position_ids is not None and q_len == kv_len:
        found = packed_segments(position_ids.expand(batch, -1))
        if found is not None:
            segments = (found[0], found[0], found[1], found[1])
    if segments is not None:
        flat = [t.reshape(-1, *t.shape[2:]) for t in (q, k, v)]
        return varlen(*flat, *segments).view(batch, q_len, heads, dim), None
    return flash_attn_func(q, k, v, **options), None
