"""Every misuse raises a clear error naming the valid options; a failed patch changes nothing."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import tiny_model

import hf_posenc
from hf_posenc.schemes import base as scheme_base


def test_unknown_scheme_suggests_close_names():
    model = tiny_model()
    with pytest.raises(hf_posenc.UnknownSchemeError, match=r"Did you mean 'yarn'.*Valid: .*dynamic_ntk"):
        hf_posenc.patch(model, "yarm", factor=2)


def test_aliases_resolve():
    assert type(hf_posenc.make_scheme("pi", factor=2.0)).name == "linear"
    assert type(hf_posenc.make_scheme("dynamic", factor=2.0)).name == "dynamic_ntk"


def test_unknown_model_type():
    """No row and no standard rotary module: refused with a did-you-mean list."""
    model = tiny_model("gpt2")
    model.config.model_type = "gpt22"
    with pytest.raises(hf_posenc.UnknownArchitectureError, match=r"'gpt22'.*no rotary_emb.*Did you mean 'gpt2'"):
        hf_posenc.patch(model, "rope")


def test_unknown_model_type_with_a_standard_rotary_module_is_patched_after_a_self_check():
    model = tiny_model()
    model.config.model_type = "llama_next"
    assert hf_posenc.patch(model, "yarn", factor=2.0).architecture == "rotary"


@pytest.mark.parametrize(
    ("scheme", "params", "message"),
    [
        ("yarn", {"factor": 0}, "factor must be > 0"),
        ("yarn", {"factor": -2.0}, "factor must be > 0"),
        ("linear", {"factor": float("nan")}, "must be finite"),
        ("linear", {"factor": "2"}, "must be a number"),
        ("linear", {"factor": True}, "must be a number"),
        ("linear", {}, "'factor' is required"),
        ("yarn", {"factor": 2.0, "factr": 3}, r"Unknown parameter 'factr'.*Did you mean 'factor'"),
        ("yarn", {"factor": 2.0, "beta_fast": 1.0, "beta_slow": 2.0}, "beta_fast"),
        ("yarn", {"factor": 2.0, "original_max_position_embeddings": 10.5}, "positive int"),
        ("ntk", {"factor": 2.0, "alpha": 2.0}, "exactly one of factor or alpha"),
        ("dynamic_ntk", {"factor": 2.0, "refresh": "sometimes"}, "'exact', 'none'"),
        ("dynamic_ntk", {"factor": 2.0, "bucket_ratio": 0.5}, "bucket_ratio must be >= 1"),
        ("rope", {"partial_rotary_factor": 1.5}, r"partial_rotary_factor must be in \(0, 1\]"),
        ("llama3", {"factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}, "must exceed"),
        ("longrope", {"short_factor": [1.0] * 8}, "long_factor"),
    ],
)
def test_invalid_parameters(scheme, params, message):
    with pytest.raises(hf_posenc.InvalidParameterError, match=message):
        hf_posenc.patch(tiny_model(), scheme, **params)


def test_parameters_checked_against_the_model():
    model = tiny_model()
    with pytest.raises(hf_posenc.InvalidParameterError, match="needs 8 values"):
        hf_posenc.patch(model, "longrope", short_factor=[1.0] * 3, long_factor=[1.0] * 8)
    with pytest.raises(hf_posenc.InvalidParameterError, match="must be even"):
        hf_posenc.patch(model, "rope", partial_rotary_factor=0.1)


def test_missing_original_length():
    from hf_posenc.schemes import ModelInfo

    info = ModelInfo(head_dim=16, num_attention_heads=4, max_position_embeddings=None, rope_theta=1e4)
    scheme = hf_posenc.make_scheme("yarn", factor=2.0)
    with pytest.raises(hf_posenc.InvalidParameterError, match="original_max_position_embeddings is missing"):
        scheme.resolve(info)
    explicit = hf_posenc.make_scheme("yarn", factor=2.0, original_max_position_embeddings=64).resolve(info)
    assert explicit.original_max_position_embeddings == 64


def test_scheme_object_and_keywords_are_exclusive():
    with pytest.raises(hf_posenc.InvalidParameterError, match="not both"):
        hf_posenc.patch(tiny_model(), hf_posenc.make_scheme("yarn", factor=2.0), factor=4.0)


@pytest.fixture
def bias_scheme():
    @dataclass(frozen=True, kw_only=True)
    class TestBias(scheme_base.SchemeConfig):
        name: ClassVar[str] = "test_bias"
        kind: ClassVar[str] = "attention_bias"

    scheme_base.register_scheme(TestBias)
    yield TestBias
    del scheme_base._REGISTRY["test_bias"]


def test_scheme_the_architecture_cannot_host(bias_scheme):
    with pytest.raises(hf_posenc.UnsupportedSchemeError, match=r"cannot host scheme 'test_bias'.*rotary, none"):
        hf_posenc.patch(tiny_model(), "test_bias")


def test_patching_twice_raises_unless_replace():
    model = tiny_model()
    hf_posenc.patch(model, "linear", factor=2.0)
    with pytest.raises(hf_posenc.AlreadyPatchedError, match="already patched with 'linear'"):
        hf_posenc.patch(model, "yarn", factor=2.0)
    handle = hf_posenc.patch(model, "yarn", factor=2.0, replace=True)
    assert handle.scheme.name == "yarn" and model.config.rope_parameters["rope_type"] == "yarn"
    hf_posenc.unpatch(model)
    assert model.config.rope_parameters["rope_type"] == "default"


def test_missing_hook_point_raises_and_changes_nothing():
    model = tiny_model()
    config_before = copy.deepcopy(model.config.to_dict())
    del model.model.rotary_emb
    with pytest.raises(hf_posenc.HookPointMissingError, match="rotary_emb"):
        hf_posenc.patch(model, "yarn", factor=2.0)
    assert not hf_posenc.is_patched(model)
    assert model.config.to_dict() == config_before


def test_unpatch_of_unpatched_model():
    with pytest.raises(hf_posenc.NotPatchedError):
        hf_posenc.unpatch(tiny_model())


def test_refresh_refuses_a_cache_it_did_not_see():
    from conftest import cache_kwargs, tokens
    from transformers import DynamicCache

    model = tiny_model()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(tokens(1, 60), use_cache=True, **cache_kwargs(model, cache))  # filled before patching
        hf_posenc.patch(model, "dynamic_ntk", factor=2.0)
        with pytest.raises(hf_posenc.CacheRefreshError, match="did not see"):
            model(tokens(1, 10), use_cache=True, **cache_kwargs(model, cache))


def test_errors_share_a_base_class():
    for exc in (hf_posenc.UnknownSchemeError, hf_posenc.InvalidParameterError, hf_posenc.HookPointMissingError):
        assert issubclass(exc, hf_posenc.PosencError)
