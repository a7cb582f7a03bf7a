"""Export checked against the real serving engines (run by hand: `make export-check`; figures in docs/export.md).

Three parts, each written to docs/export/results.json as it finishes (rerun a part with --parts):
  matrix     scheme x engine on a tiny LLaMA (random weights, head_dim 64, byte-level BPE): exported as what,
             or refused because what, and the verified max |Δ log-prob| over 200 tokens (past its 64 trained).
  mistakes   what the engines compute when handed a checkpoint without hf_posenc's checks: vLLM serving a
             transformers dynamic-NTK folder, llama.cpp's own converter (convert_hf_to_gguf.py from the
             llama-cpp-python sdist) on YaRN with attention_factor and on dynamic NTK; beside the numbers of
             the export that refuses or corrects each.
  real       SmolLM2-135M (trained 8k) with yarn x2 and linear x2, exported to both engines and verified on an
             8,192-token window of the embedded corpus (fp32; llama.cpp also f16).

Needs: llama-cpp-python in this venv (make test installs it), vLLM in its own venv named by
HF_POSENC_VLLM_PYTHON (make vllm), sentencepiece for llama.cpp's converter (pip install sentencepiece).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import hf_posenc
from hf_posenc.serving import ExportRefusedError, export
from hf_posenc.serving.engines import get_engine, hf_model_logprobs
from hf_posenc.tiny import byte_bpe_tokenizer, tiny_model

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "export"
ENGINES = ("transformers", "vllm", "llama.cpp")
MATRIX = [
    ("none", None),
    ("rope:rope_theta=50000", ("rope", {"rope_theta": 50000.0})),
    ("linear:factor=2", ("linear", {"factor": 2.0})),
    ("ntk:factor=4", ("ntk", {"factor": 4.0})),
    ("yarn:factor=4", ("yarn", {"factor": 4.0})),
    ("yarn:factor=4:attention_factor=1.3", ("yarn", {"factor": 4.0, "attention_factor": 1.3})),
    ("yarn:factor=2:mscale=1.2:mscale_all_dim=0.8", ("yarn", {"factor": 2.0, "mscale": 1.2, "mscale_all_dim": 0.8})),
    ("llama3:factor=8", ("llama3", {"factor": 8.0})),
    ("dynamic_ntk:factor=2", ("dynamic_ntk", {"factor": 2.0})),
    ("longrope", ("longrope", {"short_factor": [1.0] * 32, "long_factor": [4.0] * 32, "factor": 4.0})),
    ("alibi", ("alibi", {})),
    ("sinusoidal", ("sinusoidal", {})),
    ("self_extend:group_size=4:window_size=16", ("self_extend", {"group_size": 4, "window_size": 16})),
    ("rerope:window_size=16", ("rerope", {"window_size": 16})),
]


def tiny(tokenizer, spec=None):
    """vLLM's CPU attention needs head_dim >= 32: 2 heads of 64 (1 kv head)."""
    model = tiny_model(
        "llama", vocab_size=len(tokenizer), initializer_range=0.2, hidden_size=128, num_attention_heads=2,
        num_key_value_heads=1,
    )  # fmt: skip
    if spec is not None:
        hf_posenc.patch(model, spec[0], **spec[1])
    return model


def available(engine: str) -> bool:
    try:
        get_engine(engine).require()
        return True
    except hf_posenc.InvalidParameterError:
        return False


def matrix(tokens: int = 200, engines: tuple[str, ...] = ENGINES, schemes: tuple[str, ...] = ()) -> list[dict]:
    tok = byte_bpe_tokenizer()
    rows = []
    for label, spec in MATRIX:
        if schemes and not label.startswith(schemes):
            continue
        for engine in engines:
            row = {"scheme": label, "engine": engine}
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    model = tiny(tok, spec)
                    n = tokens if engine != "vllm" else min(tokens, model.config.max_position_embeddings - 1)
                    result = export(model, tmp, engine, tokenizer=tok, verify=available(engine), verify_tokens=n)
                    row["status"] = "exported"
                    row["written"] = result.written.get("rope") or result.written.get("dtype")
                    row["verify"] = result.verify
                    row["engine_version"] = result.engine_version
                except ExportRefusedError as error:
                    row["status"], row["reason"] = "refused", str(error)
                except (RuntimeError, hf_posenc.PosencError) as error:  # recorded, not hidden
                    row["status"], row["reason"] = "failed", str(error)[-500:]
            rows.append(row)
            print(row["scheme"], engine, row["status"], (row.get("verify") or {}).get("max_abs_diff", ""), flush=True)
    return rows


