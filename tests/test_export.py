"""Export for serving engines: each exported spec is loaded and run by the engine itself (llama.cpp through
llama-cpp-python, plain transformers) and its log-probs equal the patched model's; each written setting is
shown to matter (leaving it out fails verify); every refusal names the scheme, the engine and the consequence."""

from __future__ import annotations

import json
import os

import pytest
from conftest import char_tokenizer, tiny_model

import hf_posenc
from hf_posenc.cli import main
from hf_posenc.serving import (
    EXPORT_RECORD,
    EngineMissingError,
    ExportRefusedError,
    ExportVerificationError,
    engines,
    export,
    gguf_llama,
)
from hf_posenc.tiny import byte_bpe_tokenizer

try:
    import llama_cpp
except ImportError:  # CI installs it and sets HF_POSENC_REQUIRE_ENGINES=llama.cpp: no silent skip there
    if "llama.cpp" in os.environ.get("HF_POSENC_REQUIRE_ENGINES", ""):
        raise
    llama_cpp = None
needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed (make test does it)")

#: specs llama.cpp serves natively, and the spec a wrong GGUF setting would break
SERVED = [
    ("llama", None),
    ("llama", ("rope", {"rope_theta": 50000.0})),
    ("llama", ("linear", {"factor": 2.0})),
    ("llama", ("ntk", {"factor": 4.0})),
    ("llama", ("yarn", {"factor": 4.0})),
    ("llama", ("yarn", {"factor": 4.0, "attention_factor": 1.3})),
    ("llama", ("yarn", {"factor": 2.0, "mscale": 1.2, "mscale_all_dim": 0.8})),
    ("llama", ("llama3", {"factor": 8.0})),
    ("mistral", ("yarn", {"factor": 2.0})),
]


@pytest.fixture(scope="module")
def bpe():
    return byte_bpe_tokenizer()


def sharp_model(family: str, tokenizer, spec=None):
    """A tiny model whose outputs depend strongly on positions (larger init than HF's 0.02)."""
    model = tiny_model(family, vocab_size=len(tokenizer), initializer_range=0.2)
    if spec is not None:
        hf_posenc.patch(model, spec[0], **spec[1])
    return model


@needs_llama_cpp
@pytest.mark.parametrize(("family", "spec"), SERVED, ids=lambda v: v if isinstance(v, str) else str(v and v[0]))
def test_llama_cpp_serves_the_patched_model(tmp_path, bpe, family, spec):
    """200 tokens (past the tiny model's trained 64) score the same in llama.cpp as in the patched model."""
    model = sharp_model(family, bpe, spec)
    result = export(model, tmp_path, "llama.cpp", tokenizer=bpe, verify=True, verify_tokens=200)
    assert result.verify["passed"] and result.verify["max_abs_diff"] < 1e-4
    assert result.verify["tokenizes_alike"] is True
    record = json.loads((tmp_path / EXPORT_RECORD).read_text())
    assert record["engine_version"] == llama_cpp.__version__ and record["verify"]["tokens"] == 200
    assert (
        record["written"]["tokenizer"] == "gpt2"
        and "tokenizes a probe text exactly" in record["written"]["tokenizer_note"]
    )


def _without(key):
    real = engines.gguf_rope

    def rope(native, head_dim):
        out = real(native, head_dim)
        if key == "type":
            return {"type": "none", "freq_base": out["freq_base"]}
        return {k: v for k, v in out.items() if k != key}

    return rope


@needs_llama_cpp
@pytest.mark.parametrize(
    ("spec", "dropped"),
    [
        (("linear", {"factor": 2.0}), "type"),
        (("yarn", {"factor": 4.0}), "type"),
        (("yarn", {"factor": 4.0, "attention_factor": 1.3}), "attn_factor"),
        (("yarn", {"factor": 4.0}), "original_context_length"),
        (("llama3", {"factor": 8.0}), "freq_factors"),
    ],
)
def test_each_written_setting_matters(tmp_path, bpe, monkeypatch, spec, dropped):
    """A GGUF without one of the settings export writes is served differently, and verify says so."""
    monkeypatch.setattr(engines, "gguf_rope", _without(dropped))
    model = sharp_model("llama", bpe, spec)
    with pytest.raises(ExportVerificationError, match="differs from the patched model"):
        export(model, tmp_path, "llama.cpp", tokenizer=bpe, verify=True, verify_tokens=200)
    assert json.loads((tmp_path / EXPORT_RECORD).read_text())["verify"]["passed"] is False  # recorded anyway


@needs_llama_cpp
def test_query_key_rows_must_be_interleaved(tmp_path, bpe, monkeypatch):
    monkeypatch.setattr(gguf_llama, "interleave_halves", lambda weight, heads: weight)
    with pytest.raises(ExportVerificationError, match="max \\|Δ log-prob\\|"):
        export(sharp_model("llama", bpe), tmp_path, "llama.cpp", tokenizer=bpe, verify=True, verify_tokens=100)


