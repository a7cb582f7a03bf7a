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
from collections.abc import Callable
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


def _alibi_scores_for(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None
) -> tuple[Callable[[slice], torch.Tensor], torch.Tensor]:
    """``scores_for(rows)``: the scaled (B, H, rows, kv) scores of those query rows plus the ALiBi bias
    of ``module`` (none without an ALiBi term), and the values repeated to the query heads."""
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    q_len, kv_len = query.shape[2], key.shape[2]
    slopes = _slopes(module, query.shape[1])
    key_t = key.transpose(2, 3)

    def scores_for(rows: slice) -> torch.Tensor:
        scores = torch.matmul(query[:, :, rows], key_t) * scaling
        if slopes is not None:
            scores = scores + alibi_bias(slopes, q_len, kv_len, rows=rows).to(scores.dtype)[None]
        return scores

    return scores_for, value


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
    scores_for, value = _alibi_scores_for(module, query, key, value, scaling)
    return masked_softmax_attention(module, scores_for(slice(0, query.shape[2])), value, attention_mask, dropout)


def masked_softmax_attention(
    module: nn.Module,
    scores: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float,
    *,
    rows: slice | None = None,
    q_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rest of eager attention from (B, H, q, kv) scores: the mask (causal when None; boolean or
    additive; a flex BlockMask made dense), fp32 softmax, dropout, the values. Returns (B, q, H, D) and
    the probabilities. ``scores`` may hold only the query ``rows`` of a call of ``q_len`` queries."""
    kv_len = scores.shape[-1]
    q_len = scores.shape[-2] if q_len is None else q_len
    mask = mask_rows(attention_mask, scores.shape[0], q_len, kv_len, rows or slice(0, q_len), scores.device)
    fill = torch.finfo(scores.dtype).min
    scores = scores.masked_fill(~mask, fill) if mask.dtype == torch.bool else scores + mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value)
    return out.transpose(1, 2).contiguous(), probs


def mask_rows(mask: Any, batch: int, q_len: int, kv_len: int, rows: slice, device: torch.device) -> torch.Tensor:
    """The (B or 1, 1, rows, kv) dense mask of these query rows: causal (queries aligned to the last
    keys) when ``mask`` is None, a flex BlockMask evaluated on these rows only, else the mask's rows
    (boolean, True = attend, or additive)."""
    from torch.nn.attention.flex_attention import BlockMask, create_mask

    start, stop = rows.indices(q_len)[:2]
    if mask is None:
        q_pos = torch.arange(kv_len - q_len + start, kv_len - q_len + stop, device=device)
        return (torch.arange(kv_len, device=device)[None, :] <= q_pos[:, None])[None, None]
    if isinstance(mask, BlockMask):
        mod = mask.mask_mod

        def shifted(b, h, q_idx, kv_idx):
            return mod(b, h, q_idx + start, kv_idx)

        return create_mask(shifted, batch, 1, stop - start, kv_len, device=mask.kv_num_blocks.device)
    mask = mask[:, :, :, :kv_len]
    return mask if mask.shape[2] == 1 else mask[:, :, start:stop]


#: score elements per (batch, head) of one dense chunk: the dense fallbacks of flex attention run over
#: query chunks this size, so their memory is O(chunk x kv), not O(q x kv)
DENSE_CHUNK_ELEMENTS = 1 << 23


def chunked_softmax_attention(
    module: nn.Module,
    scores_for: Callable[[slice], torch.Tensor],
    value: torch.Tensor,
    attention_mask: Any,
    q_len: int,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, None]:
    """Softmax attention over query chunks: ``scores_for(rows)`` gives the (B, H, rows, kv) scores of
    those query rows; each chunk is masked, normalised and applied to the values on its own (a row's
    softmax needs only its own scores, so the result equals the unchunked one)."""
    step = max(1, DENSE_CHUNK_ELEMENTS // value.shape[2])
    outs = [
        masked_softmax_attention(module, scores_for(rows), value, attention_mask, dropout, rows=rows, q_len=q_len)[0]
        for rows in (slice(start, min(start + step, q_len)) for start in range(0, q_len, step))
    ]
    return torch.cat(outs, dim=1), None


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


def _flex_one_shape(query, key, value, score_mod, block_mask, scale, enable_gqa):
    """``_flex`` under its own frame, so its static compiles have dynamo cache entries of their own."""
    return _flex(query, key, value, score_mod, block_mask, scale, enable_gqa)


@functools.cache
def _static_flex():
    """flex attention compiled for each input shape (no dynamic shapes): the retry for long calls after
    the dynamic-shape compile failed. ``fullgraph``: past the recompile limit it raises instead of
    silently running uncompiled (which would materialise every score)."""
    return torch.compile(_flex_one_shape, dynamic=False, fullgraph=True)


#: (device type, mask kind) whose dynamic-shape flex compile failed in this process (torch 2.13's CPU
#: flex template mis-generates C++ for some dynamic-shape masks)
_FLEX_FAILED: set[tuple[str, str]] = set()  # (device type, what failed)


def flex_goes_dense(kind: tuple[str, str], q_len: int, kv_len: int) -> bool:
    """Whether a flex call of ``kind`` with these lengths runs densely at once: its dynamic-shape compile
    failed in this process and the call is short (at most :data:`DENSE_CHUNK_ELEMENTS` scores per head,
    where a per-shape compile costs more than the dense path). Callers check it before building their
    flex inputs; :func:`run_compiled_flex` returns None for the same calls."""
    return kind in _FLEX_FAILED and q_len * kv_len <= DENSE_CHUNK_ELEMENTS


def run_compiled_flex(kind: tuple[str, str], query, key, value, score_mod, block_mask, scale, enable_gqa):
    """Compiled flex attention for a call of ``kind`` (device type, mask kind), or None: the caller then
    runs its dense path over query chunks (same numbers, slower).

    Dynamic shapes first. Once that compile failed for a kind, its short calls go dense (cheaper than a
    compile) and its long ones (more than :data:`DENSE_CHUNK_ELEMENTS` scores per head, where the dense
    path is slow) are compiled shape by shape, up to dynamo's recompile limit."""
    args = (query, key, value, score_mod, block_mask, scale, enable_gqa)
    with recompile_headroom():
        if kind not in _FLEX_FAILED:
            try:
                return _compiled_flex()(*args)
            except _compile_failures():
                _flex_failed(kind)
        if flex_goes_dense(kind, query.shape[2], key.shape[2]):
            return None
        try:
            return _static_flex()(*args)
        except (*_compile_failures(), _recompile_limit_hit()):
            return None


def _recompile_limit_hit() -> type[BaseException]:
    return getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", torch._dynamo.exc.Unsupported)


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
        f"flex attention failed to compile for {kind[1]} on {kind[0]}; from now on those calls run densely over "
        "query chunks (same numbers, memory O(chunk x L), slower), long ones compiled for each shape instead.",
        PosencWarning,
        stacklevel=3,
    )


def _dense_instead(module, query, key, value, attention_mask, scaling) -> tuple[torch.Tensor, None]:
    """The same attention computed densely over query chunks (memory O(chunk x kv); a BlockMask is
    evaluated chunk by chunk): the fallback when flex attention fails to compile."""
    scores_for, value = _alibi_scores_for(module, query, key, value, scaling)
    return chunked_softmax_attention(module, scores_for, value, attention_mask, query.shape[2])


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
    if flex_goes_dense(kind, query.shape[2], key.shape[2]):
        return _dense_instead(module, query, key, value, attention_mask, scaling)
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
    out = run_compiled_flex(kind, query, key, value, score_mod, block_mask, scaling, enable_gqa)
    if out is None:
        return _dense_instead(module, *original, attention_mask, scaling)
    return out.transpose(1, 2).contiguous(), None


FUNCTIONS = {
    "eager": eager_alibi_attention,
    "sdpa": sdpa_alibi_attention,
    "flex_attention": flex_alibi_attention,
    "flash_attention_2": flash_alibi_attention,
}
#: plain attention (no term) on every backend: the same functions, which find no slopes
PLAIN_FUNCTIONS = FUNCTIONS
