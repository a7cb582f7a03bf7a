"""`make evidence`: length generalisation, reproduced with hf_posenc's own patch, recipe and eval code.

1. Train short, test long (Press et al. 2022, Table 2): tiny models of each family trained from scratch
   at length L with each scheme, perplexity at L..16L on held-out text.
2. Extend a RoPE model: the LLaMA+RoPE model from (1) with linear / NTK / dynamic NTK / YaRN x4,
   zero-shot and after a short fine-tune (full and LoRA) at 4L; perplexity at L and 4L, passkey at 4L.
3. Real model: SmolLM2-135M at 8k and 16k tokens, zero-shot scalings, the same windows for all.

Writes docs/evidence/{results.json,README.md,*.png}. Deterministic under the config's seed (thread
scheduling can move the last digits). Run: python experiments/evidence.py experiments/evidence.yaml
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

import hf_posenc
from hf_posenc.corpus import load_documents
from hf_posenc.eval import evaluate_perplexity, run_eval, run_retrieval
from hf_posenc.eval.runner import EvalSpec
from hf_posenc.specs import parse_scheme_spec
from hf_posenc.tiny import char_tokenizer
from hf_posenc.train import load_config, train

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "evidence"  # override with a second argument


def heldout_ids() -> list[int]:
    """The last three books of the KJV: the recipes hold out the tail, so this text is never trained on."""
    return char_tokenizer()("\n\n".join(load_documents("kjv")[-3:]))["input_ids"]


def nll_at(model, ids, length: int, windows: int) -> float | None:
    try:
        return evaluate_perplexity(model, ids, length, max_windows=windows, batch_size=windows).nll
    except (hf_posenc.InvalidParameterError, IndexError):  # a learned table cannot run past its rows
        return None


def train_short(cfg: dict, seed: int, workdir: Path) -> dict:
    ids = heldout_ids()
    length = cfg["length"]
    out: dict = {}
    for arch in cfg["archs"]:
        for scheme in cfg["schemes"]:
            # a family's own encoding is trained unpatched (its saved folder then carries no patch record)
            native = {("gpt2", "learned"), ("bloom", "alibi"), ("llama", "rope")}
            spec = "none" if (arch, scheme) in native else scheme
            if scheme == "learned" and arch != "gpt2":
                spec = f"learned:max_positions={length}"
            run = workdir / f"{arch}-{scheme}"
            recipe = load_config(
                None,
                [
                    f"model=tiny:{arch}",
                    f"tiny_context={length}",
                    f"tiny_width={cfg['width']}",
                    f"tiny_layers={cfg['layers']}",
                    f"scheme={spec}",
                    "method=full",
                    f"seq_len={length}",
                    f"steps={cfg['steps']}",
                    f"batch_size={cfg['batch_size']}",
                    f"lr={cfg['lr']}",
                    "warmup_steps=20",
                    "max_tokens=2000000",
                    f"seed={seed}",
                    f"eval_every={cfg['steps']}",
                    f"save_every={cfg['steps']}",
                    f"output_dir={run}",
                ],
            )
            start = time.perf_counter()
            result = train(recipe, progress=False)
            model = hf_posenc.from_pretrained(str(result.final_dir)) if spec != "none" else _plain(result.final_dir)
            model.eval()
            curve = {m * length: nll_at(model, ids, m * length, cfg["eval_windows"]) for m in cfg["eval_multiples"]}
            out[f"{arch}/{scheme}"] = {
                "nll": curve,
                "train_loss": result.train_loss,
                "seconds": time.perf_counter() - start,
                "final_dir": str(result.final_dir),
            }
            print(arch, scheme, {k: _ppl(v) for k, v in curve.items()}, flush=True)
    return out


def _plain(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path))


def _ppl(nll: float | None) -> float | None:
    return None if nll is None else math.exp(nll)


def extend(cfg: dict, base_dir: str, length: int, seed: int, workdir: Path) -> dict:
    ids = heldout_ids()
    tok = char_tokenizer()
    haystack = ""
    target = 4 * length
    out: dict = {}
    base = _plain(base_dir).eval()
    out["rope (no scaling)"] = {"zero_shot": {"L": nll_at(base, ids, length, 4), "4L": nll_at(base, ids, target, 4)}}
    for spec in cfg["schemes"]:
        name, params = parse_scheme_spec(spec)
        entry: dict = {}
        with hf_posenc.patched(base, name, **params):
            entry["zero_shot"] = {"L": nll_at(base, ids, length, 4), "4L": nll_at(base, ids, target, 4)}
        for method in cfg["methods"]:
            recipe = load_config(
                None,
                [
                    f"model={base_dir}",
                    f"scheme={spec}",
                    f"method={method}",
                    f"seq_len={target}",
                    f"steps={cfg['steps']}",
                    f"batch_size={cfg['batch_size']}",
                    f"lr={cfg['lr']}",
                    "max_tokens=2000000",
                    f"seed={seed}",
                    f"eval_every={cfg['steps']}",
                    f"save_every={cfg['steps']}",
                    f"output_dir={workdir / (spec.split(':')[0] + '-' + method)}",
                    "trainable_embeddings=true",
                    "trainable_norms=true",
                ],
            )
            tuned = hf_posenc.from_pretrained(str(train(recipe, progress=False).final_dir)).eval()
            passkey = run_retrieval(
                "passkey",
                tuned,
                tok,
                [target],
                cfg["passkey_depths"],
                trials=cfg["passkey_trials"],
                seed=seed,
                haystack_text=haystack,
            )
            entry[method] = {
                "L": nll_at(tuned, ids, length, 4),
                "4L": nll_at(tuned, ids, target, 4),
                "passkey_4L": passkey.mean,
            }
        out[spec] = entry
        print(spec, json.dumps(entry), flush=True)
    return out


def real_model(cfg: dict) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_posenc.real_model import smollm2_path

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    spec = EvalSpec(schemes=cfg["schemes"], tasks=["ppl"], lengths=cfg["lengths"], max_windows=1)
    output = run_eval(model, AutoTokenizer.from_pretrained(path), spec, progress=False)
    return {scheme: {r["length"]: r["nll"] for r in entry["ppl"]} for scheme, entry in output["results"].items()}


def main() -> int:
    config = yaml.safe_load(Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "experiments/evidence.yaml").read_text())
    seed = config["seed"]
    torch.manual_seed(seed)
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else OUT
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"config": config}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results["train_short"] = train_short(config["train_short"], seed, work)
        llama_rope = results["train_short"]["llama/rope"]["final_dir"]
        results["extend"] = extend(config["extend"], llama_rope, config["train_short"]["length"], seed, work)
    if config.get("real_model"):
        results["real_model"] = real_model(config["real_model"])
    (out / "results.json").write_text(json.dumps(results, indent=2))
    from report import write_report  # experiments/report.py

    write_report(results, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
