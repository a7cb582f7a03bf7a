"""Position math of Self-Extend and ReRoPE, and the log-sum-exp merge, against the papers' formulas
written out element by element (scalar loops, no shared helpers)."""

from __future__ import annotations

import pytest
import torch
from conftest import max_diff

from hf_posenc import InvalidParameterError
from hf_posenc.schemes.relative_math import (
    check_group_window,
    merge_by_logsumexp,
    rerope_distance,
    self_extend_distance,
)


def paper_self_extend(i: int, j: int, group: int, window: int) -> int:
    """Jin et al. 2024: neighbour tokens keep (i, j); the rest use (i // G + W - W // G, j // G)."""
    if i - j < window:
        return i - j
    return (i // group + window - window // group) - j // group


@pytest.mark.parametrize(("group", "window"), [(1, 1), (2, 4), (4, 8), (3, 8), (8, 8), (5, 12)])
def test_self_extend_distance_is_the_papers(group, window):
    positions = torch.arange(70)
    got = self_extend_distance(positions, positions, group, window)
    want = torch.tensor([[paper_self_extend(i, j, group, window) for j in range(70)] for i in range(70)])
    causal = torch.ones(70, 70, dtype=torch.bool).tril()
    assert torch.equal(got[causal], want[causal])


@pytest.mark.parametrize(("group", "window"), [(4, 8), (3, 8)])
def test_self_extend_decode_row_equals_the_prefill_row(group, window):
    """Positions depend on (i, j) only: the last query alone (a cached decode step) sees exactly the
    distances of the last row of a full forward, whether or not W is a multiple of G."""
    positions = torch.arange(100)
    full = self_extend_distance(positions, positions, group, window)
    step = self_extend_distance(positions[-1:], positions, group, window)
    assert torch.equal(step[0], full[-1])


def test_self_extend_is_plain_rope_with_group_one():
    positions = torch.arange(40)
    distance = self_extend_distance(positions, positions, 1, 1)
    assert torch.equal(distance, positions[:, None] - positions[None, :])


def test_self_extend_distances_stay_within_the_trained_range():
    """The point of Self-Extend: at length L the largest distance is about L / G + W, not L."""
    positions = torch.arange(1024)
    distance = self_extend_distance(positions, positions, 8, 64)
    causal = torch.ones(1024, 1024, dtype=torch.bool).tril()
    assert int(distance[causal].max()) <= 1024 // 8 + 64
    assert int(distance[causal].min()) == 0


@pytest.mark.parametrize(("group", "window"), [(0, 4), (4, 2), (2.0, 4), (2, 3.5)])
def test_self_extend_parameters_are_checked(group, window):
    with pytest.raises(InvalidParameterError, match=r"group_size|window_size"):
        check_group_window(group, window)


def test_rerope_distance_is_clipped_and_leaky_past_the_window():
    distance = torch.arange(0, 50)
    assert torch.equal(rerope_distance(distance, 16), torch.tensor([min(d, 16) for d in range(50)]))
    leaky = rerope_distance(distance, 16, leak=4.0)
    want = torch.tensor([d if d <= 16 else 16 + (d - 16) / 4 for d in range(50)], dtype=leaky.dtype)
    assert max_diff(leaky, want) == 0


def test_two_passes_merged_by_logsumexp_equal_one_softmax():
    """Split each query's keys into two disjoint sets (with queries that see only one set, or none of
    one): the merge of two masked softmaxes equals one softmax over all keys."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 20, 30, generator=g, dtype=torch.float64)
    values = torch.randn(2, 3, 30, 8, generator=g, dtype=torch.float64)
    split = torch.rand(20, 30, generator=g) < 0.5
    split[0] = True  # query 0 sees only the first set
    split[1] = False  # query 1 only the second
    full = torch.softmax(scores, -1) @ values

    def one_pass(mask):
        masked = scores.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(masked, -1)
        return torch.softmax(masked, -1) @ values, lse

    merged = merge_by_logsumexp(*one_pass(split), *one_pass(~split))
    assert max_diff(merged, full) <= 1e-12