def _llama_cpp_converter(folder: Path, out: Path) -> Path:
    """llama.cpp's own convert_hf_to_gguf.py (from the sdist scripts/install_llama_cpp.sh unpacked)."""
    src = next((ROOT / ".cache").glob("llama-cpp-python-*/src/vendor/llama.cpp"))
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(folder), "--outtype", "f32", "--outfile", str(out)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-2000:])
    return out, [line for line in run.stderr.splitlines() if "RoPE" in line or "rope" in line]


def mistakes(tokens: int = 200) -> list[dict]:
    """Each engine handed a checkpoint without hf_posenc's checks, vs the patched model."""
    from transformers import AutoTokenizer

    from hf_posenc.real_model import smollm2_path

    tok = AutoTokenizer.from_pretrained(smollm2_path())  # llama.cpp's converter recognises this tokenizer
    from hf_posenc.eval.data import load_texts, token_stream

    all_ids = [int(i) for i in token_stream(tok, load_texts("kjv"), tokens)[:tokens]]
    rows = []
    cases = [
        ("vllm", "dynamic_ntk:factor=2", ("dynamic_ntk", {"factor": 2.0})),  # prompts within the original 64
        (
            "llama.cpp converter",
            "yarn:factor=4:attention_factor=1.3",
            ("yarn", {"factor": 4.0, "attention_factor": 1.3}),
        ),
        ("llama.cpp converter", "dynamic_ntk:factor=2", ("dynamic_ntk", {"factor": 2.0})),
    ]
    for engine, label, spec in cases:
        if engine == "vllm" and not available("vllm"):
            continue
        model = tiny(tok, spec)
        ids = all_ids[:120] if engine == "vllm" else all_ids  # vLLM: within its max_model_len (128)
        reference = hf_model_logprobs(model, ids)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            model.save_pretrained(folder)  # the transformers folder a user would hand the engine
            tok.save_pretrained(folder)
            log = []
            if engine == "vllm":
                served = get_engine("vllm").logprobs(folder, {}, ids)
            else:
                gguf, log = _llama_cpp_converter(folder, folder / "converted.gguf")
                served = get_engine("llama.cpp").logprobs(folder, {"gguf": gguf.name}, ids)
            try:
                fixed = export(model, folder / "export", engine.split()[0], tokenizer=tok, verify=True,
                               verify_tokens=len(ids))  # fmt: skip
                answer = {
                    "export": "corrected",
                    "max_abs_diff_export": fixed.verify["max_abs_diff"],
                    "written": fixed.written.get("rope"),
                }
            except ExportRefusedError as error:
                answer = {"export": "refused", "reason": str(error)}
        diff = np.abs(served - reference)
        rows.append(
            {
                "engine": engine, "scheme": label, "tokens": len(ids), "max_abs_diff": float(diff.max()),
                "ppl_model": float(np.exp(-reference.mean())), "ppl_engine": float(np.exp(-served.mean())),
                "converter_log": log, **answer,
            }
        )  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def real(tokens: int = 8192) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_posenc.real_model import smollm2_path

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    rows = []
    for label, spec in [("yarn:factor=2", ("yarn", {"factor": 2.0})), ("linear:factor=2", ("linear", {"factor": 2.0}))]:
        for engine, dtype in [("llama.cpp", "f32"), ("llama.cpp", "f16"), ("vllm", "f32")]:
            if not available(engine):
                continue
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            hf_posenc.patch(model, spec[0], **spec[1])
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                result = export(model, tmp, engine, tokenizer=tok, dtype=dtype, verify=True, verify_tokens=tokens)
            rows.append({"scheme": label, "engine": engine, "engine_version": result.engine_version, "dtype": dtype,
                         "seconds": round(time.perf_counter() - start), **result.verify})  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def _short(reason: str) -> str:
    """The refusal's first clause, for a table cell."""
    text = reason.split(": ", 1)[-1]
    return text.split(". ")[0].replace("|", "/")


