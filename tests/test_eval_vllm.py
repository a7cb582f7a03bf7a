"""``eval --engine vllm``: every refusal before anything runs, journal keys that keep the engines apart, and
(with vLLM installed: ``make vllm``, HF_POSENC_VLLM_PYTHON) the same greedy answers and perplexities as the
transformers engine."""

from __future__ import annotations

import json
import math
import sys
import tempfile
from typing import ClassVar

import pytest
import torch
from conftest import char_tokenizer, tiny_model

import hf_posenc
from hf_posenc.cli import main
from hf_posenc.eval import EvalSpec, get_task, run_eval, runner
from hf_posenc.eval import vllm_engine as runner_errors
from hf_posenc.eval.journal import Journal
from hf_posenc.serving import EngineMissingError, ExportRefusedError, engines
from hf_posenc.tiny import byte_bpe_tokenizer
from hf_posenc.tiny import tiny_model as sized_model

SMALL = dict(lengths=[32], retrieval_lengths=[300], depths=[0.0, 1.0], trials=2, max_new_tokens=4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"engine": "vlm"}, "Unknown engine 'vlm'; choose from transformers, vllm. Did you mean 'vllm'"),
        ({"engine": "vllm", "attn_implementation": "sdpa"}, "omit --attn with --engine vllm"),
        ({"engine": "vllm", "accept": ["long_factors"]}, "choose from longrope_long_factors"),
        ({"accept": ["longrope_long_factors"]}, "use it with engine='vllm'"),
    ],
)
def test_bad_engine_settings_are_refused_with_the_options(kwargs, message):
    with pytest.raises(hf_posenc.InvalidParameterError, match=message):
        EvalSpec(tasks=["ppl", "passkey"], **kwargs)


def test_a_task_vllm_cannot_run_is_refused_naming_those_it_runs(monkeypatch):
    monkeypatch.setattr(type(get_task("ppl")), "engines", ("transformers",))
    with pytest.raises(hf_posenc.InvalidParameterError, match=r"The vllm engine runs passkey, .*; not ppl") as err:
        EvalSpec(tasks=["ppl", "passkey"], engine="vllm")
    assert "niah_single_1" in str(err.value) and "--engine transformers" in str(err.value)


