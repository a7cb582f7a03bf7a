"""Cross-family specifics: BLOOM's native ALiBi vs ours on every backend, the ALiBi / sinusoidal /
learned-table math, table extension past GPT-2's n_positions, and backend errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import failing_compile, max_diff, tiny_model, tokens
from transformers.models.bloom.modeling_bloom import build_alibi_tensor

import hf_posenc
from hf_posenc.schemes.absolute import extend_table, sinusoidal_table
from hf_posenc.schemes.alibi import alibi_bias, alibi_slopes


def logits(model, x, **kw):
    with torch.no_grad():
        return model(x, **kw).logits


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 32, 40, 64, 112])
def test_alibi_slopes_match_bloom_for_any_head_count(heads):
    bloom = build_alibi_tensor(torch.ones(1, 2), heads, torch.float32)  # slope x key position
    assert torch.equal(alibi_slopes(heads), bloom[:, 0, 1])


def test_alibi_slopes_are_the_papers_geometric_sequence():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** (-i) for i in range(1, 9)]))


def test_alibi_bias_is_relative_and_causal_aligned():
    bias = alibi_bias(torch.tensor([0.5]), q_len=2, kv_len=5)
    # queries are keys 3 and 4; bias = -slope * (q - k)
    expected = torch.tensor([[[-1.5, -1.0, -0.5, 0.0, 0.5], [-2.0, -1.5, -1.0, -0.5, 0.0]]])
    torch.testing.assert_close(bias, expected)


def test_sinusoidal_table_formula():
    table = sinusoidal_table(torch.tensor([0, 3]), dim=6, base=10000.0)
    pos, i = 3.0, torch.arange(3, dtype=torch.float32)
    angles = pos / 10000.0 ** (2 * i / 6)
    torch.testing.assert_close(table[1, 0::2], angles.sin())
    torch.testing.assert_close(table[1, 1::2], angles.cos())
    torch.testing.assert_close(table[0], torch.tensor([0.0, 1.0] * 3))


@pytest.mark.parametrize("method", ["interpolate", "copy", "random"])
def test_extend_table_keeps_the_original_rows(method):
    table = torch.randn(10, 4)
    longer = extend_table(table, 25, method)
    assert longer.shape == (25, 4) and torch.equal(longer[:10], table)
    if method == "copy":
        assert torch.equal(longer[10:20], table)
    if method == "interpolate":  # new rows lie within the range the old table spans
        assert longer[10:].min() >= table.min() - 1e-6 and longer[10:].max() <= table.max() + 1e-6


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("heads", [4, 6])
def test_bloom_alibi_reproduces_native_bloom(backend, heads):
    model = tiny_model("bloom", n_head=heads, hidden_size=16 * heads)
    x = tokens(2, 70)
    mask = torch.ones_like(x)
    mask[1, :9] = 0  # left padding on row 1
    native = logits(model, x, attention_mask=mask)
    with hf_posenc.patched(model, "alibi", attn_implementation=backend):
        ours = logits(model, x, attention_mask=mask)
    assert max_diff(native[mask.bool()], ours[mask.bool()]) <= 1e-5


def test_bloom_alibi_generate_matches_native():
    model = tiny_model("bloom")
    x = tokens(2, 20)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        native = model.generate(x, **kw)
        with hf_posenc.patched(model, "alibi", attn_implementation="sdpa"):
            ours = model.generate(x, **kw)
    assert torch.equal(native, ours)


def test_gpt2_runs_past_its_table_after_extension():
    model = tiny_model("gpt2")  # n_positions 64
    long = tokens(1, 200)
    with pytest.raises(IndexError):
        logits(model, long)
    hf_posenc.patch(model, "learned", max_positions=256, extend="interpolate")
    assert model.config.n_positions == 256
    assert torch.isfinite(logits(model, long)).all()
    with pytest.raises(hf_posenc.InvalidParameterError, match="past the learned table"):
        logits(model, tokens(1, 300))


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_learned_extension_is_native(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    model = tiny_model(arch)
    hf_posenc.patch(model, "learned", max_positions=128, extend="copy")
    x = tokens(1, 120)
    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert max_diff(logits(plain, x), logits(model, x)) <= 1e-6


def test_flash_alibi_needs_flash_attn_installed(monkeypatch):
    import hf_posenc.patches.common as common

    monkeypatch.setattr(common, "flash_available", lambda: False)
    model = tiny_model("llama")
    with pytest.raises(hf_posenc.UnsupportedSchemeError, match=r"needs the flash-attn package.*eager, sdpa, flex"):
        hf_posenc.patch(model, "alibi", attn_implementation="flash_attention_2")
    assert not hf_posenc.is_patched(model)


def test_unknown_backend():
    with pytest.raises(hf_posenc.UnsupportedSchemeError, match="Unknown attn_implementation 'fast'"):
        hf_posenc.patch(tiny_model("llama"), "rope", attn_implementation="fast")


def test_llama_alibi_changes_no_weights_and_adds_no_parameters():
    model = tiny_model("llama")
    names = [n for n, _ in model.named_parameters()]
    hf_posenc.patch(model, "alibi")
    assert [n for n, _ in model.named_parameters()] == names
    slopes = model.model.layers[0].self_attn.hf_posenc_attention_term.slopes
    assert torch.equal(slopes, alibi_slopes(4))
    assert "hf_posenc" not in "".join(model.state_dict())


def test_flex_alibi_does_not_recompile_per_length():
    """Evaluating at many lengths must not exhaust dynamo's recompile limit (8 per function): past it,
    flex attention silently runs uncompiled and materialises every score (seen on an H200 at 32k)."""
    from torch._dynamo.utils import counters

    model = tiny_model("bloom")
    hf_posenc.patch(model, "alibi", attn_implementation="flex_attention")
    before = counters["stats"]["unique_graphs"]
    for length in range(17, 117, 10):  # ten lengths
        logits(model, tokens(1, length))
    assert counters["stats"]["unique_graphs"] - before <= 6


def test_flex_compile_failure_runs_densely_over_query_chunks_with_the_same_numbers(monkeypatch, flex_compile_fails):
    """torch 2.13's CPU flex template mis-generates C++ for some dynamic-shape masks; such a call kind
    then runs densely over query chunks (the model's BlockMask evaluated chunk by chunk, so memory stays
    O(chunk x L) at 16k) with a warning, instead of crashing; the numbers are sdpa's."""
    attention = flex_compile_fails
    monkeypatch.setattr(attention, "_static_flex", failing_compile)  # the per-shape retry of long calls fails too
    monkeypatch.setattr(attention, "DENSE_CHUNK_ELEMENTS", 7 * 50)  # 7 query rows per chunk: 8 chunks
    rows = [tokens(1, 50, seed=11)[0], tokens(1, 33, seed=12)[0]]
    from properties import left_pad, logits

    ids, mask = left_pad(rows)
    out = {}
    for backend in ("sdpa", "flex_attention"):
        model = tiny_model("llama", attn="sdpa")
        hf_posenc.patch(model, "alibi", attn_implementation=backend)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out[backend] = logits(model, ids, attention_mask=mask)
    assert attention._FLEX_FAILED  # the flex call failed and was served densely
    assert any("query chunks" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert max_diff(out["sdpa"], out["flex_attention"]) <= 1e-5
