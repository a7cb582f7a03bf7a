"""Perplexity equals a hand-computed NLL; spec parsing; the embedded corpus; the CLI; the demo (slow)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import char_tokenizer, tiny_model, tokens

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
    assert "gemma3_text: per-layer-type" in out and "llama4_text: refused: complex-number rotary" in out


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


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_perplexity_ignores_padding(family, side):
    """A padded row scores exactly its real tokens: pads are neither targets nor predictors, and the
    real tokens keep the positions they have unpadded (GPT-2's learned table would notice a shift)."""
    model = tiny_model(family)
    rows = [tokens(1, 30, seed=2)[0], tokens(1, 18, seed=3)[0]]
    width = max(len(r) for r in rows)
    ids = torch.full((2, width), 1, dtype=torch.long)
    mask = torch.zeros((2, width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span], mask[i, span] = row, 1
    unpadded = [token_nll(model, row[None])[0] for row in rows]
    nll = token_nll(model, ids, attention_mask=mask)
    for i in range(len(rows)):
        real = nll[i][~nll[i].isnan()]
        assert real.shape == unpadded[i].shape and torch.allclose(real, unpadded[i], atol=1e-5)
    by_hand = math.exp(torch.cat(unpadded).double().mean().item())  # token-weighted over both rows
    assert perplexity(model, ids, attention_mask=mask) == pytest.approx(by_hand, rel=1e-5)
    assert perplexity(model, ids, attention_mask=torch.ones_like(ids)) == pytest.approx(perplexity(model, ids))


def _save_patched(folder, family: str, scheme: str, **params):
    """A tiny model patched and saved with a character tokenizer beside it; returns the in-memory model
    (initialised wide enough for positions to matter: yarn then moves its perplexity by about 1%)."""
    import warnings

    from hf_posenc.errors import PosencWarning

    model = tiny_model(family, initializer_range=0.2)
    hf_posenc.patch(model, scheme, **params)
    with warnings.catch_warnings():  # GPT-2 + RoPE: "plain transformers would load it unpatched", as expected
        warnings.simplefilter("ignore", PosencWarning)
        model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return model


@pytest.mark.parametrize(
    ("family", "scheme", "params", "label"),
    [("llama", "yarn", {"factor": 2}, "yarn:factor=2"), ("gpt2", "rope", {}, "rope")],
)
def test_cli_eval_runs_a_saved_patched_checkpoint_with_its_scheme(tmp_path, capsys, family, scheme, params, label):
    """A checkpoint saved patched is loaded through hf_posenc.from_pretrained: its row is the patched model
    (labelled with its saved spec), not the unpatched one labelled "none". The GPT-2 learned->RoPE
    model runs at 128 tokens, twice its learned table (loaded plainly, it crashed there)."""
    import json

    from hf_posenc.eval import evaluate_perplexity, load_texts, token_stream

    model = _save_patched(tmp_path / "ckpt", family, scheme, **params)
    ids = token_stream(char_tokenizer(), load_texts("kjv"), 129)
    expected = evaluate_perplexity(model, ids, 128, max_windows=1).ppl
    out = tmp_path / "out"
    args = ["eval", str(tmp_path / "ckpt"), "--tasks", "ppl", "--lengths", "128", "--out", str(out), "--no-plots"]
    assert main([*args, "--device", "cpu", "--dtype", "float32"]) == 0
    output = json.loads((out / "results.json").read_text())
    assert list(output["results"]) == [f"{label} (saved)"]
    assert output["results"][f"{label} (saved)"]["ppl"][0]["ppl"] == pytest.approx(expected, rel=1e-5)
    assert output["saved_scheme"]["label"] == label and output["saved_scheme"]["spec"]["scheme"] == scheme
    assert f"| {label} (saved) |" in capsys.readouterr().out
    if family == "llama":  # the unpatched model scores differently at 2x its context
        hf_posenc.unpatch(model)
        assert evaluate_perplexity(model, ids, 128, max_windows=1).ppl != pytest.approx(expected, rel=1e-3)


def test_eval_of_a_saved_patched_checkpoint_refuses_other_schemes(tmp_path, capsys):
    from hf_posenc.eval import EvalSpec, run_eval

    _save_patched(tmp_path / "ckpt", "llama", "yarn", factor=2)
    args = ["eval", str(tmp_path / "ckpt"), "--schemes", "none,linear:factor=2", "--lengths", "64"]
    assert main([*args, "--out", str(tmp_path / "out"), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "already patched with yarn:factor=2" in err and "--schemes none" in err and "base checkpoint" in err
    assert not (tmp_path / "out").exists()
    loaded = hf_posenc.from_pretrained(str(tmp_path / "ckpt"))
    with pytest.raises(hf_posenc.InvalidParameterError, match="evaluated as saved"):
        run_eval(loaded, char_tokenizer(), EvalSpec(schemes=["yarn:factor=4"], lengths=[64]), log=lambda *_: None)


def test_cli_eval_builds_tiny_models(tmp_path, capsys):
    import json

    from hf_posenc.eval import evaluate_perplexity, load_texts, token_stream
    from hf_posenc.tiny import tiny_model as packaged_tiny_model

    out = tmp_path / "out"
    args = ["eval", "tiny:gpt2", "--schemes", "none,rope", "--lengths", "64", "--out", str(out), "--no-plots"]
    assert main([*args, "--device", "cpu", "--dtype", "float32"]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    ids = token_stream(char_tokenizer(), load_texts("kjv"), 65)
    expected = evaluate_perplexity(packaged_tiny_model("gpt2"), ids, 64, max_windows=1).ppl
    assert results["none"]["ppl"][0]["ppl"] == pytest.approx(expected, rel=1e-4)
    assert "model: tiny:gpt2" in capsys.readouterr().out
    assert main(["eval", "tiny:t5", "--out", str(out)]) == 2
    assert "tiny:<model_type>" in capsys.readouterr().err


def test_cli_patch_of_a_tiny_model_then_eval(tmp_path, capsys):
    assert main(["patch", "tiny:llama", "linear:factor=2", "--out", str(tmp_path / "ckpt")]) == 0
    assert hf_posenc.get_handle(hf_posenc.from_pretrained(str(tmp_path / "ckpt"))).scheme.name == "linear"
    args = ["eval", str(tmp_path / "ckpt"), "--lengths", "64", "--out", str(tmp_path / "out"), "--no-plots"]
    assert main(args) == 0
    assert "| linear:factor=2 (saved) |" in capsys.readouterr().out


def test_cli_demo_selects_its_preset():
    from hf_posenc.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["demo"]).preset == "quick"
    assert parser.parse_args(["demo", "--quick"]).preset == "quick"
    assert parser.parse_args(["demo", "--full"]).preset == "full"
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--quick", "--full"])


def test_full_demo_runs_three_trials_per_retrieval_cell_and_resumes(monkeypatch):
    import hf_posenc.cli as cli
    from hf_posenc.demo import FULL

    assert FULL.trials >= 3
    seen = {}
    monkeypatch.setattr(cli, "_run", lambda *a: seen.setdefault("args", a) and 0)
    assert cli.main(["demo", "--full", "--resume", "--out", "x"]) == 0
    spec, resume = seen["args"][1], seen["args"][-1]
    assert spec is FULL and resume is True
    seen.clear()
    cli.main(["demo"])
    assert seen["args"][-1] is False


def test_cli_help_names_recipes_that_exist(capsys):
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    paths = re.findall(r"recipes/configs/\S+?\.yaml", capsys.readouterr().out)
    assert paths and all((root / p).is_file() for p in paths), paths


def test_training_data_does_not_import_the_eval_package():
    import subprocess
    import sys

    code = "import sys, hf_posenc.train.data; print(sorted(m for m in sys.modules if m.startswith('hf_posenc.eval')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    import hf_posenc.eval
    import hf_posenc.eval.data
    import hf_posenc.texts

    assert hf_posenc.eval.load_texts is hf_posenc.eval.data.load_texts is hf_posenc.texts.load_texts