def test_missing_vllm_names_make_vllm_and_the_variable(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_POSENC_VLLM_PYTHON", raising=False)
    if engines.vllm_python(required=False) is not None:
        pytest.skip("vLLM is importable here")
    with pytest.raises(EngineMissingError, match=r"make vllm.*HF_POSENC_VLLM_PYTHON"):
        run_eval(tiny_model("llama"), char_tokenizer(), EvalSpec(tasks=["passkey"], engine="vllm", **SMALL))
    out = tmp_path / "out"
    assert main(["eval", "tiny:llama", "--engine", "vllm", "--tasks", "passkey", "--out", str(out)]) == 2
    assert "HF_POSENC_VLLM_PYTHON" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize(
    ("schemes", "context", "message"),
    [
        (["none", "dynamic_ntk:factor=2"], 512, "does not compute transformers' dynamic NTK"),
        (["sinusoidal"], 512, "no form vllm reads"),
        (["yarn:factor=2", "none"], 256, "none: vLLM serves at most 256 tokens of this export"),  # passkey at 300
    ],
)
def test_schemes_vllm_cannot_serve_are_refused_before_any_runs(monkeypatch, schemes, context, message):
    monkeypatch.setenv("HF_POSENC_VLLM_PYTHON", "/nonexistent/python")  # never started: refused first
    monkeypatch.setattr(runner, "VllmScheme", None)
    error = hf_posenc.InvalidParameterError if "serves at most" in message else ExportRefusedError
    spec = EvalSpec(schemes=schemes, tasks=["passkey"], engine="vllm", **SMALL)
    with pytest.raises(error, match=message):
        run_eval(sized_model("llama", context=context), char_tokenizer(), spec)


class FakeVllm:
    """Stands in for a vLLM process: answers every prompt 'vllm', scores every token NLL 1."""

    calls: ClassVar[list[int]] = []

    def __init__(self, model, tokenizer, spec, max_model_len, log=print):
        self.version = "fake"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def generate(self, prompts, max_new_tokens):
        FakeVllm.calls.append(len(prompts))
        return [" vllm"] * len(prompts)

    def window_nll(self, windows):
        FakeVllm.calls.append(len(windows))
        return torch.ones(windows.shape[0], windows.shape[1] - 1)


def test_journal_keys_keep_vllm_and_transformers_answers_apart(tmp_path, monkeypatch):
    """vLLM answers are journaled under the engine, transformers' under the keys they always had: neither is
    ever reused for the other, each is reused for itself, and vLLM gets every probe of a task in one batch."""
    monkeypatch.setenv("HF_POSENC_VLLM_PYTHON", "/nonexistent/python")
    monkeypatch.setattr(runner, "VllmScheme", FakeVllm)
    model, tok = sized_model("llama", context=512), char_tokenizer()
    path = tmp_path / "journal.jsonl"

    def run(engine: str, resume: bool) -> tuple[dict, Journal]:
        FakeVllm.calls.clear()
        journal = Journal(path, resume=resume)
        spec = EvalSpec(schemes=["none", "yarn:factor=2"], tasks=["ppl", "passkey"], engine=engine, **SMALL)
        return run_eval(model, tok, spec, journal=journal, progress=False, log=lambda *_: None)["results"], journal

    served, _ = run("vllm", resume=False)
    assert FakeVllm.calls == [1, 4, 1, 4]  # per scheme: the ppl window, then the 4 passkey probes at once
    answers = {s["generated"] for entry in served.values() for s in entry["passkey"]["samples"]}
    assert answers == {" vllm"} and served["none"]["ppl"][0]["ppl"] == pytest.approx(math.e)
    assert served["none"]["engine"] == {"name": "vllm", "version": "fake"}

    plain, journal = run("transformers", resume=True)
    assert journal.reused == 0  # nothing vLLM answered is taken for transformers
    assert " vllm" not in {s["generated"] for s in plain["none"]["passkey"]["samples"]}
    assert plain["none"]["ppl"][0]["ppl"] != pytest.approx(math.e)

    again, journal = run("vllm", resume=True)
    assert FakeVllm.calls == [] and journal.reused == 10  # 2 x (1 perplexity + 4 answers): no vLLM started
    assert again == {k: {**v, "seconds": again[k]["seconds"]} for k, v in served.items()}
    _, journal = run("transformers", resume=True)
    assert journal.reused == 10

    fields = [json.loads(line)["fields"] for line in path.read_text().splitlines()]
    assert sum(f.get("engine") == "vllm" for f in fields) == 10
    assert sum("engine" not in f for f in fields) == 10  # transformers' keys: as before engines existed


FAKE_WORKER = """
import json, os, sys
config = json.load(open(sys.argv[2]))
reply = os.fdopen(int(sys.argv[3]), "w")
print("fake vLLM log line", config["max_model_len"], flush=True)
if os.environ.get("FAKE_VLLM_CRASH"):
    sys.exit(3)
def send(message):
    reply.write(json.dumps(message) + "\\n")
    reply.flush()
send({"ready": True, "version": "fake-0"})
for line in sys.stdin:
    request = json.loads(line)
    if request["op"] == "quit":
        break
    if request["op"] == "generate":  # echo the prompts' first tokens
        send({"outputs": [ids[: request["max_new_tokens"]] for ids in request["prompts"]]})
    elif request["op"] == "logprobs":
        send({"logprobs": [[-1.0] * (len(ids) - 1) for ids in request["windows"]]})
    else:
        send({"error": "ValueError: unknown op"})
"""


@pytest.fixture
def fake_vllm_python(tmp_path, monkeypatch):
    """A 'Python with vLLM' that runs a stand-in speaking vllm_answers.py's protocol (no vLLM needed)."""
    (tmp_path / "fake_worker.py").write_text(FAKE_WORKER)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} {tmp_path / "fake_worker.py"} "$@"\n')
    python.chmod(0o755)
    monkeypatch.setenv("HF_POSENC_VLLM_PYTHON", str(python))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the exports go
    return tmp_path / "tmp"


