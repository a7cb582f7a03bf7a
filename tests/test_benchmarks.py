"""The benchmark scripts run end to end at toy size (their figures come from `make bench` / a GPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.end_to_end


def test_gpu_script_runs_at_toy_size_on_cpu(tmp_path):
    out = tmp_path / "gpu.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--toy", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "| sdpa | hf_posenc | 64 |" in text and "| sdpa | native | 64 |" in text
    assert "| hf_posenc alibi sdpa | 64 |" in text and "| BLOOM alibi, sdpa vs native eager (6 heads) |" in text
    assert "| self_extend G=8, eager | 64 |" in text and "| s2_attn | 64 |" in text
    assert "Error" not in text and "| NO |" not in text


def test_evidence_script_runs_at_toy_size(tmp_path):
    import json

    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "evidence.py"),
            str(ROOT / "experiments" / "evidence_toy.yaml"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["train_short"]) == 15
    assert results["train_short"]["gpt2/learned"]["nll"]["128"] is None  # cannot run past its table
    assert results["train_short"]["llama/alibi"]["nll"]["128"] is not None
    assert (tmp_path / "train_short.png").stat().st_size > 1000 and "| llama/rope |" in (
        tmp_path / "README.md"
    ).read_text()


def test_gpu_long_training_script_runs_at_toy_size_on_cpu(tmp_path):
    out = tmp_path / "long.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_long_training.py"), "--toy", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "| plain | 128 | trains |" in text and "| kit | 128 | trains |" in text
    rows = __import__("json").loads(out.with_suffix(".json").read_text())["rows"]
    by = {(r["recipe"], r["length"]): r["loss"] for r in rows}
    assert abs(by["plain", 128] - by["kit", 128]) < 1e-4  # the same step, whichever way memory is spent
