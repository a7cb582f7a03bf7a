"""S²-Attn (LongLoRA's shifted sparse attention) against a dense implementation written here: one L x L
mask per head (same group, in shifted coordinates for the second half of the heads, and causal by the
tokens' original order), one softmax. Full attention in eval mode; undo is bitwise."""

from __future__ import annotations

import pytest
import torch
from conftest import max_diff, tiny_model, tokens
from properties import left_pad, logits
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import hf_posenc

LENGTH = 64
FRACTION = 0.25


def s2_mask(length: int, size: int, heads: int) -> torch.Tensor:
    """(H, L, L): allowed (query i, key j) pairs under S²-Attn, from the paper's description."""
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    plain = (i // size == j // size) & (j <= i)
    slot = lambda p: (p - size // 2) % length  # noqa: E731 - where the shifted heads put token p
    shifted = (slot(i) // size == slot(j) // size) & (j <= i)
    return torch.stack([plain] * (heads - heads // 2) + [shifted] * (heads // 2))


def reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    heads, length = query.shape[1], query.shape[2]
    groups = heads // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    allowed = s2_mask(length, round(length * FRACTION), heads)[None]
    if attention_mask is not None:
        allowed = allowed & attention_mask
    scores = (query @ key.transpose(2, 3)) * scaling
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    return (probs @ value).transpose(1, 2), probs


AttentionInterface.register("test_s2_reference", reference)
AttentionMaskInterface.register("test_s2_reference", sdpa_mask)


def reference_logits(model, x, **kw):
    """The same weights with the dense reference as attention, in train mode."""
    backend = model.config._attn_implementation
    model.config._attn_implementation = "test_s2_reference"
    try:
        with torch.no_grad():
            return model(x, **kw).logits
    finally:
        model.config._attn_implementation = backend


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex_attention"])
def test_s2_attn_equals_the_dense_reference_while_training(arch, backend):
    model = tiny_model(arch, attn=backend)
    hf_posenc.patch(model, "yarn", factor=4.0)  # under any frequency scheme
    x = tokens(2, LENGTH)
    full = logits(model, x)
    handle = hf_posenc.enable_s2_attn(model, FRACTION)
    model.train()
    with torch.no_grad():
        got = model(x).logits
    want = reference_logits(model, x)
    assert max_diff(got, want) <= 1e-5
    assert max_diff(got, full) > 1e-3  # grouped attention really differs from full attention
    model.eval()
    assert max_diff(logits(model, x), full) <= 1e-5  # eval: full attention
    handle.undo()
    assert torch.equal(logits(model, x), full)


def test_s2_attn_keeps_padding_and_causality():
    """A left-padded batch: the model's own padding mask applies inside every group; and no token ever
    sees a later one (the wrapped group of the shifted heads included)."""
    model = tiny_model("llama", attn="sdpa")
    hf_posenc.enable_s2_attn(model, FRACTION)
    model.train()
    ids, mask = left_pad([tokens(1, LENGTH, seed=3)[0], tokens(1, LENGTH - 16, seed=4)[0]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = model(ids, attention_mask=mask, position_ids=positions).logits
    want = reference_logits(model, ids, attention_mask=mask, position_ids=positions)
    real = mask.bool()
    assert max_diff(got[real], want[real]) <= 1e-5
    # causality: changing the last token changes no earlier logit
    x = tokens(1, LENGTH, seed=5)
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % 90 + 1
    with torch.no_grad():
        assert max_diff(model(x).logits[0, :-1], model(y).logits[0, :-1]) == 0


def test_s2_attn_trains_under_peft_and_backpropagates():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    hf_posenc.enable_s2_attn(model, FRACTION)
    model.train()
    x = tokens(2, LENGTH)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    ("arch", "scheme", "fraction", "error", "match"),
    [
        ("llama", "alibi", 0.25, hf_posenc.UnsupportedSchemeError, "attention-level scheme"),
        ("gpt2", None, 0.25, hf_posenc.UnsupportedSchemeError, "rotary family"),
        ("llama", None, 1.5, ValueError, "group_fraction"),
    ],
)
def test_s2_attn_refusals(arch, scheme, fraction, error, match):
    model = tiny_model(arch)
    if scheme:
        hf_posenc.patch(model, scheme)
    with pytest.raises(error, match=match):
        hf_posenc.enable_s2_attn(model, fraction)


def test_s2_attn_needs_a_group_dividing_the_length():
    model = tiny_model("llama")
    hf_posenc.enable_s2_attn(model, FRACTION)
    model.train()
    with pytest.raises(ValueError, match="dividing the sequence length"):
        model(tokens(1, 50))