@needs_llama_cpp
def test_a_wrong_pre_tokenizer_fails_verify(tmp_path, bpe, monkeypatch):
    """A tokenizer that merges 5-digit numbers, served with llama.cpp's 'llama-bpe' (which splits numbers
    into groups of three): served text would get other ids, and verify fails."""
    text = tmp_path / "digits.txt"
    text.write_text("In 1611, 12345 men said: 'tis 67890 " * 40)
    digits = byte_bpe_tokenizer(300, text.read_text())
    assert len(digits(" 12345").input_ids) == 1  # one token; llama-bpe would split it as " 123" + "45"
    result = export(sharp_model("llama", digits), tmp_path / "ok", "llama.cpp", tokenizer=digits, verify=True,
                    verify_text=str(text), verify_tokens=100)  # fmt: skip
    assert result.written["tokenizer_pre"] != "llama-bpe" and result.verify["tokenizes_alike"]
    monkeypatch.setattr(gguf_llama, "choose_tokenizer_pre", lambda *a: "llama-bpe")
    with pytest.raises(ExportVerificationError, match=r"tokenizes .* differently"):
        export(sharp_model("llama", digits), tmp_path / "out", "llama.cpp", tokenizer=digits, verify=True,
               verify_text=str(text), verify_tokens=100)  # fmt: skip


@needs_llama_cpp
def test_f16_export_within_its_tolerance(tmp_path, bpe):
    model = sharp_model("llama", bpe, ("yarn", {"factor": 4.0}))
    result = export(model, tmp_path, "llama.cpp", tokenizer=bpe, dtype="f16", verify=True, verify_tokens=200)
    assert result.written["dtype"] == "f16" and (tmp_path / "model-f16.gguf").is_file()
    assert 1e-4 < result.verify["max_abs_diff"] <= result.verify["tolerance"] == 1e-1  # f16 weights do move it


@needs_llama_cpp
def test_non_bpe_tokenizers_export_without_a_vocabulary(tmp_path):
    model = tiny_model("llama", initializer_range=0.2)
    hf_posenc.patch(model, "yarn", factor=2.0)
    result = export(model, tmp_path, "llama.cpp", tokenizer=char_tokenizer(), verify=True, verify_tokens=100)
    assert result.written["tokenizer"] == "no_vocab" and result.verify["tokenizes_alike"] is None
    assert result.verify["passed"]


@pytest.mark.skipif(
    engines.vllm_python(required=False) is None, reason="vLLM lives in its own venv: make vllm, HF_POSENC_VLLM_PYTHON"
)
def test_vllm_serves_the_patched_model(tmp_path, bpe):
    """vLLM's CPU attention needs head_dim >= 32 (about a minute: the engine starts a process)."""
    model = tiny_model("llama", vocab_size=len(bpe), initializer_range=0.2, hidden_size=128, num_attention_heads=2)
    hf_posenc.patch(model, "yarn", factor=4.0, attention_factor=1.3)
    result = export(model, tmp_path, "vllm", tokenizer=bpe, verify=True, verify_tokens=200)
    assert result.verify["passed"] and result.verify["max_abs_diff"] < 1e-4 and result.engine_version


REFUSED = [
    ("llama.cpp", "llama", ("dynamic_ntk", {"factor": 2.0}), "no dynamic NTK"),
    ("llama.cpp", "llama", ("longrope", {"short_factor": [1.0] * 8, "long_factor": [2.0] * 8}), "short and long"),
    ("llama.cpp", "llama", ("yarn", {"factor": 4.0, "beta_fast": 16.0}), "always uses 32/1"),
    ("llama.cpp", "llama", ("yarn", {"factor": 4.0, "truncate": False}), "truncate=False"),
    ("llama.cpp", "qwen2", ("yarn", {"factor": 2.0}), "covers the LLaMA architecture"),
    ("llama.cpp", "llama", ("alibi", {}), "alibi on llama has no form llama.cpp reads"),
    ("llama.cpp", "llama", ("nope", {}), "would load these weights with its own default rope"),
    ("llama.cpp", "llama", ("self_extend", {"group_size": 2, "window_size": 8}), "--grp-attn-n"),
    ("vllm", "llama", ("dynamic_ntk", {"factor": 2.0}), "does not compute transformers. dynamic NTK"),
    ("vllm", "llama", ("longrope", {"short_factor": [1.0] * 8, "long_factor": [2.0] * 8}), "longrope_long_factors"),
    ("vllm", "llama", ("yarn", {"factor": 2.0, "mscale": 1.2}), "not checked with mscale"),
    ("vllm", "llama", ("sinusoidal", {}), "no form vllm reads"),
    ("transformers", "llama", ("rerope", {"window_size": 8}), "no form transformers reads"),
]


