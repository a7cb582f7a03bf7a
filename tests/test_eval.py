"""Evaluation: window protocol and NLL by hand, deterministic probes, exact scoring, reports, CLI."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import char_tokenizer, tiny_model, tokens
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_posenc.cli import main
from hf_posenc.eval import (
    EvalSpec,
    evaluate_perplexity,
    is_correct,
    load_texts,
    make_probe,
    markdown_report,
    plot_results,
    run_eval,
    run_retrieval,
    window_spans,
)


@given(n=st.integers(2, 400), length=st.integers(2, 64), data=st.data())
@settings(max_examples=60, deadline=None)
def test_sliding_windows_score_every_token_once(n, length, data):
    stride = data.draw(st.integers(1, length))
    spans = window_spans(n, length, stride)
    scored = [t for w in spans for t in range(w.first_scored, w.end)]
    assert len(scored) == len(set(scored))  # never twice
    if spans and stride < length:
        assert scored == list(range(1, spans[-1].end))  # contiguous from token 1
        for w in spans[1:]:
            assert w.first_scored - w.start >= length - stride  # minimum context
    elif spans:  # non-overlapping: each window scores all but its first token
        assert all(w.first_scored == w.start + 1 for w in spans)


def hand_nll(model, ids: torch.Tensor, spans) -> tuple[float, int]:
    total, count = 0.0, 0
    with torch.no_grad():
        for w in spans:
            logits = model(ids[None, w.start : w.end]).logits[0].double()
            logp = F.log_softmax(logits, -1)
            for t in range(w.first_scored, w.end):
                total -= logp[t - w.start - 1, ids[t]].item()
                count += 1
    return total / count, count


@pytest.mark.parametrize("stride", [None, 16, 7])
def test_perplexity_equals_hand_computed_nll(stride):
    model = tiny_model("llama")
    ids = tokens(1, 200)[0]
    result = evaluate_perplexity(model, ids, 40, stride=stride, batch_size=3, chunk_size=9)
    expected, count = hand_nll(model, ids, window_spans(200, 40, stride))
    assert result.tokens_scored == count
    assert result.nll == pytest.approx(expected, abs=1e-5)


def test_position_curve_is_the_mean_loss_per_bucket():
    model = tiny_model("llama")
    ids = tokens(1, 160)[0]
    result = evaluate_perplexity(model, ids, 40, buckets=4, max_windows=3)
    assert result.windows == 3 and result.bucket_size == 10
    with torch.no_grad():
        losses = []
        for k in range(3):
            window = ids[k * 40 : (k + 1) * 40]
            logp = F.log_softmax(model(window[None]).logits[0].double(), -1)
            losses.append(-logp[torch.arange(39), window[1:]])  # loss at positions 1..39
    per_position = torch.stack(losses).mean(0)
    expected = [per_position[max(0, b * 10 - 1) : b * 10 + 9].mean().item() for b in range(4)]
    expected[0] = per_position[:9].mean().item()  # bucket 0 holds positions 1..9
    assert result.position_loss == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("task", ["passkey", "needle", "multikey"])
def test_probes_are_deterministic_and_sized(task):
    tok = char_tokenizer()
    text = " ".join(load_texts("kjv")[:2])
    a = make_probe(task, tok, 600, 0.5, seed=3, haystack_text=text)
    b = make_probe(task, tok, 600, 0.5, seed=3, haystack_text=text)
    c = make_probe(task, tok, 600, 0.5, seed=4, haystack_text=text)
    assert a == b and a.answer != c.answer
    assert 540 <= a.n_tokens <= 600
    where = a.prompt.index(a.answer) / len(a.prompt)
    assert 0.3 < where < 0.7  # the needle sits near the asked depth
    needles = len(re.findall(r"special magic numbers for", a.prompt))
    assert needles == {"passkey": 0, "needle": 1, "multikey": 4}[task]


def _word_tokenizer():
    """Words without their spaces: counting sentences one by one overestimates the joined text by one
    token per sentence, as a byte-level BPE does (a space joins into the next word's token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={"<unk>": 0}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.mark.parametrize("task", ["passkey", "needle", "multikey"])
@pytest.mark.parametrize("length", [300, 2000])
def test_prompts_have_the_requested_length(task, length):
    """The real count of the joined prompt is at most the length and short of it by less than one
    haystack sentence (passkey filler: 4 words; KJV sentences: well under 120 words)."""
    text = " ".join(load_texts("kjv")[:2])
    probe = make_probe(task, _word_tokenizer(), length, 0.5, seed=1, haystack_text=text)
    assert probe.n_tokens == len(probe.prompt.split())
    assert length - (5 if task == "passkey" else 120) < probe.n_tokens <= length


def test_depth_places_the_needle():
    tok = char_tokenizer()
    early = make_probe("passkey", tok, 800, 0.0, seed=0)
    late = make_probe("passkey", tok, 800, 1.0, seed=0)
    assert early.prompt.index("The pass key is") < 200
    assert late.prompt.index("The pass key is") > len(late.prompt) - 200


def test_scoring_is_exact():
    assert is_correct("passkey", " 68220. Remember", "68220")
    assert not is_correct("passkey", " 682201", "68220")
    assert not is_correct("passkey", " the key is 1 68220", "68220")  # first number only
    assert is_correct("needle", " 1234567.", "1234567") and not is_correct("needle", "123456", "1234567")


def oracle(prompt: str) -> str:
    """Answers from the prompt itself (the asked key's value), to test the harness, not a model."""
    if "pass key is" in prompt:
        return " " + re.search(r"The pass key is (\d+)", prompt).group(1)
    key = re.search(r"special magic number for (\w+) mentioned", prompt).group(1)
    return " " + re.search(rf"numbers for {key} is: (\d+)", prompt).group(1)


@pytest.mark.parametrize("task", ["passkey", "needle", "multikey"])
def test_retrieval_accuracy_with_oracle_and_wrong_answers(task):
    tok = char_tokenizer()
    text = " ".join(load_texts("kjv")[:2])
    kw = dict(lengths=[500, 700], depths=[0.0, 0.5, 1.0], trials=2, haystack_text=text)
    right = run_retrieval(task, None, tok, answer_fn=oracle, **kw)
    wrong = run_retrieval(task, None, tok, answer_fn=lambda p: " 0", **kw)
    assert right.accuracy == [[1.0] * 3] * 2 and right.mean == 1.0
    assert wrong.mean == 0.0 and len(wrong.samples) == 12


def test_run_eval_end_to_end_with_report_and_plots(tmp_path):
    model = tiny_model("llama")
    spec = EvalSpec(
        schemes=["none", "yarn:factor=2"],
        tasks=["ppl", "passkey", "needle"],
        lengths=[64, 128],
        retrieval_lengths=[300],
        depths=[0.5],
        max_windows=2,
        max_new_tokens=4,
    )
    output = run_eval(model, char_tokenizer(), spec, progress=False, log=lambda *_: None)
    assert set(output["results"]) == {"none", "yarn:factor=2"}
    ppl = output["results"]["none"]["ppl"]
    assert [r["length"] for r in ppl] == [64, 128] and all(r["windows"] == 2 for r in ppl)
    assert output["results"]["yarn:factor=2"]["ppl"][1]["ppl"] != ppl[1]["ppl"]
    report = markdown_report(output)
    assert "| yarn:factor=2 |" in report and "passkey accuracy" in report
    written = plot_results(output, tmp_path)
    assert {p.name for p in written} == {
        "ppl_vs_length.png",
        "position_loss.png",
        "passkey_heatmap.png",
        "needle_heatmap.png",
    }
    assert all(p.stat().st_size > 1000 for p in written)
    json.dumps(output)  # JSON-ready
    assert not hasattr(model.config, "posenc")  # every scheme was unpatched


def test_eval_spec_validation():
    with pytest.raises(ValueError, match="Unknown task"):
        EvalSpec(tasks=["ppl", "rouge"])
    with pytest.raises(ValueError, match="depths"):
        EvalSpec(depths=[1.5])
    with pytest.raises(Exception, match="Did you mean 'yarn'"):
        run_eval(tiny_model(), char_tokenizer(), EvalSpec(schemes=["yarm:factor=2"]), log=lambda *_: None)


def test_text_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first doc")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("second doc")
    assert load_texts(str(tmp_path)) == ["first doc", "second doc"]
    assert load_texts(str(tmp_path / "a.txt")) == ["first doc"]
    assert len(load_texts("kjv")) == 66
    data = tmp_path / "ds"
    data.mkdir()
    (data / "train.jsonl").write_text('{"body": "from datasets"}\n{"body": "again"}\n')
    assert load_texts(f"hf:{data}::train:body") == ["from datasets", "again"]
    with pytest.raises(FileNotFoundError, match="Unknown text source"):
        load_texts("nowhere.txt")


def test_cli_eval(tmp_path, capsys):
    path = tmp_path / "model"
    tiny_model("llama").save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    out = tmp_path / "out"
    code = main(
        [
            "eval",
            str(path),
            "--schemes",
            "none,linear:factor=2",
            "--tasks",
            "ppl",
            "--lengths",
            "64,96",
            "--out",
            str(out),
            "--no-plots",
        ]
    )
    assert code == 0
    assert "| linear:factor=2 |" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["spec"]["lengths"] == [64, 96]


def test_cli_eval_resumes_from_its_journal(tmp_path, monkeypatch, capsys):
    """--resume reuses every finished result (a crash's cut-short last line is recomputed), adds only the
    new trials, gives the same numbers as a fresh run, and never reuses answers recorded for other weights."""
    from hf_posenc.eval import runner

    path = tmp_path / "model"
    tiny_model("llama").save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    out = tmp_path / "out"
    calls = []
    real = runner.greedy_continuation
    monkeypatch.setattr(runner, "greedy_continuation", lambda *a, **k: calls.append(1) or real(*a, **k))
    base = ["eval", str(path), "--schemes", "none,linear:factor=2", "--tasks", "ppl,passkey", "--lengths", "64"]
    base += ["--retrieval-lengths", "300", "--depths", "0.5", "--out", str(out), "--no-plots", "--max-new-tokens"]

    def run(trials: int, *extra: str) -> dict:
        calls.clear()
        assert main([*base, "4", "--trials", str(trials), *extra]) == 0
        results = json.loads((out / "results.json").read_text())["results"]
        return {label: {k: v for k, v in entry.items() if k != "seconds"} for label, entry in results.items()}

    fresh = run(3)
    assert len(calls) == 6
    journal = out / "journal.jsonl"
    lines = journal.read_text().splitlines()
    assert len(lines) == 8  # 2 perplexities + 6 answers
    journal.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10])  # killed while writing the last line
    resumed = run(3, "--resume")
    assert len(calls) == 1 and "resuming: 7 finished results" in capsys.readouterr().out
    assert resumed == fresh
    run(4, "--resume")
    assert len(calls) == 2  # only the new trial, for each scheme
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    model.save_pretrained(path)
    run(4, "--resume")
    assert len(calls) == 8  # other weights: nothing reused


