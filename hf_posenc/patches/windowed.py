"""The windowed rotary term: Self-Extend and ReRoPE inside attention.

The family's own rotary step is given identity tables (zero frequencies), so ``query`` and ``key``
reach the attention function unrotated (and the KV cache holds unrotated keys). The term rotates them
twice with the scheme's frequencies: at the ordinary positions for scores inside the window
(``d = i - j < W``) and at the scheme's remapped positions beyond it, then takes one softmax over the
merged scores.

- eager and sdpa: both score matrices are materialised and merged (L x L, as eager attention is);
- flex_attention: one pass over the keys twice (each copy scored with its own rotation and masked to
  its side of the window): one softmax, no L x L tensor. The block mask keeps each copy only on the
  blocks that hold scores on its side of the window, so the two copies together visit about as many
  blocks as plain attention (the queries carry both rotations: 2x channels in q.k). (Two passes merged by their
  log-sum-exp, :func:`~hf_posenc.schemes.relative_math.merge_by_logsumexp`, would need flex's
  ``return_lse``, which compiled flex on CPU does not support.)

Positions: the query positions are the layer's ``position_ids`` (or the decoder call's, kept by the
position context). Keys are the query positions when there is no cache; with a cache, each row's keys
are taken as contiguous, ending at its last query (left padding and cached decoding; decoding on top of
a cache that holds several packed documents is not supported).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UnsupportedSchemeError
from ..schemes.windowed import WindowedScheme
from .attention import _repeat_kv, chunked_softmax_attention, masked_softmax_attention
from .backends import BACKENDS, AttentionTerm
from .context import DecoderPositions
from .rotary import PosencRotaryEmbedding
from .wrappers import current_state


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of ``x`` (B, H, L, D) by (B, L, width) tables laid
    out as the family's (``cat``: halves paired; ``interleave``: neighbours paired)."""
    width = cos.shape[-1]
    part, rest = x[..., :width], x[..., width:]
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    if layout == "cat":
        half = width // 2
        turned = torch.cat((-part[..., half:], part[..., :half]), dim=-1)
    else:
        turned = torch.stack((-part[..., 1::2], part[..., 0::2]), dim=-1).flatten(-2)
    rotated = part * cos + turned * sin
    return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated


