"""The flash-attn backend (ALiBi through ``alibi_slopes``), on CPU through the documented-semantics
stand-in in ``flash_reference``: the same properties as the common tester, against eager."""

from __future__ import annotations

import pytest
import torch
from conftest import ORIGINAL_LENGTH, max_diff, tiny_model, tokens
from properties import (
    check_cache_decode,
    check_left_padding,
    check_packing,
    check_shift_invariance,
    logits,
    patched_model,
)

import hf_posenc

FLASH = "flash_attention_2"
CELLS = [
    ("llama", "alibi", {}),
    ("gpt2", "alibi", {}),
    ("opt", "alibi", {}),
    ("gpt_neox", "alibi", {}),
    ("bloom", "alibi", {}),
    ("bloom", "rope", {}),
    ("bloom", "learned", {"max_positions": 256}),
    ("bloom", "nope", {}),
]
IDS = [f"{a}-{s}" for a, s, _ in CELLS]
pytestmark = pytest.mark.usefixtures("fake_flash")


@pytest.mark.parametrize(("arch", "scheme", "params"), CELLS, ids=IDS)
def test_flash_agrees_with_eager(arch, scheme, params, fake_flash):
    x = tokens(2, 90)
    out = {b: logits(patched_model(arch, scheme, params, b), x) for b in ("eager", FLASH)}
    assert max_diff(out["eager"], out[FLASH]) <= 1e-5
    assert fake_flash.calls == [("dense", 2, scheme == "alibi")] * 2  # one call per layer, no fallback


@pytest.mark.parametrize(("arch", "scheme", "params"), CELLS, ids=IDS)
def test_flash_cache_decode_equals_fresh_forward(arch, scheme, params):
    check_cache_decode(patched_model(arch, scheme, params, FLASH), ORIGINAL_LENGTH - 6, ORIGINAL_LENGTH + 12)


@pytest.mark.parametrize(("arch", "scheme", "params"), CELLS, ids=IDS)
def test_flash_left_padding_equals_unpadded(arch, scheme, params, fake_flash):
    rows = [tokens(1, 50, seed=11)[0], tokens(1, 33, seed=12)[0]]
    check_left_padding(patched_model(arch, scheme, params, FLASH), rows, positions=arch != "bloom")
    assert ("varlen", 2, scheme == "alibi") in fake_flash.calls  # the padded batch went through varlen


@pytest.mark.parametrize(("arch", "scheme", "params"), CELLS, ids=IDS)
def test_flash_packed_sequences_equal_separate(arch, scheme, params, fake_flash):
    docs = [tokens(1, 30, seed=31)[0], tokens(1, 20, seed=32)[0]]
    check_packing(patched_model(arch, scheme, params, FLASH), docs)
    assert ("varlen", 2, scheme == "alibi") in fake_flash.calls  # two documents, one varlen call


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bloom"])
def test_flash_alibi_is_shift_invariant(arch):
    check_shift_invariance(patched_model(arch, "alibi", {}, FLASH))


def test_flash_generate_matches_eager():
    x = tokens(2, 20)
    outs = []
    for backend in ("eager", FLASH):
        model = tiny_model("llama")
        hf_posenc.patch(model, "alibi", attn_implementation=backend)
        outs.append(model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("arch", ["llama", "bloom"])
def test_flash_left_padded_generate_matches_eager(arch, fake_flash):
    """Decoding a left-padded batch: one query per row against its unpadded keys (the varlen path with
    fewer queries than keys)."""
    rows = [tokens(1, 30, seed=11)[0], tokens(1, 18, seed=12)[0]]
    ids = torch.zeros((2, 30), dtype=torch.long)
    mask = torch.zeros((2, 30), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, 30 - len(r) :], mask[i, 30 - len(r) :] = r, 1
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, output_scores=True, return_dict_in_generate=True)
    outs = {}
    for backend in ("eager", FLASH):
        model = tiny_model(arch)
        hf_posenc.patch(model, "alibi", attn_implementation=backend)
        outs[backend] = model.generate(ids, pad_token_id=0, **kw)
    assert torch.equal(outs["eager"].sequences, outs[FLASH].sequences)
    assert max(max_diff(a, b) for a, b in zip(outs["eager"].scores, outs[FLASH].scores, strict=True)) <= 1e-5
    assert any(kind == "varlen" for kind, _, _ in fake_flash.calls)


def test_flash_unpatch_restores_backend():
    model = tiny_model("llama", attn="sdpa")
    x = tokens(1, 30)
    before = logits(model, x)
    hf_posenc.patch(model, "alibi", attn_implementation=FLASH)
    assert model.config._attn_implementation == "hf_posenc_flash_attention_2"
    hf_posenc.unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(logits(model, x), before)