def test_journal_absorbs_the_entries_of_another_it_lacks(tmp_path):
    """A committed journal seeds a fresh one: its missing entries are added and written at once (a cut-short
    line skipped), its own are kept, and a second absorb adds nothing."""
    from hf_posenc.eval.journal import Journal

    committed = Journal(tmp_path / "committed.jsonl")
    for i in range(3):
        committed.put({"kind": "answer", "i": i}, f"from the report {i}")
    with committed.path.open("a") as handle:
        handle.write('{"key": "cut')  # killed while writing
    work = Journal(tmp_path / "work" / "journal.jsonl", resume=True)
    work.put({"kind": "answer", "i": 0}, "computed here")
    assert work.absorb(committed.path) == 2 and work.absorb(committed.path) == 0
    reread = Journal(work.path, resume=True)
    assert len(reread) == 3 and reread.get({"kind": "answer", "i": 0}) == "computed here"
    assert reread.get({"kind": "answer", "i": 2}) == "from the report 2"
    fresh = Journal(tmp_path / "fresh" / "journal.jsonl", resume=True)  # nothing there yet: written by absorb
    assert fresh.absorb(committed.path) == 3 and len(Journal(fresh.path, resume=True)) == 3


def test_lm_eval_bridge_sees_the_patch(tmp_path):
    pytest.importorskip("lm_eval")
    import hf_posenc
    from hf_posenc.eval.lm_eval_bridge import evaluate_with_lm_eval, lm_eval_model

    model, tok = tiny_model("llama"), char_tokenizer()
    assert lm_eval_model(model, tok).model is model  # the very instance, patches and all
    kw = dict(n=4, context_verses=1)
    plain = evaluate_with_lm_eval(model, tok, tmp_path / "a", **kw)
    with hf_posenc.patched(model, "linear", factor=4.0):
        scaled = evaluate_with_lm_eval(model, tok, tmp_path / "b", **kw)
    assert plain["sample_len"] == scaled["sample_len"] == 4
    assert plain["perplexity,none"] != scaled["perplexity,none"]
    assert 0.0 <= scaled["acc,none"] <= 1.0


