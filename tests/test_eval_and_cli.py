"""Perplexity equals a hand-computed NLL; spec parsing; the embedded corpus; the CLI; the demo (slow)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model, tokens

import hf_posenc
from hf_posenc.cli import main
from hf_posenc.corpus import load_corpus, load_documents
from hf_posenc.eval import perplexity, token_nll
from hf_posenc.specs import format_scheme_spec, parse_scheme_spec


def test_token_nll_equals_hand_computed_and_model_loss():
    model = tiny_model("llama")
    x = tokens(2, 50)
    nll = token_nll(model, x, chunk_size=7)  # chunks that do not divide the length
    with torch.no_grad():
        logits = model(x).logits
        loss = model(x, labels=x).loss
    log_probs = F.log_softmax(logits[:, :-1].double(), dim=-1)
    by_hand = -log_probs.gather(-1, x[:, 1:, None]).squeeze(-1)
    assert torch.allclose(nll.double(), by_hand, atol=1e-5)
    assert perplexity(model, x) == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_token_nll_sees_the_patch():
    model = tiny_model("llama")
    x = tokens(1, 150)
    base = perplexity(model, x)
    with hf_posenc.patched(model, "linear", factor=4.0):
        assert perplexity(model, x) != base
    assert perplexity(model, x) == base


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("none", None),
        ("yarn:factor=2", ("yarn", {"factor": 2})),
        ("yarn:factor=2.5:beta_fast=16:truncate=false", ("yarn", {"factor": 2.5, "beta_fast": 16, "truncate": False})),
        ("longrope:short_factor=[1,2]", ("longrope", {"short_factor": [1, 2]})),
        ("dynamic:factor=2:refresh=exact", ("dynamic", {"factor": 2, "refresh": "exact"})),
    ],
)
def test_parse_scheme_spec(spec, parsed):
    assert parse_scheme_spec(spec) == parsed
    assert parse_scheme_spec(format_scheme_spec(parsed)) == parsed


@pytest.mark.parametrize("bad", ["yarn:factor", ":factor=2", "none:factor=2"])
def test_parse_scheme_spec_errors(bad):
    with pytest.raises(hf_posenc.InvalidParameterError):
        parse_scheme_spec(bad)


def test_embedded_corpus_is_the_whole_kjv():
    docs = load_documents("kjv")
    assert len(docs) == 66
    assert docs[0].startswith("In the beginning God created the heaven and the earth.")
    assert docs[-1].endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert len(load_corpus()) > 4_000_000
    with pytest.raises(ValueError, match="available: kjv"):
        load_documents("wiki")


def test_cli_ls(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    assert "yarn" in out and "dynamic_ntk  (dynamic)" in out and "qwen2 -> llama" in out


def test_cli_patch_saves_a_reloadable_checkpoint(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "base")
    assert main(["patch", str(tmp_path / "base"), "yarn:factor=2", "--out", str(tmp_path / "out")]) == 0
    model = hf_posenc.from_pretrained(str(tmp_path / "out"))
    assert hf_posenc.get_handle(model).scheme.factor == 2


@pytest.mark.slow
def test_demo_on_the_real_model(tmp_path):
    """SmolLM2-135M, quick preset: inside its trained context, the scaled schemes cost little."""
    import json

    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    base = results["none"]["ppl"][0]["ppl"]
    assert 2 < base < 20 and results["yarn:factor=2"]["ppl"][0]["ppl"] < 1.5 * base
    assert (tmp_path / "ppl_vs_length.png").exists() and (tmp_path / "passkey_heatmap.png").exists()
