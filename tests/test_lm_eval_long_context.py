"""lm-eval's long-context groups through the bridge, offline: LongBench and BABILong read from a local folder
this test writes (an oracle answering from those records scores 1, a tiny model runs end to end), RULER's
offline tasks generated with the model's tokenizer, and every task that needs the network refused by name."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from conftest import char_tokenizer

import hf_posenc
from hf_posenc.cli import main
from hf_posenc.eval import lm_eval_bridge
from hf_posenc.eval.lm_eval_bridge import (
    RULER_OFFLINE,
    RULER_ONLINE,
    evaluate_long_context,
    long_context_table,
    plan_long_context,
)
from hf_posenc.tiny import byte_bpe_tokenizer, tiny_model

pytest.importorskip("lm_eval")

needs_longbench = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("jieba", "fuzzywuzzy", "rouge")),
    reason="LongBench's metrics need lm_eval[longbench] (the [lm-eval] extra installs it)",
)
needs_ruler = pytest.mark.skipif(
    importlib.util.find_spec("wonderwords") is None,
    reason="RULER's generator needs lm_eval[ruler] (the [lm-eval] extra installs it)",
)


def write_data(root: Path, n: int = 3, splits: tuple[str, ...] = ("qa1",)) -> Path:
    """LongBench's hotpotqa and BABILong's ``splits`` at 0k: records in each dataset's own fields."""
    (root / "longbench").mkdir(parents=True)
    (root / "babilong" / "0k").mkdir(parents=True)
    longbench = [
        {
            "context": f"Passage 1:\nThe capital of Land{i} is City{i}.",
            "question": f"What is the capital of Land{i}?",
            "answers": [f"City{i}"],
            "all_classes": None,
            "length": 9,
        }
        for i in range(n)
    ]
    babilong = [
        {
            "input": f"Mary went to the hallway. John travelled to room{i}.",
            "question": "Where is John?",
            "target": f"room{i}",
        }
        for i in range(n)
    ]
    (root / "longbench" / "hotpotqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in longbench))
    for split in splits:
        (root / "babilong" / "0k" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in babilong))
    return root


class Oracle:
    """An lm-eval LM that answers from the records above (the last ``City<i>``/``room<i>`` in the prompt)."""

    def __new__(cls, wrong: bool = False):
        from lm_eval.api.model import LM

        class OracleLM(LM):
            max_length = 4096

            def generate_until(self, requests):
                answers = []
                for request in requests:
                    found = re.findall(r"(?:City|room)\d", request.args[0])
                    answers.append("nowhere" if wrong else found[-1])
                return answers

            def loglikelihood(self, requests):
                raise NotImplementedError

            def loglikelihood_rolling(self, requests):
                raise NotImplementedError

        return OracleLM()


@needs_longbench
@pytest.mark.parametrize("wrong", [False, True])
def test_local_records_reach_lm_eval_metrics(tmp_path, monkeypatch, wrong):
    """The scores come from the local files: an oracle that reads them scores 1, a wrong one 0; a group whose
    every task has its data (babilong_longctx: qa1-qa5) runs as the group, with its aggregate."""
    data = write_data(tmp_path / "data", splits=("qa1", "qa2", "qa3", "qa4", "qa5"))
    monkeypatch.setattr(lm_eval_bridge, "lm_eval_model", lambda *a, **k: Oracle(wrong))
    out = evaluate_long_context(
        tiny_model("llama"), char_tokenizer(), ["longbench_hotpotqa", "babilong_longctx"], data, tmp_path / "work"
    )
    assert out["tasks"] == ["longbench_hotpotqa", "babilong_longctx"] and out["skipped"] == {}
    results, groups = out["results"]["none"]["results"], out["results"]["none"]["groups"]
    expected = 0.0 if wrong else 1.0
    assert results["longbench_hotpotqa"]["score,none"] == groups["babilong_longctx"]["acc,none"] == expected
    assert results["babilong_qa5"]["acc,none"] == expected
    assert results["babilong_qa1"]["sample_len"] == 3  # every record of the local file, none from the hub


