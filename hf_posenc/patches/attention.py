"""ALiBi's attention term, and the attention functions of every hf_posenc backend (with no term they
run plain attention; see :mod:`.backends` for the registration and the extension point).

The functions read the ALiBi slopes from the term on the attention module they are called with (the
adapter installed it), so two models in one process never share state.

- eager: scores + dense bias + mask, softmax in fp32 (the reference path).
- sdpa: transformers' sdpa with the bias as ``position_bias`` (a materialised (1, H, q, kv) float
  mask: the fallback).
- flex_attention: the bias is a ``score_mod`` computed per score; no L x L tensor exists.
- flash_attention_2: flash-attn's ``alibi_slopes`` (GPU, when flash-attn is installed).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._compat import recompile_headroom
from ..errors import UnsupportedSchemeError
from ..schemes.alibi import alibi_bias
from .backends import AttentionTerm, term_of
from .flash import flash_alibi_attention


class AlibiTerm(AttentionTerm):
    """ALiBi on one attention module: its per-head slopes (a non-persistent buffer, so it follows
    ``.to()`` and is not saved); every backend adds ``-slope * distance`` its own way.

    ``heads``: the heads this rank's attention receives when heads are sharded (DeepSpeed Ulysses),
    None for all; set by :func:`hf_posenc.train.parallel.shard_alibi_heads`."""

    heads: slice | None = None

    def __init__(self, slopes: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("slopes", slopes, persistent=False)

    def slopes_for(self, num_heads: int) -> torch.Tensor:
        """The slopes of the ``num_heads`` query heads this call attends with."""
        slopes = self.slopes if self.heads is None else self.slopes[self.heads]
        if slopes.shape[0] != num_heads:
            held = "all heads" if self.heads is None else f"heads {self.heads.start}..{self.heads.stop - 1}"
            raise UnsupportedSchemeError(
                f"ALiBi holds {slopes.shape[0]} slopes ({held}) but attention received {num_heads} query heads. "
                "Under head sharding (DeepSpeed Ulysses) run the step inside "
                "hf_posenc.train.parallel.shard_alibi_heads(model, sp_rank, sp_size)."
            )
        return slopes

    def attend(self, backend, module, query, key, value, attention_mask, **kwargs):
        return FUNCTIONS[backend](module, query, key, value, attention_mask, **kwargs)


def _slopes(module: nn.Module, num_heads: int | None = None) -> torch.Tensor | None:
    """The ALiBi slopes of ``module`` (None without an ALiBi term): all of them, or those of the
    ``num_heads`` query heads this call holds."""
    term = term_of(module)
    if not isinstance(term, AlibiTerm):
        return None
    return term.slopes if num_heads is None else term.slopes_for(num_heads)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _causal(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """Boolean (q, kv) causal mask with queries aligned to the last keys."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
    return torch.arange(kv_len, device=device)[None, :] <= q_pos[:, None]


def eager_alibi_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    q_len, kv_len = query.shape[2], key.shape[2]
    slopes = _slopes(module, query.shape[1])
    if slopes is not None:
        scores = scores + alibi_bias(slopes, q_len, kv_len).to(scores.dtype)[None]
    return masked_softmax_attention(module, scores, value, attention_mask, dropout)


