"""Position math of the attention-level schemes (Self-Extend, ReRoPE), and the log-sum-exp merge their
two-pass attention uses. Pure tensor functions; the attention backends that run them come with issue 13.

Self-Extend (Jin et al. 2024, "LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning",
ICML 2024): for a query at position i and a key at position j, with d = i - j,

- d < W (the neighbour window): ordinary rotary positions (i, j);
- d >= W: grouped positions, query ``i // G + W - W // G`` and key ``j // G``.

The grouped distance is ``i // G - j // G + W - W // G``: it meets the window at d = W to within one
group when W is a multiple of G, and stays within ``[W - W//G, ...]`` otherwise; the shift uses
``W // G`` (floor) in prefill and decode alike, so a cached decode step sees exactly the positions a
fresh forward gives its last row (the paper's reference implementation computes them differently in
its decode path when ``W % G != 0``; hf_posenc does not).

ReRoPE (Su 2023, "Rectified Rotary Position Embeddings", kexue.fm/archives/9708): the relative distance
is clipped at a window W, ``min(d, W)``; leaky ReRoPE continues past it with slope 1/k:
``W + (d - W) / k`` for d > W.
"""

from __future__ import annotations

import torch

from ..errors import InvalidParameterError


def check_group_window(group_size: int, window_size: int) -> None:
    """Self-Extend needs ``group_size >= 1`` and ``window_size >= group_size``."""
    if not isinstance(group_size, int) or group_size < 1:
        raise InvalidParameterError(f"self_extend: group_size must be an integer >= 1, got {group_size!r}.")
    if not isinstance(window_size, int) or window_size < group_size:
        raise InvalidParameterError(
            f"self_extend: window_size must be an integer >= group_size ({group_size}), got {window_size!r}: "
            "the neighbour window has to hold at least one whole group."
        )


def grouped_query_positions(positions: torch.Tensor, group_size: int, window_size: int) -> torch.Tensor:
    """Self-Extend's query positions for the grouped (far) part: ``i // G + W - W // G``."""
    return positions // group_size + window_size - window_size // group_size


def grouped_key_positions(positions: torch.Tensor, group_size: int) -> torch.Tensor:
    """Self-Extend's key positions for the grouped (far) part: ``j // G``."""
    return positions // group_size


def self_extend_distance(
    query_positions: torch.Tensor, key_positions: torch.Tensor, group_size: int, window_size: int
) -> torch.Tensor:
    """The relative distance each (query, key) score sees under Self-Extend, shape (..., q, kv)."""
    i, j = query_positions[..., :, None], key_positions[..., None, :]
    near = i - j
    far = grouped_query_positions(i, group_size, window_size) - grouped_key_positions(j, group_size)
    return torch.where(near < window_size, near, far)


def rerope_distance(distance: torch.Tensor, window_size: int, leak: float | None = None) -> torch.Tensor:
    """ReRoPE's rectified distance: ``min(d, W)``; leaky (``leak = k``): ``W + (d - W) / k`` past W."""
    if leak is None:
        return distance.clamp(max=window_size)
    far = window_size + (distance - window_size) / leak
    return torch.where(distance <= window_size, distance.to(far.dtype), far)


def merge_by_logsumexp(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """One softmax over the union of two disjoint key sets, from two attention passes over them.

    ``out_*``: (..., q, d) each pass's softmax-weighted values; ``lse_*``: (..., q) the log-sum-exp of
    its scores (``-inf`` where a query saw no key). The merge weights each pass by its share of the
    total probability mass: ``out = sum_p exp(lse_p - lse) out_p`` with ``lse = logaddexp(lse_a, lse_b)``.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    weight_a = torch.exp(lse_a - lse).nan_to_num(0.0)[..., None]
    weight_b = torch.exp(lse_b - lse).nan_to_num(0.0)[..., None]
    return weight_a * out_a.nan_to_num(0.0) + weight_b * out_b.nan_to_num(0.0)
