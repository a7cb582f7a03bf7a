"""`make evidence-real` (experiments/evidence_real.py, issue 17) end to end on the tiny twin of its config, and
the prepared GPU script (benchmarks/gpu_evidence_real.py) at toy size on CPU."""

from __future__ import annotations

import copy
import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "evidence_real_tiny.yaml"
pytestmark = pytest.mark.end_to_end
RUNS = ("linear2-pose", "yarn2-pose", "linear2-pose-lora-only")


def experiment():
    """experiments/evidence_real.py as a module."""
    if "evidence_real" not in sys.modules:
        spec = importlib.util.spec_from_file_location("evidence_real", ROOT / "experiments" / "evidence_real.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["evidence_real"] = module
        spec.loader.exec_module(module)
    return sys.modules["evidence_real"]


def numbers(results: dict) -> dict:
    """Every evaluation number of a results.json (timings left out)."""
    drop = ("seconds",)

    def clean(entry):
        return {k: v for k, v in entry.items() if k not in drop} if entry else entry

    return {
        "zero_shot": {k: clean(v) for k, v in results["zero_shot"].items()},
        "runs": {k: (clean(r["eval"]), r["reload"], r["train"]["final_hash"]) for k, r in results["runs"].items()},
        "findings": results["findings"],
    }


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> tuple[Path, dict, str]:
    """The tiny twin run by the command its config's first line names (OUT_DIR moved to a temp folder)."""
    out = tmp_path_factory.mktemp("evidence-real-tiny")
    argv = shlex.split(CONFIG.read_text().splitlines()[0].lstrip("# "))
    assert argv[:3] == ["python", "experiments/evidence_real.py", "experiments/evidence_real_tiny.yaml"]
    proc = subprocess.run(
        [sys.executable, argv[1], argv[2], str(out), "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), proc.stdout


@pytest.fixture
def one_thread():
    """The twin's thread count (its config says 1): float sums then match the run's to the last bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_results_json_and_report(twin):
    out, results, _ = twin
    cfg = results["config"]
    assert results["command"] == CONFIG.read_text().splitlines()[0].lstrip("# ")
    assert results["complete"] and set(results["stages"].values()) == {"done"}
    retrieval_stages = [k for k in results["stages"] if k.split(":")[0] in ("zero_shot", "eval") and "ppl" not in k]
    assert retrieval_stages == [  # each fine-tuned run whole (its weights live here only), one task at a time
        "eval:passkey:linear2-pose", "eval:all:linear2-pose", "eval:passkey:yarn2-pose", "eval:all:yarn2-pose",
        "zero_shot:passkey", "zero_shot:all",
    ]  # fmt: skip
    assert results["split"]["heldout_books"] == list(range(44, 66)) and results["split"]["train_books"] == 44
    assert sorted(p.name for p in (out / "data" / "heldout").glob("*.txt"))[0] == "044.txt"
    assert list(results["zero_shot"]) == ["none", "linear:factor=2", "yarn:factor=2"]
    for entry in [*results["zero_shot"].values(), *(results["runs"][r]["eval"] for r in RUNS[:2])]:
        assert [r["length"] for r in entry["ppl"]] == [384, 768] and len(entry["ppl"][1]["position_loss"]) == 16
        for task in ("passkey", "needle"):
            assert entry[task]["lengths"] == [384, 768] and entry[task]["depths"] == [0.1, 0.5, 0.9]
            assert entry[task]["trials"] == 3 and len(entry[task]["samples"]) == 18
    ablation = results["runs"]["linear2-pose-lora-only"]
    assert "passkey" not in ablation["eval"] and not ablation["recipe"]["trainable_embeddings"]
    for name in RUNS:
        run = results["runs"][name]
        assert run["train"]["step"] == cfg["recipe"]["steps"] and run["recipe"]["pose_target_len"] == 768
        assert run["eval"]["label"].endswith("(saved)") and run["reload"]["rel_diff"] <= 1e-4
    readme = (out / "README.md").read_text()
    assert "## Fine-tune for longer context" in readme and "| PoSE YaRN x2 (+emb/norm) |" in readme
    assert "Status: complete" in readme and "| PoSE linear x2, LoRA only |" in readme
    for png in ("ppl_vs_length", "position_loss", "passkey_heatmap", "needle_heatmap", "train_loss"):
        assert (out / f"{png}.png").stat().st_size > 1000 and f"]({png}.png)" in readme


def test_findings_are_computed_from_the_numbers(twin):
    er = experiment()
    out, results, _ = twin
    assert er.findings(results) == results["findings"] and len(results["findings"]) == 8
    readme = (out / "README.md").read_text()
    for item in results["findings"]:
        assert item["held"] in (True, False) and f"- {item['text']}" in readme
        assert item["text"].startswith("**held**" if item["held"] else "**did not hold**")

    def verdict(changed: dict, start: str) -> bool | None:
        return next(f["held"] for f in er.findings(changed) if f["claim"].startswith(start))

    works = "after fine-tuning (linear2-pose)"
    linear = copy.deepcopy(results)
    entry = linear["runs"]["linear2-pose"]["eval"]
    entry["ppl"][1]["ppl"] = 1.0
    entry["passkey"]["accuracy"] = [[1.0] * 3, [1.0] * 3]
    assert verdict(linear, works) is True
    entry["ppl"][1]["ppl"] = 1e6
    assert verdict(linear, works) is False
    del linear["runs"]["linear2-pose"]["eval"]
    assert verdict(linear, works) is None  # not measured yet
    ablation = copy.deepcopy(results)
    ablation["runs"]["linear2-pose-lora-only"]["eval"]["ppl"][1]["ppl"] = 1.0
    assert verdict(ablation, "ablation") is False
    ablation["runs"]["linear2-pose-lora-only"]["eval"]["ppl"][1]["ppl"] = 1e6
    assert verdict(ablation, "ablation") is True


def test_a_partial_run_reports_what_is_pending(twin, tmp_path):
    er = experiment()
    partial = copy.deepcopy(twin[1])
    for run in partial["runs"].values():
        for key in ("train", "eval", "reload"):
            del run[key]
    partial["stages"] = {k: "done" if k in ("split", "zero_shot:ppl") else "pending" for k in partial["stages"]}
    partial["findings"] = er.findings(partial)
    er.write_report(partial, tmp_path, plots=False)
    readme = (tmp_path / "README.md").read_text()
    assert "Status: partial, pending: train:linear2-pose, " in readme and "| zero-shot: none |" in readme
    assert "**not measured yet**: after fine-tuning (linear2-pose)" in readme
    assert ".png)" not in readme and "Figures: drawn when every stage is done." in readme  # none drawn yet
    assert "| linear2-pose | linear:factor=2 | lora r=8 | True / True | 96 | 768 | 6 | \u2014 |" in readme


def test_retrieval_not_measured_is_not_a_pass(twin):
    """Perplexity in, retrieval pending: the retrieval finding at the short length says "not measured yet"."""
    er = experiment()
    claim = "nor does retrieval"
    pending = copy.deepcopy(twin[1])
    for entry in [*pending["zero_shot"].values(), *(run["eval"] for run in pending["runs"].values())]:
        for task in ("passkey", "needle"):
            entry.pop(task, None)
    found = next(f for f in er.findings(pending) if f["claim"].startswith(claim))
    assert found["held"] is None and found["text"].startswith("**not measured yet**")
    only_runs = copy.deepcopy(twin[1])  # the unpatched model measured, the fine-tuned ones not yet
    for run in only_runs["runs"].values():
        for task in ("passkey", "needle"):
            run["eval"].pop(task, None)
    assert next(f["held"] for f in er.findings(only_runs) if f["claim"].startswith(claim)) is None
    assert next(f["held"] for f in er.findings(twin[1]) if f["claim"].startswith(claim)) in (True, False)


def test_rerun_reuses_every_stage(twin, capsys):
    out, results, _ = twin
    metrics = {name: (out / "runs" / name / "metrics.jsonl").stat().st_mtime_ns for name in RUNS}
    again = experiment().run(CONFIG, out, progress=False)
    printed = capsys.readouterr().out
    assert "[run]" not in printed and printed.count("[reused]") == 17
    assert numbers(again) == numbers(results)
    assert {name: (out / "runs" / name / "metrics.jsonl").stat().st_mtime_ns for name in RUNS} == metrics


def test_rerun_from_the_checkpoints_gives_the_same_numbers(twin, capsys):
    """Everything after the last checkpoint deleted (final models, merged models, evaluations, journal): the
    rerun resumes each recipe from its checkpoint and evaluates again, to the same numbers."""
    out, results, _ = twin
    for name in RUNS:
        run = out / "runs" / name
        assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-0000004"]
        for gone in ("final", "merged"):
            shutil.rmtree(run / gone)
        (run / "summary.json").unlink()
    shutil.rmtree(out / "stages")
    (out / "journal.jsonl").unlink()
    again = experiment().run(CONFIG, out, progress=False)
    printed = capsys.readouterr().out
    assert printed.count("resumed from") == 3 and "[reused]" not in printed
    assert all(r["train"]["resumed_from"] == "checkpoint-0000004" for r in again["runs"].values())
    assert numbers(again) == numbers(results)


def test_a_fresh_checkout_takes_the_committed_journal(twin, tmp_path, capsys):
    """The report's journal (committed) seeds a new work folder: the runs retrain to the same weights, so not
    one perplexity or answer is computed again, and the numbers are the reported ones."""
    out, results, _ = twin
    report = tmp_path / "report"
    report.mkdir()
    shutil.copy2(out / "journal.jsonl", report / "journal.jsonl")
    entries = len((report / "journal.jsonl").read_text().splitlines())
    fresh = tmp_path / "out"
    again = experiment().run(CONFIG, fresh, report=report, progress=False)
    assert f"journal: {entries} entries taken from" in capsys.readouterr().out
    assert len((fresh / "journal.jsonl").read_text().splitlines()) == entries  # nothing evaluated again
    assert numbers(again) == numbers(results)
    assert (report / "journal.jsonl").read_text() == (fresh / "journal.jsonl").read_text()
    assert (report / "README.md").exists() and (report / "results.json").exists()


def test_a_fresh_checkout_carries_the_finished_runs_of_the_committed_report(twin, tmp_path, capsys):
    """Another machine retrains to other bits, so a run finished in the committed report is carried (its numbers
    kept, not retrained); a run with a stage pending there is retrained and evaluated again."""
    er = experiment()
    out, results, _ = twin
    report = tmp_path / "report"
    report.mkdir()
    shutil.copy2(out / "journal.jsonl", report / "journal.jsonl")
    committed = copy.deepcopy(results)
    committed["stages"]["eval:all:yarn2-pose"] = "pending"
    committed["runs"]["linear2-pose"]["eval"]["passkey"]["accuracy"] = [[0.5] * 3, [0.25] * 3]  # marks a carry
    (report / "results.json").write_text(json.dumps(committed))
    fresh = tmp_path / "out"
    again = er.run(CONFIG, fresh, report=report, progress=False)
    printed = capsys.readouterr().out
    assert printed.count("[carried]") == 2 and "[carried] yarn2-pose" not in printed
    assert sorted(p.name for p in (fresh / "runs").iterdir()) == ["yarn2-pose"]  # the only run trained
    assert again["runs"]["linear2-pose"]["eval"]["passkey"]["accuracy"] == [[0.5] * 3, [0.25] * 3]
    assert again["runs"]["linear2-pose"]["carried"] and "carried" not in again["runs"]["yarn2-pose"]
    assert numbers(again)["runs"]["yarn2-pose"] == numbers(results)["runs"]["yarn2-pose"]
    assert again["complete"] and "Carried from an earlier session's report" in (report / "README.md").read_text()
    assert er.carried_runs(results["config"], report, tmp_path / "elsewhere")  # the report now carries every run
    other = {**results["config"], "seed": 1}
    assert er.carried_runs(other, report, tmp_path / "elsewhere") == {}  # another config carries nothing
    assert er.carried_runs(results["config"], report, out) == {}  # the weights are here: nothing is carried


def test_retrieval_phases_add_one_task_at_a_time():
    er = experiment()
    assert er.retrieval_phases(["ppl", "passkey", "needle"]) == [
        ("passkey", ["ppl", "passkey"]), ("all", ["ppl", "passkey", "needle"])
    ]  # fmt: skip
    assert er.retrieval_phases(["needle"]) == [("all", ["needle"])] and er.retrieval_phases(["ppl"]) == []
    assert er.narrowed(["ppl"], ["ppl", "passkey"]) == [] and er.narrowed(["ppl", "needle"], ["ppl", "passkey"]) == []
    assert er.narrowed(["ppl", "needle", "passkey"], ["ppl", "passkey"]) == ["ppl", "passkey"]


def test_adapters_and_merged_models_reload_to_the_reported_numbers(twin, one_thread):
    from transformers import AutoTokenizer

    import hf_posenc
    from hf_posenc.eval import run_eval
    from hf_posenc.train import load_adapter_output

    er = experiment()
    out, results, _ = twin
    for name in RUNS:
        reported = results["runs"][name]["eval"]
        tasks = [t for t in ("ppl", "passkey", "needle") if t in reported]
        spec = er.eval_spec(results["config"], out / "data" / "heldout", ["none"], tasks)
        path = out / "runs" / name
        merged = hf_posenc.from_pretrained(str(path / "merged")).eval()
        adapter, tokenizer = load_adapter_output(path / "final")
        for model, tolerance in ((merged, 1e-9), (adapter, 1e-4)):
            got = next(iter(run_eval(model, AutoTokenizer.from_pretrained(path / "merged"), spec, progress=False)
                            ["results"].values()))  # fmt: skip
            for row, want in zip(got["ppl"], reported["ppl"], strict=True):
                assert row["ppl"] == pytest.approx(want["ppl"], rel=tolerance)
            for task in tasks[1:]:
                assert got[task]["accuracy"] == reported[task]["accuracy"]
        assert tokenizer.eos_token_id == AutoTokenizer.from_pretrained(path / "merged").eos_token_id


def test_a_run_must_name_its_zero_shot_scheme(tmp_path):
    text = CONFIG.read_text().replace('zero_shot: ["none", "linear:factor=2", "yarn:factor=2"]', 'zero_shot: ["none"]')
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ValueError, match=r"not in eval\.zero_shot"):
        experiment().load_experiment(tmp_path / "bad.yaml")


GPU_SCRIPT = ROOT / "benchmarks" / "gpu_evidence_real.py"


def gpu_toy(out: Path, work: Path) -> str:
    """The GPU script at toy size on CPU (its stdout)."""
    argv = [sys.executable, str(GPU_SCRIPT), "--toy", "--out", str(out), "--work", str(work)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_gpu_evidence_script_runs_at_toy_size_on_cpu_and_a_new_lease_runs_only_what_is_missing(tmp_path):
    out = tmp_path / "gpu.md"
    gpu_toy(out, tmp_path / "work")
    text = out.read_text()
    assert "(CPU (toy))" in text and "x4 to 1,024" in text
    for row in ("zero-shot: none", "zero-shot: yarn:factor=4", "yarn-full", "yarn-pose", "linear-full", "linear-pose"):
        assert f"| {row} |" in text
    results = json.loads(out.with_suffix(".json").read_text())
    assert {name: r["recipe"]["seq_len"] for name, r in results["runs"].items()} == {
        "yarn-full": 1024, "yarn-pose": 256, "linear-full": 1024, "linear-pose": 256,
    }  # fmt: skip
    assert all(r["eval"]["ppl"][1]["length"] == 1024 for r in results["runs"].values())
    assert len(results["findings"]) == 8 and all(f["held"] in (True, False) for f in results["findings"])
    assert (tmp_path / "gpu" / "ppl_vs_length.png").stat().st_size > 1000
    assert not results["carried"] and "Carried from" not in text

    # a new lease: a fresh machine (no work folder) and a committed report whose last run was over budget
    results["runs"]["linear-pose"] = {"skipped": True, "recipe": results["runs"]["linear-pose"]["recipe"]}
    results["runs"]["yarn-full"]["eval"]["ppl"][1]["ppl"] = 1234.5  # planted: survives only if carried
    results["zero_shot"]["none"]["ppl"][1]["ppl"] = 4321.5
    out.with_suffix(".json").write_text(json.dumps(results))
    log = gpu_toy(out, tmp_path / "new-lease")
    again = json.loads(out.with_suffix(".json").read_text())
    assert again["carried"] == ["zero-shot", "yarn-full", "yarn-pose", "linear-full"]
    assert "[carried] yarn-full" in log and "[carried] linear-pose" not in log
    assert not (tmp_path / "new-lease" / "runs" / "yarn4-full").exists()
    assert (tmp_path / "new-lease" / "runs" / "linear4-pose" / "final").is_dir()
    assert again["runs"]["yarn-full"]["eval"]["ppl"][1]["ppl"] == 1234.5
    assert again["zero_shot"]["none"]["ppl"][1]["ppl"] == 4321.5
    assert again["runs"]["linear-pose"]["eval"]["ppl"][1]["length"] == 1024
    assert "| 1234.50 |" in out.read_text() and "Carried from the earlier report" in out.read_text()

    # another report's settings carry nothing
    gpu = importlib.util.spec_from_file_location("gpu_evidence_real", GPU_SCRIPT)
    module = importlib.util.module_from_spec(gpu)
    gpu.loader.exec_module(module)
    assert module.earlier_report(out.with_suffix(".json"), again)["runs"] == again["runs"]
    other = {**again, "settings": {**again["settings"], "factor": 8}}
    assert module.earlier_report(out.with_suffix(".json"), other) == {}
    assert module.earlier_report(out.with_suffix(".json"), {**again, "device": "NVIDIA H100"}) == {}
