"""Behaviour beyond the common tester's cells (test_grid.py): isolation between models, the exact
refresh's counts and the stale mode, generation (greedy, beam, left-padded) with a cache, the context
manager."""

from __future__ import annotations

import pytest
import torch
from conftest import FREQUENCY_SCHEMES, ORIGINAL_LENGTH, cache_kwargs, max_diff, tiny_model, tokens
from properties import check_cache_decode, left_pad, logits
from transformers import DynamicCache

import hf_posenc

SCHEMES = dict((s, p) for s, p in FREQUENCY_SCHEMES if s != "dynamic_ntk" or not p.get("bucket_ratio"))


def test_two_models_with_different_schemes_in_one_process():
    a, b = tiny_model("llama"), tiny_model("llama")
    hf_posenc.patch(a, "yarn", factor=4.0)
    hf_posenc.patch(b, "linear", factor=2.0)
    x = tokens(1, 100)
    ya, yb = logits(a, x), logits(b, x)
    hf_posenc.unpatch(b)
    assert torch.equal(logits(a, x), ya)  # unpatching b does not touch a
    fresh = tiny_model("llama")
    hf_posenc.patch(fresh, "linear", factor=2.0)
    assert torch.equal(logits(fresh, x), yb)
    assert type(a.model.rotary_emb).__name__ == "PosencRotaryEmbedding"
    assert type(b.model.rotary_emb).__name__ == "LlamaRotaryEmbedding"


def test_dynamic_refresh_counts_and_stale_mode_is_inexact():
    model = tiny_model("llama")
    hf_posenc.patch(model, "dynamic_ntk", factor=4.0, bucket_ratio=1.25)
    x = tokens(1, 130, seed=5)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(x[:, :60], use_cache=True, **cache_kwargs(model, cache))
        for t in range(60, 130):
            model(x[:, t : t + 1], use_cache=True, **cache_kwargs(model, cache))
    # lengths 65..80 -> bucket 80, 81..100 -> 100, 101..125 -> 125, 126..130 -> 157: four refreshes
    assert hf_posenc.refresh_count(cache) == 4

    stale = tiny_model("llama")
    hf_posenc.patch(stale, "dynamic_ntk", factor=4.0, refresh="none")
    with pytest.raises(AssertionError):
        check_cache_decode(stale, 60, 80, tol=1e-4)


@pytest.mark.parametrize("scheme", ["dynamic_ntk", "yarn", "longrope"])
def test_generate_with_cache_equals_without(scheme):
    model = tiny_model("llama")
    hf_posenc.patch(model, scheme, **SCHEMES[scheme])
    x = tokens(2, ORIGINAL_LENGTH - 10, seed=7)
    kw = dict(max_new_tokens=25, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(x, use_cache=True, **kw)
        plain = model.generate(x, use_cache=False, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    assert max(max_diff(a, b) for a, b in zip(cached.scores, plain.scores, strict=True)) <= 1e-5


@pytest.mark.parametrize("scheme", ["dynamic_ntk", "longrope"])
def test_beam_search_with_cache_refresh_equals_without_cache(scheme):
    """Beam search reorders the cache's rows; the refresh's token history must follow, or a refresh
    replays other beams' tokens (it did: sequence scores off by 0.01, token scores by 0.7)."""
    model = tiny_model("llama")
    hf_posenc.patch(model, scheme, **SCHEMES[scheme])
    x = tokens(2, ORIGINAL_LENGTH - 10, seed=7)
    kw = dict(max_new_tokens=25, do_sample=False, num_beams=3, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(x, use_cache=True, pad_token_id=0, **kw)
        plain = model.generate(x, use_cache=False, pad_token_id=0, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    assert max_diff(cached.sequences_scores, plain.sequences_scores) <= 1e-5


def test_left_padded_generate_equals_unpadded():
    model = tiny_model("llama")
    hf_posenc.patch(model, "yarn", factor=4.0)
    rows = [tokens(1, 30, seed=21)[0], tokens(1, 18, seed=22)[0]]
    ids, mask = left_pad(rows)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, **kw)
        for i, r in enumerate(rows):
            alone = model.generate(r[None], **kw)
            assert torch.equal(batched[i, -12:], alone[0, -12:])


def test_patched_context_manager_unpatches_on_error():
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="boom"), hf_posenc.patched(model, "linear", factor=2.0):
        assert hf_posenc.is_patched(model)
        raise RuntimeError("boom")
    assert not hf_posenc.is_patched(model)
