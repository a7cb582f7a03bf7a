"""A CPU stand-in for flash-attn 2's two entry points, written from its documented semantics.

flash-attn needs a GPU, so the CPU tests route hf_posenc's flash backend through this module instead:
``causal`` masks keys after ``i + kv_len - q_len`` (aligned to the last key) and ``alibi_slopes`` adds
``-slope * |i + kv_len - q_len - j|`` to each score, per sequence of the variable-length batch. It is
independent of hf_posenc's own ALiBi code, so agreement with the eager backend checks both.
"""

from __future__ import annotations

import importlib.machinery
import types

import torch

#: (entry point, number of sequences, ALiBi on) per call, for tests to see which path ran
CALLS: list[tuple[str, int, bool]] = []


def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    dropout_p=0.0, softmax_scale=None, causal=False, alibi_slopes=None, **unused,
):  # fmt: skip
    assert dropout_p == 0.0 and not unused, (dropout_p, unused)
    assert alibi_slopes is None or alibi_slopes.dtype == torch.float32  # flash-attn requires fp32 slopes
    CALLS.append(("varlen", len(cu_seqlens_q) - 1, alibi_slopes is not None))
    heads, kv_heads = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.empty_like(q)
    for b in range(len(cu_seqlens_q) - 1):
        qs = q[cu_seqlens_q[b] : cu_seqlens_q[b + 1]]
        ks = k[cu_seqlens_k[b] : cu_seqlens_k[b + 1]].repeat_interleave(heads // kv_heads, dim=1)
        vs = v[cu_seqlens_k[b] : cu_seqlens_k[b + 1]].repeat_interleave(heads // kv_heads, dim=1)
        sq, sk = qs.shape[0], ks.shape[0]
        assert sq <= max_seqlen_q and sk <= max_seqlen_k
        scores = torch.einsum("qhd,khd->hqk", qs.float(), ks.float()) * scale
        distance = torch.arange(sq)[:, None] + sk - sq - torch.arange(sk)[None, :]
        if alibi_slopes is not None:
            scores = scores - alibi_slopes[:, None, None] * distance.abs()
        if causal:
            scores = scores.masked_fill(distance < 0, float("-inf"))
        out[cu_seqlens_q[b] : cu_seqlens_q[b + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs.float())
    return out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, alibi_slopes=None, **unused):
    batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
    CALLS.append(("dense", batch, alibi_slopes is not None))
    cu_q = torch.arange(0, (batch + 1) * q_len, q_len, dtype=torch.int32)
    cu_k = torch.arange(0, (batch + 1) * kv_len, kv_len, dtype=torch.int32)
    flat = [t.reshape(-1, *t.shape[2:]) for t in (q, k, v)]
    out = flash_attn_varlen_func(*flat, cu_q, cu_k, q_len, kv_len, dropout_p, softmax_scale, causal, alibi_slopes)
    CALLS.pop()  # count the dense call once
    return out.view(q.shape)


def module() -> types.ModuleType:
    fake = types.ModuleType("flash_attn")
    fake.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    fake.flash_attn_func = flash_attn_func
    fake.flash_attn_varlen_func = flash_attn_varlen_func
    CALLS.clear()
    fake.calls = CALLS
    return fake