def markdown(results: dict) -> str:
    lines = [
        "# Export verified in the serving engines",
        "",
        "Generated by `make export-check` (`benchmarks/export_engines.py`) from `docs/export/results.json`; "
        f"machine: {results.get('machine', '?')}.",
        "",
    ]
    rows = results.get("matrix") or []
    if rows:
        versions = {r["engine"]: r.get("engine_version") for r in rows if r.get("engine_version")}
        lines += [
            "## Scheme x engine (tiny LLaMA, random weights, 200 tokens of the KJV, trained context 64)",
            "",
            "Each cell: exported, and the engine's max |Δ log-prob| against the patched model (verify, fp32), or "
            "why export refuses. Engines: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
            "",
            "| scheme | " + " | ".join(ENGINES) + " |",
            "|---|" + "---|" * len(ENGINES),
        ]
        for label, _ in MATRIX:
            cells = []
            for engine in ENGINES:
                row = next((r for r in rows if r["scheme"] == label and r["engine"] == engine), None)
                if row is None:
                    cells.append("")
                elif row["status"] == "refused":
                    cells.append(f"refused: {_short(row['reason'])}")
                elif row["status"] == "failed":
                    cells.append(f"FAILED: {_short(row['reason'])}")
                elif row.get("verify"):
                    cells.append(f"Δ {row['verify']['max_abs_diff']:.1e} ({row['verify']['tokens']} tokens)")
                else:
                    cells.append("exported (engine not installed: not verified)")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    rows = results.get("mistakes") or []
    if rows:
        lines += [
            "## What the engines compute from an unchecked checkpoint",
            "",
            "The patched model saved with `save_pretrained` (the transformers folder a user would hand the engine), "
            "served as the engine reads it, against the patched model; then what `export` does with the same model.",
            "",
            "| engine | scheme | tokens | max abs Δ log-prob | perplexity model / engine | export |",
            "|---|---|---:|---:|---|---|",
        ]
        for r in rows:
            answer = (
                f"corrects it: Δ {r['max_abs_diff_export']:.1e}" if r.get("export") == "corrected"
                else f"refuses: {_short(r.get('reason', ''))}"
            )  # fmt: skip
            lines.append(
                f"| {r['engine']} | {r['scheme']} | {r['tokens']} | {r['max_abs_diff']:.3g} | "
                f"{r['ppl_model']:.2f} / {r['ppl_engine']:.2f} | {answer} |"
            )
        lines.append("")
    rows = results.get("real") or []
    if rows:
        lines += [
            "## SmolLM2-135M-Instruct (trained 8,192) patched and served",
            "",
            "| scheme | engine | dtype | tokens | max abs Δ log-prob | mean abs Δ | perplexity model / engine "
            "| passed | seconds |",
            "|---|---|---|---:|---:|---:|---|---|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['scheme']} | {r['engine']} {r['engine_version']} | {r['dtype']} | {r['tokens']} | "
                f"{r['max_abs_diff']:.2e} | {r['mean_abs_diff']:.2e} | {r['ppl_model']:.4f} / {r['ppl_engine']:.4f} | "
                f"{'yes' if r['passed'] else 'no'} | {r['seconds']} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="matrix,mistakes,real")
    parser.add_argument("--real-tokens", type=int, default=8192)
    parser.add_argument("--engines", default=",".join(ENGINES), help="matrix: rerun these engines' cells only")
    parser.add_argument("--schemes", default="", help="matrix: rerun the rows whose label starts so only")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    engines = tuple(args.engines.split(","))

    def rerun_matrix() -> list[dict]:
        schemes = tuple(filter(None, args.schemes.split(",")))
        fresh = matrix(engines=engines, schemes=schemes)
        redone = {(r["scheme"], r["engine"]) for r in fresh}
        kept = [r for r in results.get("matrix", []) if (r["scheme"], r["engine"]) not in redone]
        return sorted(
            kept + fresh, key=lambda r: ([m[0] for m in MATRIX].index(r["scheme"]), ENGINES.index(r["engine"]))
        )

    parts = {"matrix": rerun_matrix, "mistakes": mistakes, "real": lambda: real(args.real_tokens)}
    for part in args.parts.split(","):
        results[part] = parts[part]()
        results["machine"] = f"{os.cpu_count()} CPU cores, torch {torch.__version__}"
        path.write_text(json.dumps(results, indent=1, default=str) + "\n")
        (ROOT / "docs" / "export.md").write_text(markdown(results))
    print(f"wrote {path} and docs/export.md")


if __name__ == "__main__":
    main()