def test_cli_eval_on_bloom_with_a_backend_bloom_lacks(tmp_path, capsys):
    """BLOOM loads only on eager; --attn picks the patched schemes' backend (the ALiBi patch on sdpa
    reproduces native BLOOM, so both rows score the same)."""
    path = tmp_path / "model"
    tiny_model("bloom").save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    out = tmp_path / "out"
    args = ["eval", str(path), "--schemes", "none,alibi", "--lengths", "64", "--attn", "sdpa"]
    assert main([*args, "--device", "cpu", "--dtype", "float32", "--out", str(out), "--no-plots"]) == 0
    assert "cpu, float32, eager" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())["results"]
    assert results["none"]["ppl"][0]["ppl"] == pytest.approx(results["alibi"]["ppl"][0]["ppl"], rel=1e-5)
    assert results["alibi"]["attn_implementation"] == "hf_posenc_sdpa"
    assert results["none"]["attn_implementation"] == "eager"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"max_windows": 0}, "max_windows must be an integer >= 1"),
        ({"trials": 0}, "trials must be an integer >= 1"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ({"lengths": []}, "lengths is empty"),
        ({"lengths": [64, 1]}, r"lengths must be integers >= 2 tokens, got \[1\]"),
        ({"retrieval_lengths": []}, "retrieval_lengths is empty"),
        ({"stride": 0}, "stride must be between 1 and the shortest length"),
        ({"lengths": [64, 128], "stride": 100}, r"shortest length \(64\)"),
        ({"depths": []}, "depths is empty"),
        ({"tasks": []}, "No task given"),
        ({"schemes": []}, "No scheme given"),
        ({"schemes": ["none", "yarn:factor=2", "yarn:factor=2"]}, "listed twice: yarn:factor=2"),
        ({"schemes": ["yarn:factr=2"]}, "factr"),
    ],
)
def test_eval_spec_rejects_what_would_fail_later(kwargs, message):
    """Each of these used to pass the spec and fail mid-run (ZeroDivisionError, range() step 0, an
    empty table) or silently evaluate nothing."""
    import hf_posenc

    with pytest.raises(hf_posenc.InvalidParameterError, match=message):
        EvalSpec(**kwargs)