@pytest.mark.parametrize(
    ("target", "family", "spec", "message"), REFUSED, ids=lambda v: v if isinstance(v, str) else ""
)
def test_refusals_name_what_the_engine_would_do(tmp_path, target, family, spec, message):
    model = tiny_model(family)
    hf_posenc.patch(model, spec[0], **spec[1])
    with pytest.raises(ExportRefusedError, match=message):
        export(model, tmp_path / "out", target)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_refusal_details_for_llama_cpp_layouts(tmp_path):
    for overrides, message in [
        ({"attention_bias": True}, "attention or MLP biases"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ]:
        with pytest.raises(hf_posenc.UnsupportedSchemeError, match=message):
            export(tiny_model("llama", **overrides), tmp_path / "x", "llama.cpp")
    with pytest.raises(hf_posenc.UnsupportedSchemeError, match="sliding window of 32"):
        export(tiny_model("mistral", sliding_window=32), tmp_path / "y", "llama.cpp")


def test_longrope_on_vllm_only_when_accepted(tmp_path):
    model = tiny_model("llama")
    hf_posenc.patch(model, "longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8, factor=4.0)
    result = export(model, tmp_path, "vllm", accept=["longrope_long_factors"])
    assert any("long factors to every request" in note for note in result.notes)
    assert json.loads((tmp_path / "config.json").read_text())["rope_parameters"]["rope_type"] == "longrope"
    assert result.serve == f"vllm serve {tmp_path} --max-model-len 256"


def test_static_ntk_declares_the_extended_context(tmp_path):
    """A plain rope_theta change, with max_position_embeddings = original x factor (vLLM sizes its tables by it)."""
    model = tiny_model("llama")
    hf_posenc.patch(model, "ntk", factor=4.0)
    result = export(model, tmp_path, "vllm")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "default" and config["rope_parameters"]["rope_theta"] > 10000
    assert config["max_position_embeddings"] == 256 and result.serve.endswith("--max-model-len 256")


def test_vllm_verify_is_held_to_the_exported_context(tmp_path, monkeypatch):
    monkeypatch.setattr(engines, "vllm_python", lambda required=True: "/nonexistent/python")
    model = tiny_model("llama")
    hf_posenc.patch(model, "yarn", factor=2.0)
    with pytest.raises(hf_posenc.InvalidParameterError, match="at most 127 tokens"):
        export(model, tmp_path / "x", "vllm", tokenizer=char_tokenizer(), verify=True, verify_tokens=200)
    assert not (tmp_path / "x").exists()


def test_bad_arguments_are_refused_with_the_options(tmp_path):
    model = tiny_model("llama")
    for call, message in [
        (lambda: export(model, tmp_path, "vlm"), "Did you mean 'vllm'"),
        (lambda: export(model, tmp_path, "vllm", accept=["long_factors"]), "longrope_long_factors"),
        (lambda: export(model, tmp_path, "llama.cpp", dtype="q4"), "f32, f16, bf16"),
        (lambda: export(model, tmp_path, "llama.cpp", dtype="bf16"), "f32 or f16"),
        (lambda: export(model, tmp_path, "transformers", verify=True), "needs the tokenizer"),
    ]:
        with pytest.raises(hf_posenc.InvalidParameterError, match=message):
            call()


def test_verify_without_the_engine_says_so_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_POSENC_VLLM_PYTHON", raising=False)
    monkeypatch.setattr(engines, "package_version", lambda name: None)
    model = tiny_model("llama")
    hf_posenc.patch(model, "yarn", factor=2.0)
    for target in ("vllm", "llama.cpp"):
        with pytest.raises(EngineMissingError, match="not installed"):
            export(model, tmp_path / target, target, tokenizer=char_tokenizer(), verify=True)
        assert not (tmp_path / target).exists()


@pytest.mark.parametrize(
    ("family", "spec"),
    [("llama", ("yarn", {"factor": 4.0})), ("gpt2", ("learned", {"max_positions": 128})), ("bloom", ("alibi", {}))],
)
def test_plain_transformers_loads_the_export(tmp_path, family, spec):
    """The transformers target's verify loads the folder without hf_posenc and compares log-probs."""
    model = tiny_model(family, initializer_range=0.2)
    hf_posenc.patch(model, spec[0], **spec[1])
    result = export(model, tmp_path, "transformers", tokenizer=char_tokenizer(), verify=True, verify_tokens=100)
    assert result.verify["passed"] and result.verify["max_abs_diff"] < 1e-5


@needs_llama_cpp
def test_cli_export_verify_and_refusal(tmp_path, capsys):
    out = tmp_path / "gguf"
    args = ["export", "tiny:llama", "--target", "llama.cpp", "--scheme", "yarn:factor=4", "--out", str(out)]
    assert main([*args, "--verify", "--verify-tokens", "100"]) == 0
    printed = capsys.readouterr().out
    assert "verified on 100 tokens of kjv" in printed and "llama-server -m" in printed
    assert json.loads((out / EXPORT_RECORD).read_text())["verify"]["passed"]
    refused = [
        "export",
        "tiny:llama",
        "--target",
        "vllm",
        "--scheme",
        "dynamic_ntk:factor=2",
        "--out",
        str(tmp_path / "v"),
    ]
    assert main(refused) == 2
    assert "does not compute transformers' dynamic NTK" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main([*args[:-1], str(tmp_path / "busy")]) == 2
    assert "not an earlier export" in capsys.readouterr().err