class WindowedRotaryTerm(AttentionTerm):
    """One model's windowed rotary scheme, shared by its attention modules."""

    backends = BACKENDS

    def __init__(self, scheme: WindowedScheme, rotary: PosencRotaryEmbedding, context: DecoderPositions) -> None:
        super().__init__()
        self.scheme = scheme
        self.rotary = rotary
        self.context = context

    # -- positions ------------------------------------------------------------------------------
    def positions(self, query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Query positions (B, q) and key positions (B, kv) of this call."""
        batch, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
        given = kwargs.get("position_ids")
        if given is None:
            state = current_state(self.context)
            given = state.positions if state is not None else None
        if given is None:
            raise UnsupportedSchemeError(
                f"{self.scheme.name}: the attention received no position ids and no decoder call is in progress."
            )
        q_pos = given.to(query.device).expand(batch, -1)[:, -q_len:]
        if kv_len == q_len:
            return q_pos, q_pos
        k_pos = q_pos[:, -1:] - (kv_len - 1) + torch.arange(kv_len, device=query.device)
        return q_pos, k_pos.clamp(min=0)

    def rotated(self, x: torch.Tensor, positions: torch.Tensor, tables: tuple[torch.Tensor, float]) -> torch.Tensor:
        cos, sin = self.rotary.cos_sin(torch.zeros((), device=x.device), positions, *tables)
        return rotate(x, cos, sin, self.rotary.layout)

    def pairs(self, query, key, q_pos, k_pos):
        """(query, key) rotated at the ordinary positions and at the scheme's far positions, both with the
        frequencies of the ordinary ones (a length-dependent scheme's: from the sequence length)."""
        tables = self.rotary.tables_for(q_pos)
        far_q, far_k = self.scheme.far_positions(q_pos, k_pos)
        near = (self.rotated(query, q_pos.float(), tables), self.rotated(key, k_pos.float(), tables))
        far = (self.rotated(query, far_q, tables), self.rotated(key, far_k, tables))
        return near, far

    # -- attention ------------------------------------------------------------------------------
    def attend(self, backend, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if backend not in self.backends:
            raise UnsupportedSchemeError(f"{self.scheme.name} runs on {', '.join(self.backends)}, not {backend}.")
        q_pos, k_pos = self.positions(query, key, kwargs)
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        near, far = self.pairs(query, key, q_pos, k_pos)
        if backend == "flex_attention" and query.shape[2] > 1:  # one query (a decode step) is O(kv) densely
            return self._flex(module, near, far, value, attention_mask, (q_pos, k_pos), scaling, dropout)
        return self._dense(module, near, far, value, attention_mask, (q_pos, k_pos), scaling, dropout)

    def _dense(self, module, near, far, value, attention_mask, positions, scaling, dropout, *, chunked=False):
        """Both score matrices materialised and merged by the window; ``chunked``: over query chunks
        (memory O(chunk x kv); no attention probabilities returned)."""
        q_pos, k_pos = positions
        groups = near[0].shape[1] // near[1].shape[1]
        value = _repeat_kv(value, groups)
        keys = [_repeat_kv(k, groups).transpose(2, 3) for k in (near[1], far[1])]

        def scores_for(rows: slice) -> torch.Tensor:
            inside = (q_pos[:, rows, None] - k_pos[:, None, :]) < self.scheme.window_size  # (B, rows, kv)
            near_scores, far_scores = (
                torch.matmul(q[:, :, rows], k) * scaling for q, k in zip((near[0], far[0]), keys, strict=True)
            )
            return torch.where(inside[:, None], near_scores, far_scores)

        q_len = near[0].shape[2]
        if chunked:
            return chunked_softmax_attention(module, scores_for, value, attention_mask, q_len, dropout)
        return masked_softmax_attention(module, scores_for(slice(0, q_len)), value, attention_mask, dropout)

    def _flex(self, module, near, far, value, attention_mask, positions, scaling, dropout):
        """One flex pass over the keys twice: channels ``[near | far]`` in the queries, keys
        ``[near | 0]`` then ``[0 | far]``, so each key copy scores with its own rotation; each copy is
        masked to its side of the window, and one softmax covers both (2x channels, no L x L; the block
        mask skips the blocks a copy never scores)."""
        from torch.nn.attention.flex_attention import BlockMask

        from .attention import flex_goes_dense, run_compiled_flex

        if dropout > 0:
            raise ValueError("flex attention has no attention dropout: call eval(), or use eager or sdpa.")
        q_pos, k_pos = positions
        window = self.scheme.window_size
        kind = (near[0].device.type, f"{self.scheme.name} ({type(attention_mask).__name__})")
        block_mask = attention_mask if isinstance(attention_mask, BlockMask) else None
        (q_near, k_near), (q_far, k_far) = near, far
        heads, q_len = q_near.shape[1], q_near.shape[2]
        kv_len = k_near.shape[2]
        # the second copy starts on a block boundary, so the model's block mask is reused block for block
        kv_block = block_mask.BLOCK_SIZE[1] if block_mask is not None else 128
        offset = -(-kv_len // kv_block) * kv_block
        if flex_goes_dense(kind, q_len, 2 * offset):  # before building the doubled keys it would not use
            return self._dense(module, near, far, value, attention_mask, positions, scaling, dropout, chunked=True)
        dense_mask = None if block_mask is not None or attention_mask is None else attention_mask
        if dense_mask is not None and dense_mask.dtype == torch.bool:
            dense_mask = torch.zeros(dense_mask.shape, device=dense_mask.device).masked_fill(~dense_mask, float("-inf"))
        query = torch.cat((q_near, q_far), dim=-1).contiguous()
        key = torch.cat((_padded(k_near, offset, left=True), _padded(k_far, offset, left=False)), dim=2)
        value2 = torch.cat((_padded(value, offset), _padded(value, offset)), dim=2)
        enable_gqa = heads & (heads - 1) == 0
        if not enable_gqa:
            groups = heads // key.shape[1]
            key, value2 = _repeat_kv(key, groups), _repeat_kv(value2, groups)
        last = kv_len - 1

        def score_mod(score, b, h, q_idx, kv_idx):
            far_copy = kv_idx >= offset
            j = torch.where(far_copy, kv_idx - offset, kv_idx)
            real = j < kv_len
            j = j.clamp(max=last)
            distance = q_pos[b, q_idx] - k_pos[b, j]
            keep = real & torch.where(far_copy, distance >= window, distance < window)
            if dense_mask is not None:
                score = score + dense_mask[b, 0, q_idx, j]
            elif block_mask is None:  # no mask at all: causal, queries aligned to the last keys
                keep = keep & (j <= q_idx + (kv_len - q_len))
            return torch.where(keep, score, -float("inf"))

        doubled = _window_block_mask(block_mask, positions, window, kv_len, offset)
        out = run_compiled_flex(
            kind, query, key.contiguous(), value2.contiguous(), score_mod, doubled, scaling, enable_gqa
        )
        if out is None:
            return self._dense(module, near, far, value, attention_mask, positions, scaling, dropout, chunked=True)
        return out.transpose(1, 2).contiguous(), None


def _padded(x: torch.Tensor, length: int, *, left: bool | None = None) -> torch.Tensor:
    """``x`` (B, H, L, D) padded with zeros to ``length`` positions; ``left`` True/False also appends a
    zero block of channels after / before (the query's [near | far] layout); None keeps the channels."""
    if left is not None:
        zeros = torch.zeros_like(x)
        x = torch.cat((x, zeros) if left else (zeros, x), dim=-1)
    return F.pad(x, (0, 0, 0, length - x.shape[2]))


def _block_bounds(pos: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of ``block`` consecutive entries of ``pos`` (B, L): the least and greatest position."""
    blocks = -(-pos.shape[-1] // block)
    pad = blocks * block - pos.shape[-1]
    pos = pos.float()
    low = F.pad(pos, (0, pad), value=float("inf")).view(pos.shape[0], blocks, block).amin(-1)
    high = F.pad(pos, (0, pad), value=float("-inf")).view(pos.shape[0], blocks, block).amax(-1)
    return low, high


def _visited_blocks(mask: Any, kv_blocks: int) -> torch.Tensor:
    """The blocks the model's BlockMask visits (partial or full), as a (B, H, q blocks, kv blocks) bool."""
    visited = None
    for num, idx in ((mask.kv_num_blocks, mask.kv_indices), (mask.full_kv_num_blocks, mask.full_kv_indices)):
        if num is None:
            continue
        valid = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
        hits = torch.zeros(*idx.shape[:-1], kv_blocks, dtype=torch.int32, device=idx.device)
        hits.scatter_add_(-1, torch.where(valid, idx, 0).long(), valid.int())
        visited = hits > 0 if visited is None else visited | (hits > 0)
    return visited


def _window_block_mask(mask: Any, positions: tuple, window: int, kv_len: int, offset: int) -> Any:
    """The block mask of the doubled keys: the model's mask (causal when there is none) over both
    copies, the near copy kept only on blocks holding some distance < ``window`` and the far copy only
    on blocks holding some distance >= ``window`` (from each block's position bounds, so padded,
    packed and cached positions prune correctly). Blocks a copy never scores are skipped, so the two
    copies together visit about as many blocks as plain attention does. Every kept block is a partial
    one: the score modifier masks inside it."""
    from torch.nn.attention.flex_attention import BlockMask

    q_pos, k_pos = positions
    q_block, kv_block = mask.BLOCK_SIZE if mask is not None else (128, 128)
    kv_blocks = offset // kv_block
    q_low, q_high = _block_bounds(q_pos, q_block)
    k_low, k_high = _block_bounds(k_pos, kv_block)
    near = (q_low[:, :, None] - k_high[:, None, :]) < window  # (B, q blocks, kv blocks)
    far = (q_high[:, :, None] - k_low[:, None, :]) >= window
    if mask is not None:
        visited = _visited_blocks(mask, kv_blocks)
    else:  # causal, queries aligned to the last keys
        q_last = (torch.arange(q_low.shape[1], device=q_pos.device) + 1) * q_block - 1 + (kv_len - q_pos.shape[1])
        k_first = torch.arange(kv_blocks, device=q_pos.device) * kv_block
        visited = (k_first[None, :] <= q_last[:, None])[None, None]
    dense = torch.cat((visited & near[:, None], visited & far[:, None]), dim=-1)
    num = dense.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~dense).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    inner = mask.mask_mod if mask is not None else None

    def mask_mod(b, h, q_idx, kv_idx):
        j = torch.where(kv_idx >= offset, kv_idx - offset, kv_idx)
        real = j < kv_len
        return real if inner is None else real & inner(b, h, q_idx, j.clamp(max=kv_len - 1))

    return BlockMask.from_kv_blocks(
        num, idx, BLOCK_SIZE=(q_block, kv_block), mask_mod=mask_mod, seq_lengths=(q_pos.shape[1], 2 * offset)
    )
