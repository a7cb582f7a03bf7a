"""Each scheme's frequencies against transformers' own rope functions, plus math properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from hf_posenc.schemes import ModelInfo, get_scheme_class
from hf_posenc.schemes import rope_math as rm

HEAD_DIM = 64
INFO = ModelInfo(HEAD_DIM, 4, max_position_embeddings=2048, rope_theta=10000.0)


def hf_frequencies(rope_parameters: dict, seq_len=None, max_positions=2048):
    config = LlamaConfig(
        hidden_size=HEAD_DIM * 4,
        num_attention_heads=4,
        max_position_embeddings=max_positions,
        rope_parameters={"rope_theta": 10000.0, **rope_parameters},
    )
    return ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](config, None, seq_len=seq_len)


def ours(name: str, seq_len=None, **params):
    scheme = get_scheme_class(name).from_params(**params).resolve(INFO)
    return scheme.frequencies(HEAD_DIM, seq_len)


CASES = [
    ("linear", {"factor": 4.0}, {"rope_type": "linear", "factor": 4.0}, None),
    ("dynamic_ntk", {"factor": 2.0}, {"rope_type": "dynamic", "factor": 2.0}, 1000),
    ("dynamic_ntk", {"factor": 2.0}, {"rope_type": "dynamic", "factor": 2.0}, 5000),
    ("yarn", {"factor": 4.0}, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}, None),
    (
        "yarn",
        {"factor": 8.0, "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False},
        {
            "rope_type": "yarn",
            "factor": 8.0,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
            "truncate": False,
            "original_max_position_embeddings": 2048,
        },
        None,
    ),
    (
        "yarn",
        {"factor": 4.0, "mscale": 0.707, "mscale_all_dim": 1.0},
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "mscale": 0.707,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 2048,
        },
        None,
    ),
    (
        "yarn",
        {"factor": 4.0, "attention_factor": 1.3},
        {"rope_type": "yarn", "factor": 4.0, "attention_factor": 1.3, "original_max_position_embeddings": 2048},
        None,
    ),
    (
        "llama3",
        {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 512},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 512,
        },
        None,
    ),
]

SHORT = [1.0 + 0.01 * i for i in range(HEAD_DIM // 2)]
LONG = [1.0 + 0.5 * i for i in range(HEAD_DIM // 2)]
LONGROPE = {"short_factor": SHORT, "long_factor": LONG, "original_max_position_embeddings": 1024, "factor": 2.0}
CASES += [
    ("longrope", LONGROPE, {"rope_type": "longrope", **LONGROPE}, 500),
    ("longrope", LONGROPE, {"rope_type": "longrope", **LONGROPE}, 1500),
]


@pytest.mark.parametrize(("name", "params", "native", "seq_len"), CASES)
def test_matches_transformers_rope_functions(name, params, native, seq_len):
    inv_freq, scaling = ours(name, seq_len, **params)
    ref_inv_freq, ref_scaling = hf_frequencies(native, seq_len)
    torch.testing.assert_close(inv_freq, ref_inv_freq, rtol=0, atol=0)
    assert scaling == pytest.approx(ref_scaling, rel=1e-12)


def test_ntk_is_rope_with_a_larger_theta():
    inv_freq, _ = ours("ntk", alpha=4.0)
    expected = rm.default_inv_freq(HEAD_DIM, 10000.0 * 4.0 ** (HEAD_DIM / (HEAD_DIM - 2)))
    torch.testing.assert_close(inv_freq, expected, rtol=0, atol=0)
    assert torch.equal(ours("ntk", factor=4.0)[0], inv_freq)  # factor is a synonym of alpha


def test_yarn_default_attention_factor_and_frequency_band():
    inv_freq, scaling = ours("yarn", factor=4.0)
    assert scaling == pytest.approx(0.1 * math.log(4.0) + 1)
    base = rm.default_inv_freq(HEAD_DIM, 10000.0)
    assert torch.all(inv_freq <= base + 1e-12) and torch.all(inv_freq >= base / 4 - 1e-12)
    assert inv_freq[0] == base[0] and inv_freq[-1] == pytest.approx(base[-1] / 4)


def test_longrope_switches_factor_sets_at_original_length():
    short, _ = ours("longrope", 1024, **LONGROPE)
    long, scaling = ours("longrope", 1025, **LONGROPE)
    torch.testing.assert_close(short, rm.longrope_inv_freq(HEAD_DIM, 10000.0, SHORT))
    torch.testing.assert_close(long, rm.longrope_inv_freq(HEAD_DIM, 10000.0, LONG))
    assert scaling == pytest.approx(math.sqrt(1 + math.log(2.0) / math.log(1024)))


def test_partial_rotary_pads_with_identity_pairs():
    inv_freq, _ = ours("rope", partial_rotary_factor=0.25)
    assert inv_freq.numel() == HEAD_DIM // 2
    torch.testing.assert_close(inv_freq[: HEAD_DIM // 8], rm.default_inv_freq(HEAD_DIM // 4, 10000.0))
    assert torch.count_nonzero(inv_freq[HEAD_DIM // 8 :]) == 0


def test_dynamic_bucketing_rounds_up_geometrically():
    scheme = get_scheme_class("dynamic").from_params(factor=2.0, bucket_ratio=2.0).resolve(INFO)
    assert scheme.effective_length(100) == 2048
    assert scheme.effective_length(2049) == 4096
    assert scheme.effective_length(4096) == 4096
    assert scheme.effective_length(4097) == 8192


FACTOR_ONE_IDENTITY = [
    ("linear", {"factor": 1.0}),
    ("ntk", {"alpha": 1.0}),
    ("yarn", {"factor": 1.0}),
    ("llama3", {"factor": 1.0}),
]


@pytest.mark.parametrize(("name", "params"), FACTOR_ONE_IDENTITY)
@given(theta=st.floats(100.0, 1e6), dim=st.sampled_from([8, 16, 32, 64, 128]))
@settings(max_examples=20, deadline=None)
def test_factor_one_is_identity(name, params, theta, dim):
    info = ModelInfo(dim, 2, 4096, rope_theta=theta)
    scheme = get_scheme_class(name).from_params(**params).resolve(info)
    inv_freq, scaling = scheme.frequencies(dim)
    torch.testing.assert_close(inv_freq, rm.default_inv_freq(dim, theta), rtol=1e-6, atol=0)
    assert scaling == 1.0


@given(seq_len=st.integers(1, 2048), factor=st.floats(1.0, 16.0), ratio=st.sampled_from([1.0, 1.25, 2.0]))
@settings(max_examples=40, deadline=None)
def test_dynamic_ntk_equals_rope_up_to_original_length(seq_len, factor, ratio):
    scheme = get_scheme_class("dynamic_ntk").from_params(factor=factor, bucket_ratio=ratio).resolve(INFO)
    inv_freq, scaling = scheme.frequencies(HEAD_DIM, seq_len)
    assert torch.equal(inv_freq, rm.default_inv_freq(HEAD_DIM, 10000.0)) and scaling == 1.0


@given(seq_len=st.integers(2049, 1 << 20), ratio=st.sampled_from([1.0, 1.1, 1.5, 2.0]))
@settings(max_examples=50, deadline=None)
def test_dynamic_effective_length_is_a_cover(seq_len, ratio):
    scheme = get_scheme_class("dynamic_ntk").from_params(factor=2.0, bucket_ratio=ratio).resolve(INFO)
    length = scheme.effective_length(seq_len)
    assert length >= seq_len and length <= max(seq_len, math.ceil(seq_len * ratio)) + 1