def test_eval_functions_raise_parameter_errors():
    import hf_posenc

    model = tiny_model("llama")
    ids = tokens(1, 200)[0]
    for call, message in [
        (lambda: window_spans(10, 1), "length must be >= 2"),
        (lambda: window_spans(10, 4, stride=0), "stride must be in"),
        (lambda: window_spans(10, 4, max_windows=0), "max_windows must be >= 1"),
        (lambda: evaluate_perplexity(model, ids, 40, batch_size=0), "batch_size"),
        (lambda: evaluate_perplexity(model, ids[:10], 40), "too few for one window of 40"),
        (lambda: run_retrieval("passkey", None, char_tokenizer(), [800], [0.5], trials=0), "trials must be >= 1"),
        (lambda: run_retrieval("passkey", None, char_tokenizer(), [800], []), "at least one length and one depth"),
        (lambda: make_probe("needle", char_tokenizer(), 800, 0.5, seed=0), "needs a real-text haystack"),
        (lambda: load_texts("hf:only-a-name"), "Expected hf:NAME"),
    ]:
        with pytest.raises(hf_posenc.InvalidParameterError, match=message):
            call()


@pytest.mark.parametrize("task", ["passkey", "needle", "multikey"])
def test_retrieval_lengths_shorter_than_the_prompt_are_refused(task):
    """The instructions, question and needle(s) alone exceed the length: say the minimum instead of
    silently building a prompt longer than asked."""
    import hf_posenc

    tok = char_tokenizer()
    text = " ".join(load_texts("kjv")[:2])
    with pytest.raises(hf_posenc.InvalidParameterError, match=r"at least (\d+) tokens") as info:
        make_probe(task, tok, 120, 0.5, seed=0, haystack_text=text)
    minimum = int(re.search(r"at least (\d+) tokens", str(info.value)).group(1))
    assert make_probe(task, tok, minimum, 0.5, seed=0, haystack_text=text).n_tokens <= minimum
    logged = []
    spec = EvalSpec(tasks=["ppl", task], lengths=[64], retrieval_lengths=[120, 2000], depths=[0.5])
    with pytest.raises(hf_posenc.InvalidParameterError, match="at least"):
        run_eval(tiny_model("llama"), tok, spec, progress=False, log=logged.append)
    assert logged == []  # refused before the first scheme ran


def test_binary_text_sources_are_named(tmp_path):
    import hf_posenc

    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(hf_posenc.InvalidParameterError, match=r"bad\.txt is not UTF-8"):
        load_texts(str(tmp_path))
    with pytest.raises(hf_posenc.InvalidParameterError, match=r"bad\.txt is not UTF-8"):
        load_texts(str(tmp_path / "bad.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"No \.txt files") as info:  # still a FileNotFoundError
        load_texts(str(tmp_path / "empty"))
    assert isinstance(info.value, hf_posenc.PosencError)  # and reported in one line by the CLI