def masked_softmax_attention(
    module: nn.Module, scores: torch.Tensor, value: torch.Tensor, attention_mask: Any, dropout: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rest of eager attention from (B, H, q, kv) scores: the mask (causal when None; boolean or
    additive; a flex BlockMask made dense), fp32 softmax, dropout, the values. Returns (B, q, H, D) and
    the probabilities."""
    q_len, kv_len = scores.shape[-2:]
    attention_mask = dense_mask(attention_mask, scores.shape[0], q_len, kv_len)
    if attention_mask is None:
        scores = scores.masked_fill(~_causal(q_len, kv_len, scores.device), torch.finfo(scores.dtype).min)
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[:, :, :, :kv_len], torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask[:, :, :, :kv_len]
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value)
    return out.transpose(1, 2).contiguous(), probs


def dense_mask(mask: Any, batch: int, q_len: int, kv_len: int) -> Any:
    """A flex BlockMask evaluated into a dense boolean (B, 1, q, kv) mask; any other mask as it is."""
    from torch.nn.attention.flex_attention import BlockMask, create_mask

    if isinstance(mask, BlockMask):
        return create_mask(mask.mask_mod, batch, 1, q_len, kv_len, device=mask.kv_num_blocks.device)
    return mask


def sdpa_alibi_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    slopes = _slopes(module, query.shape[1])
    if slopes is not None:
        bias = alibi_bias(slopes, query.shape[2], key.shape[2]).to(query.dtype)[None]
        kwargs["position_bias"] = bias
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _flex(query, key, value, score_mod, block_mask, scale, enable_gqa):
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(
        query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa
    )


@functools.cache
def _compiled_flex():
    """flex attention compiled through hf_posenc's own frame, with automatic dynamic shapes.

    dynamo compiles a function at most ``recompile_limit`` (8) times and then silently runs it
    uncompiled, which for flex attention means materialising every score. Compiling ``flex_attention``
    itself would share that budget with transformers' own flex; a static compile would spend one entry
    per sequence length. With our own frame, dynamic shapes and contiguous inputs, a process spends an
    entry per mask kind and query shape class, whatever the lengths, and calls run with headroom
    above the limit (``_compat.recompile_headroom``).
    """
    return torch.compile(_flex)


#: (device type, mask kind) whose flex compile failed in this process (torch 2.13's CPU flex template
#: mis-generates C++ for some dynamic-shape masks)
_FLEX_FAILED: set[tuple[str, str]] = set()  # (device type, what failed)


def _compile_failures() -> tuple[type[BaseException], ...]:
    failures = [torch._dynamo.exc.BackendCompilerFailed]
    inductor = getattr(getattr(torch, "_inductor", None), "exc", None)
    if inductor is not None and hasattr(inductor, "InductorError"):
        failures.append(inductor.InductorError)
    return tuple(failures)


def _flex_failed(kind: tuple[str, str]) -> None:
    import warnings

    from ..errors import PosencWarning

    _FLEX_FAILED.add(kind)
    warnings.warn(
        f"flex attention failed to compile for {kind[1]} on {kind[0]}; those calls now run through the dense "
        "path with the mask made dense (same numbers, O(L^2) memory).",
        PosencWarning,
        stacklevel=3,
    )


def _sdpa_instead(module, query, key, value, attention_mask, scaling, kwargs) -> tuple[torch.Tensor, None]:
    """The same attention through the sdpa backend (a BlockMask evaluated into a dense boolean mask)."""
    attention_mask = dense_mask(attention_mask, query.shape[0], query.shape[2], key.shape[2])
    return sdpa_alibi_attention(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def flex_alibi_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    from torch.nn.attention.flex_attention import BlockMask

    if dropout > 0:
        raise ValueError(
            "flex attention has no attention dropout: set the config's attention dropout to 0 "
            "(attention_dropout / attn_pdrop), call eval(), or use eager or sdpa."
        )
    block_mask = attention_mask if isinstance(attention_mask, BlockMask) else None
    dense_mask = None if block_mask is not None or attention_mask is None else attention_mask
    mask_kind = "block" if block_mask is not None else "dense" if dense_mask is not None else "no"
    kind = (query.device.type, f"{mask_kind} masks")
    if kind in _FLEX_FAILED:
        return _sdpa_instead(module, query, key, value, attention_mask, scaling, kwargs)
    original = (query, key, value)
    slopes = _slopes(module, query.shape[1])
    offset = torch.tensor(key.shape[2] - query.shape[2], device=query.device)
    if slopes is not None:
        slopes = slopes.to(device=query.device, dtype=torch.float32)

    def score_mod(score, batch_idx, head_idx, q_idx, kv_idx):
        if slopes is not None:
            score = score + slopes[head_idx] * (kv_idx - q_idx - offset).to(torch.float32)
        if dense_mask is not None:
            score = score + dense_mask[batch_idx, 0, q_idx, kv_idx]
        return score

    heads = query.shape[1]
    enable_gqa = heads & (heads - 1) == 0
    if not enable_gqa:
        groups = heads // key.shape[1]
        key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    with recompile_headroom():
        try:
            out = _compiled_flex()(query, key, value, score_mod, block_mask, scaling, enable_gqa)
        except _compile_failures():
            _flex_failed(kind)
            return _sdpa_instead(module, *original, attention_mask, scaling, kwargs)
    return out.transpose(1, 2).contiguous(), None


FUNCTIONS = {
    "eager": eager_alibi_attention,
    "sdpa": sdpa_alibi_attention,
    "flex_attention": flex_alibi_attention,
    "flash_attention_2": flash_alibi_attention,
}
#: plain attention (no term) on every backend: the same functions, which find no slopes
PLAIN_FUNCTIONS = FUNCTIONS