@needs_longbench
def test_groups_run_the_tasks_whose_data_is_here_on_each_scheme(tmp_path):
    """A tiny model end to end through lm-eval's HFLM: ``longbench`` runs its one task with data (the 20 others
    listed as skipped, with the file each would read), each scheme patched in turn."""
    data = write_data(tmp_path / "data")
    tok = byte_bpe_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok), context=256)
    out = evaluate_long_context(
        model, tok, ["longbench", "babilong_qa1"], data, tmp_path / "work", schemes=["none", "yarn:factor=2"], limit=1
    )
    assert out["tasks"] == ["longbench_hotpotqa", "babilong_qa1"]
    assert (
        len(out["skipped"]) == 20 and str(data / "longbench" / "narrativeqa") in out["skipped"]["longbench_narrativeqa"]
    )
    assert out["max_length"] == {"none": 256, "yarn:factor=2": 512}  # lm-eval reads the patched config
    for scheme in ("none", "yarn:factor=2"):
        results = out["results"][scheme]["results"]
        assert 0.0 <= results["longbench_hotpotqa"]["score,none"] <= 1.0 and results["babilong_qa1"]["sample_len"] == 1
    table = long_context_table(out)
    assert "| babilong_qa1 | acc |" in table and "- longbench_trec: no " in table
    assert not any(p.name == "longbench_narrativeqa.yaml" for p in (tmp_path / "work" / "tasks").iterdir())


@needs_ruler
def test_ruler_generates_its_offline_tasks_and_refuses_the_others(tmp_path):
    plan = plan_long_context(["ruler"], None)
    assert plan.names == list(RULER_OFFLINE) and set(plan.skipped) == set(RULER_ONLINE)
    assert plan.metadata == {"max_seq_lengths": [4096]} and plan.max_length == 4096
    with pytest.raises(hf_posenc.InvalidParameterError, match=r"niah_single_2 cannot run here: .*paul_graham_essays"):
        plan_long_context(["niah_single_2"], None)
    with pytest.raises(hf_posenc.InvalidParameterError, match="RULER reports the lengths 4096, 8192"):
        plan_long_context(["ruler"], None, ruler_lengths=[2048])
    tok = byte_bpe_tokenizer()
    out = evaluate_long_context(
        tiny_model("llama", vocab_size=len(tok)), tok, ["niah_single_1"], None, tmp_path / "work", limit=1
    )
    assert out["max_length"] == {"none": 4096}  # RULER's length, not the tiny config's 64: no prompt is cut
    assert 0.0 <= out["results"]["none"]["results"]["niah_single_1"]["4096,none"] <= 1.0


def test_bad_requests_are_refused_with_what_is_valid(tmp_path):
    data = write_data(tmp_path / "data")
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad" / "babilong" / "0k"
    bad.mkdir(parents=True)
    (bad / "qa1.jsonl").write_text(json.dumps({"input": "x", "answer": "y"}) + "\n")
    (tmp_path / "bad" / "longbench").mkdir()
    thudm = {"context": "c", "input": "q", "answers": ["a"]}  # THUDM's field names, not Xnhyacinth's
    (tmp_path / "bad" / "longbench" / "hotpotqa.jsonl").write_text(json.dumps(thudm) + "\n")
    for call, message in [
        (
            lambda: plan_long_context(["longbenc"], data),
            "Unknown lm-eval long-context task 'longbenc'.*Did you mean 'longbench'",
        ),
        (lambda: plan_long_context(["hellaswag"], data), "long-context task 'hellaswag'.*any other lm-eval task"),
        (lambda: plan_long_context(["longbench_qasper"], data), "longbench_qasper cannot run here: no .*qasper.jsonl"),
        (lambda: plan_long_context(["babilong"], tmp_path / "empty"), "No task of babilong has its data here"),
        (lambda: plan_long_context(["babilong_qa1"], tmp_path / "bad"), "records lack question, target"),
        (lambda: plan_long_context(["longbench_hotpotqa"], tmp_path / "bad"), "lack question.*rename it 'question'"),
        (lambda: plan_long_context(["babilong"], data, babilong_length="3k"), "one of 0k, 1k, 2k, 4k"),
        (lambda: plan_long_context(["babilong"], tmp_path / "nowhere"), "does not exist"),
        (lambda: plan_long_context(["babilong"], data, limit=0), "limit must be an integer >= 1"),
        (lambda: plan_long_context(["longbench_qasper"], None), "no <data>/longbench/qasper.jsonl, and no data folder"),
    ]:
        with pytest.raises(hf_posenc.InvalidParameterError, match=message):
            call()


def test_cli_lm_eval(tmp_path, capsys):
    data = write_data(tmp_path / "data")
    out = tmp_path / "out"
    args = ["eval", "tiny:llama", "--lm-eval", "babilong", "--lm-eval-data", str(data), "--lm-eval-limit", "1"]
    assert main([*args, "--schemes", "none,linear:factor=2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| babilong_qa1 | acc |" in printed and "- babilong_qa2: no " in printed
    assert set(json.loads((out / "lm_eval.json").read_text())["results"]) == {"none", "linear:factor=2"}
    assert main([*args, "--tasks", "ppl", "--out", str(out)]) == 2
    assert "drop --tasks" in capsys.readouterr().err
    assert main([*args[:-4], "--lm-eval-data", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
