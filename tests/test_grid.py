"""The common tester: every scheme on every architecture (GPT-2, LLaMA, BLOOM) and backend."""

from __future__ import annotations

import pytest
import torch
from conftest import GRID_ARCHS, GRID_SCHEMES, ORIGINAL_LENGTH, cache_kwargs, max_diff, tiny_model, tokens
from transformers import DynamicCache

import hf_posenc

SCHEMES = GRID_SCHEMES
BACKENDS = ("eager", "sdpa", "flex_attention")
GRID = [(a, s, p, b) for a in GRID_ARCHS for s, p in SCHEMES for b in BACKENDS]
IDS = [f"{a}-{s}-{b}" for a, s, _, b in GRID]
# FlexAttention has no backward on CPU: training with flex is measured on a GPU (docs/gpu_benchmarks.md)
TRAIN_GRID = [g for g in GRID if g[3] != "flex_attention"]
RELATIVE = ("rope", "yarn", "alibi")


def patched_model(arch, scheme, params, backend, **overrides):
    model = tiny_model(arch, attn="eager" if arch == "bloom" else "sdpa", **overrides)
    hf_posenc.patch(model, scheme, attn_implementation=backend, **params)
    return model


def logits(model, x, **kw):
    with torch.no_grad():
        return model(x, **kw).logits


@pytest.mark.parametrize(
    ("arch", "scheme", "params", "backend"), TRAIN_GRID, ids=[f"{a}-{s}-{b}" for a, s, _, b in TRAIN_GRID]
)
def test_forward_backward_unpatch(arch, scheme, params, backend):
    model = tiny_model(arch)
    x = tokens(2, 100)  # past GPT-2's 64-row table: only the patched model can run it
    short = x[:, : ORIGINAL_LENGTH - 4]
    before = logits(model, short)
    n_params = sum(p.numel() for p in model.parameters())
    hf_posenc.patch(model, scheme, attn_implementation=backend, **params)
    model.train()
    loss = model(x, labels=x, use_cache=False).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval().zero_grad(set_to_none=True)
    # Inside the original context these patches leave the function unchanged; all others change it.
    unchanged = (arch, scheme) in {
        ("gpt2", "learned"),
        ("opt", "learned"),
        *((a, s) for a in ("llama", "gpt_neox") for s in ("rope", "dynamic_ntk")),
    }
    assert torch.equal(logits(model, short), before) == (unchanged and backend == "eager")
    hf_posenc.unpatch(model)
    assert torch.equal(logits(model, short), before)
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize(("arch", "scheme", "params", "backend"), GRID, ids=IDS)
def test_cache_decode_equals_fresh_forward(arch, scheme, params, backend):
    model = patched_model(arch, scheme, params, backend)
    x = tokens(2, ORIGINAL_LENGTH + 12, seed=3)
    cache = DynamicCache(config=model.config)
    prompt = ORIGINAL_LENGTH - 6
    with torch.no_grad():
        model(x[:, :prompt], use_cache=True, **cache_kwargs(model, cache))
        for t in range(prompt, x.shape[1]):
            step = model(x[:, t : t + 1], use_cache=True, **cache_kwargs(model, cache)).logits[:, -1]
            fresh = model(x[:, : t + 1], use_cache=False).logits[:, -1]
            assert max_diff(step, fresh) <= 1e-5, t


@pytest.mark.parametrize(("arch", "scheme", "params", "backend"), GRID, ids=IDS)
def test_left_padding_equals_unpadded(arch, scheme, params, backend):
    model = patched_model(arch, scheme, params, backend)
    rows = [tokens(1, 50, seed=11)[0], tokens(1, 33, seed=12)[0]]
    width = max(len(r) for r in rows)
    ids = torch.zeros((2, width), dtype=torch.long)
    mask = torch.zeros((2, width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    kw = {} if arch == "bloom" else {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    padded = logits(model, ids, attention_mask=mask, **kw)
    for i, r in enumerate(rows):
        assert max_diff(padded[i, -len(r) :], logits(model, r[None])[0]) <= 1e-5


@pytest.mark.parametrize(("arch", "scheme", "params", "backend"), GRID, ids=IDS)
def test_packed_sequences_equal_separate(arch, scheme, params, backend):
    model = patched_model(arch, scheme, params, backend)
    docs = [tokens(1, 30, seed=31)[0], tokens(1, 20, seed=32)[0]]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    out = logits(model, torch.cat(docs)[None], position_ids=position_ids, use_cache=False)
    start = 0
    for d in docs:
        assert max_diff(out[0, start : start + len(d)], logits(model, d[None], use_cache=False)[0]) <= 1e-5
        start += len(d)


REL = [g for g in GRID if g[1] in RELATIVE]


@pytest.mark.parametrize(("arch", "scheme", "params", "backend"), REL, ids=[f"{a}-{s}-{b}" for a, s, _, b in REL])
def test_relative_schemes_are_shift_invariant(arch, scheme, params, backend):
    model = patched_model(arch, scheme, params, backend)
    x = tokens(1, 40)
    base = torch.arange(40)[None]
    assert max_diff(logits(model, x, position_ids=base), logits(model, x, position_ids=base + 17)) <= 1e-4


@pytest.mark.parametrize("arch", GRID_ARCHS)
def test_nope_is_position_free(arch):
    model = patched_model(arch, "nope", {}, "eager")
    x = tokens(2, 40)
    shuffled = torch.randint(0, 50, (2, 40))
    assert torch.equal(logits(model, x), logits(model, x, position_ids=shuffled))


@pytest.mark.parametrize("arch", GRID_ARCHS)
@pytest.mark.parametrize(("scheme", "params"), SCHEMES, ids=[s for s, _ in SCHEMES])
def test_backends_agree(arch, scheme, params):
    x = tokens(2, 90)
    out = {b: logits(patched_model(arch, scheme, params, b), x) for b in BACKENDS}
    assert max_diff(out["eager"], out["sdpa"]) <= 1e-5
    assert max_diff(out["eager"], out["flex_attention"]) <= 1e-5


@pytest.mark.parametrize("arch", GRID_ARCHS)
@pytest.mark.parametrize(("scheme", "params"), SCHEMES, ids=[s for s, _ in SCHEMES])
def test_save_and_reload(tmp_path, arch, scheme, params):
    model = patched_model(arch, scheme, params, "sdpa")
    x = tokens(2, 90)
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    reloaded = hf_posenc.from_pretrained(str(tmp_path))
    assert reloaded.config._attn_implementation == model.config._attn_implementation  # the backend comes back
    assert max_diff(logits(reloaded, x), expected) <= 1e-6
    short = x[:, : ORIGINAL_LENGTH - 4]
    base = tiny_model(arch)
    hf_posenc.unpatch(reloaded)  # the pre-patch model comes back, extra tensors and all
    assert max_diff(logits(reloaded, short), logits(base, short)) <= 1e-6
