"""Properties every patch must keep: undo, isolation, cache, padding, packing, relative position."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    LLAMA_FAMILY,
    ORIGINAL_LENGTH,
    cache_kwargs,
    max_diff,
    out_cache,
    tiny_model,
    tokens,
)
from transformers import DynamicCache

import hf_posenc

HALF = 8
ALL_SCHEMES = [
    ("nope", {}),
    ("rope", {"partial_rotary_factor": 0.5}),
    ("linear", {"factor": 2.0}),
    ("ntk", {"factor": 2.0}),
    ("dynamic_ntk", {"factor": 2.0}),
    ("dynamic_ntk", {"factor": 2.0, "bucket_ratio": 1.25}),
    ("yarn", {"factor": 4.0}),
    ("longrope", {"short_factor": [1.0] * HALF, "long_factor": [1.0 + i for i in range(HALF)], "factor": 4.0}),
    ("llama3", {"factor": 4.0}),
]
IDS = [f"{s}-{i}" for i, (s, _) in enumerate(ALL_SCHEMES)]
RELATIVE = [s for s in ALL_SCHEMES if s[0] in ("rope", "linear", "ntk", "yarn", "llama3")]


def logits(model, x, **kw):
    with torch.no_grad():
        return model(x, **kw).logits


@pytest.mark.parametrize(("scheme", "params"), ALL_SCHEMES, ids=IDS)
def test_unpatch_restores_bitwise(scheme, params):
    model = tiny_model("llama")
    x = tokens(2, 2 * ORIGINAL_LENGTH)
    before = logits(model, x)
    config_before = copy.deepcopy(model.config.to_dict())
    modules_before = dict(model.named_modules())
    n_params = sum(p.numel() for p in model.parameters())
    hf_posenc.patch(model, scheme, **params)
    assert not torch.equal(logits(model, x), before) or scheme == "rope"
    hf_posenc.unpatch(model)
    assert torch.equal(logits(model, x), before)
    assert model.config.to_dict() == config_before
    assert dict(model.named_modules()) == modules_before
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert "forward" not in model.model.__dict__


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


def decode_matches_fresh_forward(model, prompt_len: int, total: int, tol: float) -> float:
    """Feed tokens one at a time through a cache; compare each step with a fresh full forward."""
    x = tokens(2, total, seed=3)
    cache = DynamicCache(config=model.config)
    worst = 0.0
    with torch.no_grad():
        out = model(x[:, :prompt_len], use_cache=True, **cache_kwargs(model, cache))
        assert out_cache(out) is cache
        for t in range(prompt_len, total):
            step = model(x[:, t : t + 1], use_cache=True, **cache_kwargs(model, cache)).logits[:, -1]
            fresh = model(x[:, : t + 1], use_cache=False).logits[:, -1]
            worst = max(worst, max_diff(step, fresh))
    assert worst <= tol, worst
    return worst


@pytest.mark.parametrize("model_type", LLAMA_FAMILY)
@pytest.mark.parametrize(("scheme", "params"), ALL_SCHEMES, ids=IDS)
def test_cache_decode_equals_full_forward(model_type, scheme, params):
    model = tiny_model(model_type)
    hf_posenc.patch(model, scheme, **params)
    # crosses the original length (64), where dynamic / longrope change their frequencies
    decode_matches_fresh_forward(model, ORIGINAL_LENGTH - 6, ORIGINAL_LENGTH + 14, tol=1e-5)


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
        decode_matches_fresh_forward(stale, 60, 80, tol=1e-4)


@pytest.mark.parametrize(
    ("scheme", "params"), [ALL_SCHEMES[4], ALL_SCHEMES[6], ALL_SCHEMES[7]], ids=["dynamic", "yarn", "longrope"]
)
def test_generate_with_cache_equals_without(scheme, params):
    model = tiny_model("llama")
    hf_posenc.patch(model, scheme, **params)
    x = tokens(2, ORIGINAL_LENGTH - 10, seed=7)
    kw = dict(max_new_tokens=25, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(x, use_cache=True, **kw)
        plain = model.generate(x, use_cache=False, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    assert max(max_diff(a, b) for a, b in zip(cached.scores, plain.scores, strict=True)) <= 1e-5


@pytest.mark.parametrize(("scheme", "params"), [ALL_SCHEMES[4], ALL_SCHEMES[7]], ids=["dynamic", "longrope"])
def test_beam_search_with_cache_refresh_equals_without_cache(scheme, params):
    """Beam search reorders the cache's rows; the refresh's token history must follow, or a refresh
    replays other beams' tokens (it did: sequence scores off by 0.01, token scores by 0.7)."""
    model = tiny_model("llama")
    hf_posenc.patch(model, scheme, **params)
    x = tokens(2, ORIGINAL_LENGTH - 10, seed=7)
    kw = dict(max_new_tokens=25, do_sample=False, num_beams=3, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(x, use_cache=True, pad_token_id=0, **kw)
        plain = model.generate(x, use_cache=False, pad_token_id=0, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    assert max_diff(cached.sequences_scores, plain.sequences_scores) <= 1e-5


def left_pad(rows: list[torch.Tensor], pad: int = 0):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


@pytest.mark.parametrize("model_type", LLAMA_FAMILY)
@pytest.mark.parametrize(("scheme", "params"), ALL_SCHEMES, ids=IDS)
def test_left_padding_equals_unpadded(model_type, scheme, params):
    model = tiny_model(model_type, attn="sdpa")
    hf_posenc.patch(model, scheme, **params)
    rows = [tokens(1, 90, seed=11)[0], tokens(1, 57, seed=12)[0]]
    ids, mask = left_pad(rows)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    padded = logits(model, ids, attention_mask=mask, position_ids=position_ids)
    for i, r in enumerate(rows):
        alone = logits(model, r[None])
        if scheme in ("dynamic_ntk", "longrope") and len(r) < len(rows[0]):
            continue  # the batch's scale follows its longest row, as in transformers
        assert max_diff(padded[i, -len(r) :], alone[0]) <= 1e-5


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


@pytest.mark.parametrize("model_type", LLAMA_FAMILY)
@pytest.mark.parametrize(("scheme", "params"), ALL_SCHEMES, ids=IDS)
def test_packed_sequences_equal_separate(model_type, scheme, params):
    model = tiny_model(model_type)
    hf_posenc.patch(model, scheme, **params)
    docs = [tokens(1, 40, seed=31)[0], tokens(1, 24, seed=32)[0]]  # each shorter than the original length
    packed = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    out = logits(model, packed, position_ids=position_ids, use_cache=False)
    start = 0
    for d in docs:
        alone = logits(model, d[None], use_cache=False)
        assert max_diff(out[0, start : start + len(d)], alone[0]) <= 1e-5
        start += len(d)


@pytest.mark.parametrize(("scheme", "params"), RELATIVE, ids=[s for s, _ in RELATIVE])
def test_relative_schemes_are_shift_invariant(scheme, params):
    model = tiny_model("llama")
    hf_posenc.patch(model, scheme, **params)
    x = tokens(1, 40)
    base = torch.arange(40)[None]
    a = logits(model, x, position_ids=base)
    b = logits(model, x, position_ids=base + 23)
    assert max_diff(a, b) <= 1e-4


def test_nope_is_position_free():
    model = tiny_model("qwen2")
    hf_posenc.patch(model, "nope")
    x = tokens(2, 50)
    a = logits(model, x)
    b = logits(model, x, position_ids=torch.randint(0, 10_000, (2, 50)))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("scheme", "params"), [ALL_SCHEMES[1], ALL_SCHEMES[4], ALL_SCHEMES[6]], ids=["rope", "dynamic", "yarn"]
)
def test_backends_agree(scheme, params):
    x = tokens(2, 100)
    results = {}
    for attn in ("eager", "sdpa"):
        model = tiny_model("mistral", attn=attn)
        hf_posenc.patch(model, scheme, **params)
        results[attn] = logits(model, x)
    assert max_diff(results["eager"], results["sdpa"]) <= 1e-5


def test_forward_and_backward_are_finite():
    model = tiny_model("llama").train()
    hf_posenc.patch(model, "yarn", factor=4.0)
    x = tokens(2, 100)
    loss = model(x, labels=x, use_cache=False).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_patched_context_manager_unpatches_on_error():
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="boom"), hf_posenc.patched(model, "linear", factor=2.0):
        assert hf_posenc.is_patched(model)
        raise RuntimeError("boom")
    assert not hf_posenc.is_patched(model)


def test_flex_attention_agrees_with_sdpa():
    """flex attention on CPU compiles its kernel (tens of seconds), so one case covers the backend."""
    x = tokens(2, 100)
    results = {}
    for attn in ("sdpa", "flex_attention"):
        model = tiny_model("llama", attn=attn)
        hf_posenc.patch(model, "yarn", factor=4.0)
        results[attn] = logits(model, x)
    assert max_diff(results["sdpa"], results["flex_attention"]) <= 1e-5