def test_each_scheme_is_exported_and_served_by_one_process(fake_vllm_python):
    """The client side of vllm_answers.py: one process per scheme, started for its first request, given
    every probe of a task at once as token ids, its answers decoded with the model's tokenizer; the
    temporary export is removed after the scheme."""
    logs = []
    spec = EvalSpec(schemes=["none", "yarn:factor=2"], tasks=["ppl", "passkey"], engine="vllm", **SMALL)
    results = run_eval(sized_model("llama", context=512), char_tokenizer(), spec, progress=False, log=logs.append)
    started = [line for line in logs if "serving" in line]
    assert len(started) == 2 and "vLLM fake-0 serving none (float32, max_model_len 304)" in started[0]
    for entry in results["results"].values():
        assert entry["engine"] == {"name": "vllm", "version": "fake-0"}
        assert {s["generated"] for s in entry["passkey"]["samples"]} == {"Ther"}  # the prompts' first 4 characters
        assert entry["ppl"][0]["ppl"] == pytest.approx(math.e)
    assert list(fake_vllm_python.iterdir()) == []  # exports removed
    assert any("serving" in line and "yarn:factor=2" in line for line in logs)


def test_a_vllm_process_that_dies_reports_its_log(fake_vllm_python, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_CRASH", "1")
    spec = EvalSpec(tasks=["passkey"], engine="vllm", **SMALL)
    with pytest.raises(runner_errors.VllmFailedError, match=r"exited \(code 3\) before answering(.|\n)*fake vLLM log"):
        run_eval(sized_model("llama", context=512), char_tokenizer(), spec, progress=False, log=lambda *_: None)
    assert list(fake_vllm_python.iterdir()) == []


@pytest.mark.skipif(
    engines.vllm_python(required=False) is None, reason="vLLM lives in its own venv: make vllm, HF_POSENC_VLLM_PYTHON"
)
def test_vllm_engine_answers_as_transformers_does(tmp_path):
    """An exported tiny LLaMA (head_dim 64: vLLM's CPU attention needs >= 32) with a byte-level BPE tokenizer:
    ``--engine vllm`` gives the transformers engine's greedy passkey answers and perplexities, for the
    model as saved and patched with YaRN (about a minute per scheme: each starts a vLLM process)."""
    bpe = byte_bpe_tokenizer()
    model = sized_model(
        "llama", vocab_size=len(bpe), initializer_range=0.2, hidden_size=128, num_attention_heads=2, context=512
    )
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    bpe.save_pretrained(folder)
    args = ["eval", str(folder), "--schemes", "none,yarn:factor=2", "--tasks", "passkey,ppl", "--lengths", "256"]
    args += ["--retrieval-lengths", "200,400", "--depths", "0,0.5,1", "--trials", "2", "--no-plots"]
    results = {}
    for engine in ("transformers", "vllm"):
        assert main([*args, "--engine", engine, "--out", str(tmp_path / engine)]) == 0
        results[engine] = json.loads((tmp_path / engine / "results.json").read_text())["results"]
    for scheme in ("none", "yarn:factor=2"):
        plain, served = results["transformers"][scheme], results["vllm"][scheme]
        assert served["engine"]["version"] and served["attn_implementation"] == "vllm"
        assert len(served["passkey"]["samples"]) == 12
        assert [s["generated"] for s in served["passkey"]["samples"]] == [
            s["generated"] for s in plain["passkey"]["samples"]
        ]
        assert served["ppl"][0]["ppl"] == pytest.approx(plain["ppl"][0]["ppl"], rel=1e-4)
    assert results["vllm"]["none"]["ppl"][0]["ppl"] != pytest.approx(results["vllm"]["yarn:factor=2"]["ppl"][0]["ppl"])
