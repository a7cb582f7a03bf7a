"""`make evidence-real`: fine-tune SmolLM2-135M-Instruct past its trained context with the recipes (issue 17).

Stages, in this order, each resumable and skipped when its result exists (``OUT_DIR/stages/*.json``, keyed
by the config that decides it):

a. split: the corpus' held-out books (the config's ``heldout_first_book`` onwards) to ``OUT_DIR/data/heldout``,
   every other book to ``OUT_DIR/data/train``, one ``.txt`` per book (the recipe's ``data`` and the
   evaluation's ``data`` are those folders);
b. zero-shot perplexity (and per-position loss) of the base model under each scheme of ``eval.zero_shot``
   at ``eval.lengths``;
c. fine-tuning: each run of ``runs`` through ``hf_posenc.train.train`` into ``OUT_DIR/runs/<name>`` (the
   recipe's own checkpoints: an interrupted run resumes from the newest), saved as an adapter
   (``save_merged: false``), then merged into ``OUT_DIR/runs/<name>/merged`` (``hf_posenc.from_pretrained``);
d. perplexity of each merged model as saved; then the reload check: the adapter output loaded with
   ``hf_posenc.train.load_adapter_output`` scores the merged model's perplexity at the trained context;
e. the whole grid (``eval.tasks``: passkey and needle at ``eval.depths`` x ``eval.trials``): each fine-tuned
   run whole, one retrieval task at a time (``eval-passkey-<run>``, then ``eval-all-<run>`` with every task; a
   run's ``tasks`` may narrow it), then the base model zero-shot (``zero_shot-passkey``, ``zero_shot-all``);
   perplexities and the earlier tasks come back from the journal.

After each stage: ``results.json`` and ``README.md`` (setup, tables, findings computed from the numbers:
held / did not hold / not measured yet); at the end the figures: ``ppl_vs_length.png``,
``position_loss.png``, ``<task>_heatmap.png`` (the library's plots) and ``train_loss.png``.

Every evaluation goes through ``run_eval`` with one ``Journal`` (``OUT_DIR/journal.jsonl``): a perplexity
or an answer computed once is never recomputed, so an interrupted evaluation continues where it stopped.
Perplexity comes first for every model, since the retrieval grid costs most at long context on a CPU. With
``--report DIR`` the journal is copied there too, and a run starts by taking the entries of ``DIR``'s journal
that its own lacks: commit it, and a fresh checkout skips the evaluations already done (entries are keyed by
the weights, so a fine-tuned model's are reused only when its retraining gives the same weights, which holds on
one machine, not across CPUs). A run whose every stage is done in ``DIR/results.json`` (made from this same
config) is carried: a checkout without its weights keeps its numbers and does not retrain it.

    python experiments/evidence_real.py CONFIG OUT_DIR [--report DIR] [--quiet]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

import hf_posenc
from hf_posenc.corpus import load_documents
from hf_posenc.eval import EvalSpec, markdown_report, plot_results, run_eval, token_stream
from hf_posenc.eval.journal import Journal, entry_key
from hf_posenc.eval.report import pyplot, row_means, save_figure
from hf_posenc.train import TrainConfig, load_adapter_output, train
from hf_posenc.train.config import recipe_differences
from hf_posenc.train.engine import CONFIG_FILE, METRICS_FILE, latest_checkpoint, load_model_and_tokenizer

ROOT = Path(__file__).resolve().parents[1]
#: run keys that are not recipe keys
RUN_META = ("name", "label", "tasks")
RETRIEVAL = ("passkey", "needle")
#: files the report writes (copied to --report)
REPORT_FILES = ("results.json", "README.md", "journal.jsonl")


# ----------------------------------------------------------------------------------------------- config


def load_experiment(path: str | Path) -> dict:
    """The experiment config, checked: every run names a zero-shot scheme and valid recipe keys."""
    text = Path(path).read_text()
    cfg = yaml.safe_load(text)
    cfg["command"] = text.splitlines()[0].lstrip("# ").strip()
    names = [run["name"] for run in cfg["runs"]]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique, got {names}")
    for run in cfg["runs"]:
        if run["scheme"] not in cfg["eval"]["zero_shot"]:
            raise ValueError(f"run {run['name']}: scheme {run['scheme']!r} is not in eval.zero_shot (its 'before').")
        recipe(cfg, run, Path("OUT"))  # unknown or bad recipe keys fail before any work
    for key in ("linear_run", "yarn_run", "ablation_run", "ablation_of"):
        if cfg["findings"].get(key) not in (None, *names):
            raise ValueError(f"findings.{key} names no run: {cfg['findings'][key]!r}")
    return cfg


def recipe(cfg: dict, run: dict, out: Path) -> TrainConfig:
    """The run's recipe: the shared ``recipe`` keys, the run's own, and the experiment's model, data, seed."""
    keys = {**cfg["recipe"], **{k: v for k, v in run.items() if k not in RUN_META}}
    keys.update(
        model=cfg["model"],
        data=str(out / "data" / "train"),
        output_dir=str(out / "runs" / run["name"]),
        seed=cfg["seed"],
        save_merged=False,
    )
    return TrainConfig(**keys)


def base_recipe(cfg: dict, out: Path) -> TrainConfig:
    """The recipe's base model (no scheme): what the zero-shot stage evaluates and every run starts from."""
    return TrainConfig(**{**cfg["recipe"], "model": cfg["model"], "seed": cfg["seed"], "output_dir": str(out)})


def eval_spec(cfg: dict, data: str | Path, schemes: list[str], tasks: list[str] | None = None) -> EvalSpec:
    """The evaluation grid of the config (``eval``) over ``data`` for ``schemes``."""
    ev = cfg["eval"]
    return EvalSpec(
        schemes=schemes,
        tasks=list(tasks or ev["tasks"]),
        lengths=list(ev["lengths"]),
        depths=list(ev["depths"]),
        trials=ev["trials"],
        seed=cfg["seed"],
        data=str(data),
        max_windows=ev["max_windows"],
        gen_batch_size=ev.get("gen_batch_size", 1),
    )


def spec_key(spec: EvalSpec) -> dict:
    """The spec without its data path (the text enters the journal by its tokens, not where it lies)."""
    return {k: v for k, v in vars(spec).items() if k != "data"}


# ------------------------------------------------------------------------------------------------ stages


def stage(
    path: Path, key: Any, compute: Callable[[], Any], log: Callable[[str], None], timings: dict | None = None
) -> Any:
    """``compute()``'s result, stored at ``path`` under a hash of ``key``; reused while the key matches. The
    seconds the computing session spent go to ``timings[path.stem]`` (an interrupted stage's earlier
    sessions, whose work the journal kept, are not counted)."""
    digest = entry_key({"key": key})
    saved = json.loads(path.read_text()) if path.exists() else {}
    if saved.get("key") == digest:
        log(f"[reused] {path.name}")
    else:
        log(f"[run] {path.stem}")
        start = time.perf_counter()
        saved = {"key": digest, "result": compute(), "seconds": 0.0}
        saved["seconds"] = time.perf_counter() - start
        log(f"[done] {path.stem} in {saved['seconds']:.0f} s")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(saved, indent=1))
        os.replace(tmp, path)
    if timings is not None:
        timings[path.stem] = saved.get("seconds")
    return saved["result"]


def write_split(cfg: dict, out: Path, tokenizer) -> dict:
    """Held-out books and training books as folders of one ``.txt`` per book (numbered in corpus order)."""
    docs = load_documents(cfg["corpus"])
    first = cfg["heldout_first_book"]
    split = {"train": range(first), "heldout": range(first, len(docs))}
    for part, books in split.items():
        folder = out / "data" / part
        folder.mkdir(parents=True, exist_ok=True)
        for i in books:
            path = folder / f"{i:03d}.txt"
            if not path.exists() or path.read_text(encoding="utf-8") != docs[i]:
                path.write_text(docs[i], encoding="utf-8")
    count = {part: len(token_stream(tokenizer, [docs[i] for i in books], sys.maxsize)) for part, books in split.items()}
    return {
        "corpus": cfg["corpus"],
        "heldout_books": list(split["heldout"]),
        "train_books": len(split["train"]),
        "heldout_tokens": count["heldout"],
        "train_tokens": count["train"],
        "heldout_first_words": docs[first][:60],
    }


def files_hash(folder: Path) -> str:
    """A hash of the weight files in ``folder`` (what a merged model or an evaluation was made from)."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()[:32]


def stages_of(stages: dict[str, str], name: str) -> list[str]:
    """The stage names of run ``name`` (``train:<name>``, ``eval:<phase>:<name>``, ``reload:<name>``)."""
    return [stage_name for stage_name in stages if stage_name.split(":")[-1] == name]


def carried_runs(cfg: dict, report: Path | None, out: Path) -> dict[str, dict]:
    """The runs of ``report/results.json`` (the committed report) with every stage done, when that report was
    made from this very config and ``out`` lacks the run's weights: ``{name: its committed entry}``, with the
    committed timings of its stages under ``timings``. A fresh checkout (another machine: training is
    deterministic on one machine only) keeps their numbers instead of retraining; a run with a stage still
    pending is retrained, and all of its stages evaluated again from its new weights."""
    path = report / "results.json" if report is not None else None
    if path is None or not path.exists():
        return {}
    committed = json.loads(path.read_text())
    if committed.get("config") != json.loads(json.dumps(cfg)):
        return {}
    carried = {}
    for name, entry in committed["runs"].items():
        own = [committed["stages"][k] for k in stages_of(committed["stages"], name)]
        if own and set(own) == {"done"} and not (out / "runs" / name / "final").is_dir():
            suffix = f"-{name}"
            timings = {k: v for k, v in committed.get("timings", {}).items() if k.endswith(suffix)}
            carried[name] = {**entry, "timings": timings}
    return carried


def metrics_rows(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def fine_tune(cfg: TrainConfig, progress: bool, log: Callable[[str], None]) -> dict:
    """Train (or resume, or reuse a finished run whose stored recipe is this one); the run's summary."""
    run_dir = Path(cfg.output_dir)
    stored = run_dir / CONFIG_FILE
    done = (run_dir / "final").is_dir() and stored.exists()
    summary_path = run_dir / "summary.json"
    if done and not recipe_differences(yaml.safe_load(stored.read_text()), cfg) and summary_path.exists():
        log(f"[reused] {run_dir}/final")
        return json.loads(summary_path.read_text())
    resume = latest_checkpoint(run_dir)
    start = time.perf_counter()
    result = train(cfg, progress=progress)
    seconds = time.perf_counter() - start
    rows = metrics_rows(run_dir)
    summary = {
        "step": result.step,
        "train_loss": result.train_loss,
        "resumed_from": resume.name if resume is not None else None,
        "seconds_last_session": seconds,
        "tokens_per_step": cfg.batch_size * cfg.grad_accum * cfg.seq_len,
        "tokens": cfg.steps * cfg.batch_size * cfg.grad_accum * cfg.seq_len,
        "tokens_per_s": rows[-1].get("tokens_per_s") if rows else None,
        "loss_curve": [[r["step"], r["loss"]] for r in rows if "loss" in r],
        "final_hash": files_hash(Path(result.final_dir)),
    }
    summary_path.write_text(json.dumps(summary, indent=1))
    return summary


def merge(final: Path, merged: Path, source: str, log: Callable[[str], None]) -> None:
    """``merged``: the adapter output merged into the weights and saved patched (``hf_posenc.from_pretrained``
    loads it); redone when the adapter it was made from changed."""
    marker = merged / "hf_posenc_merged_from.json"
    if marker.exists() and json.loads(marker.read_text()).get("final_hash") == source:
        return
    log(f"[run] merge {final} -> {merged}")
    model, tokenizer = load_adapter_output(final)
    model = model.merge_and_unload()
    tmp = merged.with_name(f".{merged.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / marker.name).write_text(json.dumps({"final_hash": source}))
    if merged.exists():
        shutil.rmtree(merged)
    os.replace(tmp, merged)


def load_merged(merged: Path):
    """A merged run as reported: ``hf_posenc.from_pretrained`` (float32, its saved scheme) and its tokenizer."""
    from transformers import AutoTokenizer

    return hf_posenc.from_pretrained(str(merged), dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(merged)


def evaluate(model, tokenizer, spec: EvalSpec, journal: Journal, progress: bool) -> dict:
    """``run_eval`` through the journal: ``{scheme spec: entry}``, each entry with run_eval's ``label``."""
    output = run_eval(model, tokenizer, spec, progress=progress, journal=journal)
    return {
        scheme: {"label": label, **entry}
        for scheme, (label, entry) in zip(spec.schemes, output["results"].items(), strict=True)
    }


# ------------------------------------------------------------------------------------------------ numbers


def ppl_at(entry: dict | None, length: int) -> float | None:
    if not entry or "ppl" not in entry:
        return None
    return next((r["ppl"] for r in entry["ppl"] if r["length"] == length), None)


def acc_at(entry: dict | None, task: str, length: int) -> float | None:
    """Accuracy of ``task`` at ``length``, the mean over depths and trials."""
    if not entry or task not in entry:
        return None
    result = entry[task]
    return row_means(result)[result["lengths"].index(length)] if length in result["lengths"] else None


def rows(results: dict) -> dict[str, dict]:
    """Every evaluated model, labelled: the zero-shot schemes, then the fine-tuned runs."""
    out = {f"zero-shot: {s}": e for s, e in (results.get("zero_shot") or {}).items()}
    for run in results["runs"].values():
        if run.get("eval"):
            out[run["label"]] = run["eval"]
    return out


def fmt(x: float | None, digits: int = 2) -> str:
    return "\u2014" if x is None else f"{x:.{digits}f}"


def fmt_number(x: Any) -> str:
    """A finding's number: two decimals, or two significant digits when smaller than 0.01."""
    if not isinstance(x, float | int) or isinstance(x, bool):
        return fmt(x) if x is None else str(x)
    return f"{x:.1e}" if x and abs(x) < 0.01 else f"{x:.2f}"


def run_tasks(cfg: dict) -> dict[str, list[str]]:
    """Each run's evaluation tasks: its own ``tasks``, else the config's ``eval.tasks``."""
    return {r["name"]: list(r.get("tasks") or cfg["eval"]["tasks"]) for r in cfg["runs"]}


def retrieval_phases(tasks: list[str]) -> list[tuple[str, list[str]]]:
    """Stage (e) as phases ``(name, tasks)``: each adds the next retrieval task of ``tasks`` to the ones before
    (perplexity kept); the last, named ``all``, is every task."""
    retrieval = [t for t in tasks if t != "ppl"]
    return [
        ("all" if i == len(retrieval) - 1 else task, [t for t in tasks if t == "ppl" or t in retrieval[: i + 1]])
        for i, task in enumerate(retrieval)
    ]


def narrowed(wanted: list[str], phase_tasks: list[str]) -> list[str]:
    """A run's tasks within a phase's; empty when that leaves no retrieval task (nothing new to evaluate)."""
    kept = [t for t in wanted if t in phase_tasks]
    return kept if any(t != "ppl" for t in kept) else []


def findings(results: dict) -> list[dict]:
    """The issue's expected shapes, each checked against the numbers: ``{"claim", "held", "numbers",
    "text"}``, ``held`` None when a number it needs is not measured yet."""
    cfg = results["config"]
    f = cfg["findings"]
    short, long = min(cfg["eval"]["lengths"]), max(cfg["eval"]["lengths"])
    zero = results.get("zero_shot") or {}
    runs = results["runs"]
    base = zero.get("none")
    base_short, base_long = ppl_at(base, short), ppl_at(base, long)
    out: list[dict] = []

    def add(claim: str, held: bool | None, numbers: dict[str, Any]) -> None:
        shown = ", ".join(f"{k} {fmt_number(v)}" for k, v in numbers.items())
        verdict = {True: "held", False: "did not hold", None: "not measured yet"}[held]
        out.append({"claim": claim, "held": held, "numbers": numbers, "text": f"**{verdict}**: {claim} ({shown})."})

    def known(*values: float | None) -> bool:
        return all(v is not None for v in values)

    def run_scheme(name: str) -> str:
        return next(r["scheme"] for r in cfg["runs"] if r["name"] == name)

    if f.get("linear_run"):
        name = f["linear_run"]
        scheme = run_scheme(name)
        z, t = zero.get(scheme), runs[name].get("eval")
        zp, zk = ppl_at(z, long), acc_at(z, "passkey", long)
        add(
            f"zero-shot {scheme} is broken at {long}: perplexity >= {f['broken_ppl_ratio']}x the unpatched model's "
            f"at {short} and passkey <= {f['broken_passkey']}",
            (zp >= f["broken_ppl_ratio"] * base_short and zk <= f["broken_passkey"])
            if known(zp, zk, base_short)
            else None,
            {f"ppl@{long}": zp, f"unpatched ppl@{short}": base_short, f"passkey@{long}": zk},
        )
        tp, tk = ppl_at(t, long), acc_at(t, "passkey", long)
        add(
            f"after fine-tuning ({name}) {scheme} works at {long}: perplexity <= {f['working_ppl_ratio']}x the "
            f"unpatched model's at {short} and passkey >= {f['working_passkey']}",
            (tp <= f["working_ppl_ratio"] * base_short and tk >= f["working_passkey"])
            if known(tp, tk, base_short)
            else None,
            {f"ppl@{long}": tp, f"passkey@{long}": tk, f"zero-shot ppl@{long}": zp, f"zero-shot passkey@{long}": zk},
        )
    if f.get("yarn_run"):
        name = f["yarn_run"]
        scheme = run_scheme(name)
        z, t = zero.get(scheme), runs[name].get("eval")
        zp, tp = ppl_at(z, long), ppl_at(t, long)
        add(
            f"zero-shot {scheme} is a good start at {long}: perplexity below the unpatched model's there",
            zp < base_long if known(zp, base_long) else None,
            {f"ppl@{long}": zp, f"unpatched ppl@{long}": base_long},
        )
        pairs = {task: (acc_at(z, task, long), acc_at(t, task, long)) for task in RETRIEVAL}
        numbers = {f"zero-shot ppl@{long}": zp, f"fine-tuned ppl@{long}": tp}
        for task, (a, b) in pairs.items():
            numbers |= {f"zero-shot {task}@{long}": a, f"fine-tuned {task}@{long}": b}
        add(
            f"fine-tuning ({name}) improves {scheme} at {long}: lower perplexity, passkey and needle no lower",
            (tp < zp and all(b >= a for a, b in pairs.values()))
            if known(zp, tp, *(v for pair in pairs.values() for v in pair))
            else None,
            numbers,
        )
    margin = f["margin_short"]
    trained = {name: run.get("eval") for name, run in runs.items()}
    ppls = {name: ppl_at(e, short) for name, e in trained.items()}
    add(
        f"nothing gets worse at {short} by more than {margin:.0%}: every fine-tuned model's perplexity there is "
        f"<= {1 + margin:.2f}x the unpatched model's",
        all(p <= (1 + margin) * base_short for p in ppls.values()) if known(base_short, *ppls.values()) else None,
        {f"unpatched ppl@{short}": base_short, **{f"{n} ppl@{short}": p for n, p in ppls.items()}},
    )
    gap = f["retrieval_margin"]
    tasks = run_tasks(cfg)
    numbers, verdicts = {}, []
    for task in RETRIEVAL:
        before = acc_at(base, task, short)
        numbers[f"unpatched {task}@{short}"] = before
        for name, e in trained.items():
            if task not in tasks[name]:
                continue  # a run evaluated on perplexity only (the ablation)
            after = acc_at(e, task, short)
            numbers[f"{name} {task}@{short}"] = after
            verdicts.append(after >= before - gap if known(before, after) else None)
    held = None if not verdicts or None in verdicts else all(verdicts)  # nothing compared is not a pass
    add(f"nor does retrieval at {short}: passkey and needle no lower than the unpatched model's - {gap}", held, numbers)
    if f.get("ablation_run"):
        a, b = f["ablation_run"], f["ablation_of"]
        pa, pb = ppl_at(trained[a], long), ppl_at(trained[b], long)
        add(
            f"ablation (LongLoRA): LoRA without trainable embeddings and norms ({a}) ends with higher perplexity at "
            f"{long} than with them ({b})",
            pa > pb if known(pa, pb) else None,
            {f"{a} ppl@{long}": pa, f"{b} ppl@{long}": pb},
        )
    checks = {name: run.get("reload") for name, run in runs.items()}
    add(
        f"the adapters reload (hf_posenc.train.load_adapter_output) to the merged models' perplexity at {short} "
        f"(relative difference <= {f['reload_rtol']:g})",
        all(c["rel_diff"] <= f["reload_rtol"] for c in checks.values()) if all(checks.values()) else None,
        {f"{n} rel. diff": (c or {}).get("rel_diff") for n, c in checks.items()},
    )
    return out


# ------------------------------------------------------------------------------------------------ report


def summary_table(results: dict) -> list[str]:
    """The short 'fine-tune for longer context' table (one row per model)."""
    cfg = results["config"]
    short, long = min(cfg["eval"]["lengths"]), max(cfg["eval"]["lengths"])
    head = [f"ppl {short}", f"ppl {long}"] + [f"{t} {n}" for t in RETRIEVAL for n in (short, long)]
    lines = ["| model | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for label, entry in rows(results).items():
        cells = [fmt(ppl_at(entry, short)), fmt(ppl_at(entry, long))]
        cells += [fmt(acc_at(entry, t, n)) for t in RETRIEVAL for n in (short, long)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def task_sections(results: dict, out: Path, plots: bool) -> list[str]:
    """The library's tables (and plots), one task at a time over the models evaluated on it."""
    lines: list[str] = []
    for task in results["config"]["eval"]["tasks"]:
        subset = {label: {task: e[task]} for label, e in rows(results).items() if task in e}
        if subset:
            lines += [*markdown_report({"results": subset}).splitlines(), ""]
            if plots:
                plot_results({"results": subset}, out)
    return lines


def plot_training(results: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, run in results["runs"].items():
        curve = (run.get("train") or {}).get("loss_curve") or []
        if curve:
            ax.plot([s for s, _ in curve], [v for _, v in curve], marker=".", label=name)
    ax.set(xlabel="optimizer step", ylabel="training loss (nats)", title="Fine-tuning loss")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def write_report(results: dict, out: Path, *, plots: bool = True, gpu: bool = False) -> None:
    """``out/README.md`` from the results; the figures too when ``plots`` (the last write of a run); a link
    to ``gpu.md`` (benchmarks/gpu_evidence_real.py) when ``gpu``."""
    cfg = results["config"]
    split, short, long = results.get("split") or {}, min(cfg["eval"]["lengths"]), max(cfg["eval"]["lengths"])
    ev = cfg["eval"]
    machine = results["machine"]
    pending = [s for s in results["stages"] if results["stages"][s] != "done"]
    lines = [
        f"# Evidence on a real model: {cfg['model']} fine-tuned past its trained context",
        "",
        f"Produced by `{cfg['command']}`; every number below is that command's output (`results.json`), the "
        "findings included (computed from the numbers by `experiments/evidence_real.py`).",
        "",
        f"Status: {'complete' if not pending else 'partial, pending: ' + ', '.join(pending)}. Last session ran on: "
        f"{machine['device']} ({machine['threads']} torch threads), torch {machine['torch']}, transformers "
        f"{machine['transformers']}, float32.",
        "",
        *(
            [
                f"Carried from an earlier session's report (trained and evaluated there, weights not kept): {carried}.",
                "",
            ]
            if (carried := ", ".join(n for n, r in results["runs"].items() if r.get("carried")))
            else []
        ),
        "## Setup",
        "",
        f"- Data: the embedded `{split.get('corpus', cfg['corpus'])}` corpus (documents = books). Held out: books "
        f"{cfg['heldout_first_book']}..{len(load_documents(cfg['corpus'])) - 1} "
        f"(from \u201c{split.get('heldout_first_words', '')}\u2026\u201d, {split.get('heldout_tokens', '?'):,} "
        f"tokens); trained on the other {split.get('train_books', '?')} books ({split.get('train_tokens', '?'):,} "
        "tokens).",
        f"- Evaluation on the held-out books at {short} (trained context) and {long}: perplexity over "
        f"{ev['max_windows']} non-overlapping window(s) per length with the per-position loss; passkey and needle "
        f"at depths {ev['depths']} x {ev['trials']} trials per length.",
        "- Fine-tuning (`hf_posenc.train.train`; the recipe of each run is in `results.json`):",
        "",
        "| run | scheme | method | trainable embeddings / norms | window | positions span | steps | tokens | "
        "tokens/s | final loss |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run in results["runs"].items():
        r, t = run["recipe"], run.get("train") or {}
        lines.append(
            f"| {name} | {r['scheme']} | {r['method']} r={r['lora_r']} | {r['trainable_embeddings']} / "
            f"{r['trainable_norms']} | {r['seq_len']} | {r['pose_target_len'] or r['seq_len']} | {r['steps']} | "
            f"{format(t['tokens'], ',') if t else fmt(None)} | {fmt(t.get('tokens_per_s'), 0)} | "
            f"{fmt(t.get('train_loss'), 3)} |"
        )
    lines += [
        "",
        "Seconds per stage (the session that finished it; training: its last session, see `resumed_from` in "
        "`results.json`): " + ", ".join(f"{k} {fmt(v, 0)}" for k, v in results.get("timings", {}).items()) + ".",
        "",
        "## Fine-tune for longer context",
        "",
        f"Perplexity (lower is better) and retrieval accuracy (mean over {len(ev['depths'])} depths x "
        f"{ev['trials']} trials) on the held-out books; \u2014: not measured.",
        "",
        *summary_table(results),
        "",
        "## Findings (computed from the numbers)",
        "",
        *[f"- {item['text']}" for item in results.get("findings", [])],
        "",
        "## Tables",
        "",
        *task_sections(results, out, plots),
    ]
    if plots:  # drawn once every stage is done: a partial report links no figure that is not there
        lines += [
            "![perplexity vs length](ppl_vs_length.png)",
            "",
            f"![loss by position at {long}](position_loss.png)",
            "",
            "![fine-tuning loss](train_loss.png)",
            "",
            *(f"![{task} heatmap]({task}_heatmap.png)\n" for task in ev["tasks"] if task != "ppl"),
        ]
        plot_training(results, out / "train_loss.png")
    else:
        lines += ["Figures: drawn when every stage is done.", ""]
    if gpu:
        lines += ["## GPU run", "", "See [gpu.md](gpu.md) (`python benchmarks/gpu_evidence_real.py`).", ""]
    (out / "README.md").write_text("\n".join(lines).rstrip() + "\n")


def machine() -> dict:
    import transformers

    device = platform.processor() or platform.machine()
    return {
        "device": f"CPU {device}, {os.cpu_count()} cores",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_posenc": hf_posenc.__version__,
        "python": platform.python_version(),
    }


# -------------------------------------------------------------------------------------------------- main


def run(config_path: str | Path, out: Path, *, report: Path | None = None, progress: bool = True) -> dict:
    """Every stage, in order, each skipped when its result exists; the report after each one. Perplexity
    comes first for every model (zero-shot, fine-tuned, reload check), the retrieval grid last: it costs
    most, and the perplexity findings stand without it."""
    cfg = load_experiment(config_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.get("threads") or threads)
    try:
        return _run(cfg, out, report, progress)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: dict, out: Path, report: Path | None, progress: bool) -> dict:
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    out.mkdir(parents=True, exist_ok=True)
    stages = out / "stages"
    journal = Journal(out / "journal.jsonl", resume=True)
    if report is not None and (report / "journal.jsonl").exists():  # the committed one: work of earlier checkouts
        log(f"journal: {journal.absorb(report / 'journal.jsonl')} entries taken from {report / 'journal.jsonl'}")
    heldout = out / "data" / "heldout"
    tasks = run_tasks(cfg)
    phases = retrieval_phases(cfg["eval"]["tasks"])
    results: dict = {
        "command": cfg["command"],
        "config": copy.deepcopy(cfg),
        "machine": machine(),
        "timings": {},
        "stages": dict.fromkeys(
            [
                "split",
                "zero_shot:ppl",
                *(f"train:{name}" for name in tasks),
                *(f"{kind}:{name}" for name in tasks for kind in ("eval:ppl", "reload")),
                *(
                    f"eval:{phase}:{name}"
                    for name in tasks
                    for phase, phase_tasks in phases
                    if narrowed(tasks[name], phase_tasks)
                ),
                *(f"zero_shot:{phase}" for phase, _ in phases),
            ],
            "pending",
        ),
        "runs": {
            r["name"]: {"label": r.get("label", r["name"]), "recipe": recipe(cfg, r, out).to_dict()}
            for r in cfg["runs"]
        },
    }

    # runs finished in the committed report, whose weights this checkout lacks: their results, not retrained
    # (read before the first publish rewrites the report)
    carried = carried_runs(cfg, report, out)
    for name, committed in carried.items():
        results["runs"][name].update({k: committed[k] for k in ("train", "eval", "reload")}, carried=True)
        results["timings"].update(committed["timings"])
        results["stages"].update(dict.fromkeys(stages_of(results["stages"], name), "done"))
        log(
            f"[carried] {name}: every stage done in {report / 'results.json'} "
            f"(weights {committed['train']['final_hash']}, trained in an earlier checkout)"
        )

    def publish(done: str | None, plots: bool = False) -> None:
        if done is not None:
            results["stages"][done] = "done"
        results["findings"] = findings(results)
        results["complete"] = all(v == "done" for v in results["stages"].values())
        write_report(results, out, plots=plots, gpu=report is not None and (report / "gpu.md").exists())
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        if report is not None:
            report.mkdir(parents=True, exist_ok=True)
            for path in [*(out / f for f in REPORT_FILES), *out.glob("*.png")]:
                if path.exists():  # the journal appears with the first result
                    shutil.copy2(path, report / path.name)

    base_cfg = base_recipe(cfg, out)
    source = {"model": cfg["model"], "tiny": [base_cfg.tiny_context, base_cfg.tiny_width, base_cfg.tiny_layers]}
    split_key = {"corpus": cfg["corpus"], "first": cfg["heldout_first_book"], **source}
    base: dict = {}

    def base_model():
        if not base:
            base["model"], base["tokenizer"] = load_model_and_tokenizer(base_cfg)
            base["model"].eval()
        return base["model"], base["tokenizer"]

    # (a) the held-out split
    timings = results["timings"]
    results["split"] = stage(
        stages / "split.json", split_key, lambda: write_split(cfg, out, base_model()[1]), log, timings
    )
    publish("split")

    def zero_shot(phase: str, phase_tasks: list[str]) -> None:
        spec = eval_spec(cfg, heldout, cfg["eval"]["zero_shot"], phase_tasks)
        key = {"spec": spec_key(spec), **split_key}
        results["zero_shot"] = stage(
            stages / f"zero_shot-{phase}.json",
            key,
            lambda: evaluate(*base_model(), spec, journal, progress),
            log,
            timings,
        )
        publish(f"zero_shot:{phase}")

    def evaluate_run(r: dict, phase: str, phase_tasks: list[str]) -> None:
        name, entry = r["name"], results["runs"][r["name"]]
        spec = eval_spec(cfg, heldout, ["none"], phase_tasks)
        merged = out / "runs" / name / "merged"

        def compute() -> dict:
            return evaluate(*load_merged(merged), spec, journal, progress)["none"]

        key = {"spec": spec_key(spec), "weights": entry["train"]["final_hash"], **split_key}
        entry["eval"] = stage(stages / f"eval-{phase}-{name}.json", key, compute, log, timings)
        publish(f"eval:{phase}:{name}")

    # (b) zero-shot perplexity
    zero_shot("ppl", ["ppl"])
    base.clear()
    # (c) fine-tune every run (the recipe's checkpoints make each resumable); merge its adapter
    trained = [r for r in cfg["runs"] if r["name"] not in carried]
    for r in trained:
        name = r["name"]
        run_dir = out / "runs" / name
        results["runs"][name]["train"] = summary = fine_tune(recipe(cfg, r, out), progress, log)
        timings[f"train-{name}"] = summary["seconds_last_session"]
        merge(run_dir / "final", run_dir / "merged", summary["final_hash"], log)
        publish(f"train:{name}")
    # (d) perplexity of every merged run as saved; the adapter output reloads to the same perplexity
    for r in trained:
        name, entry = r["name"], results["runs"][r["name"]]
        evaluate_run(r, "ppl", ["ppl"])
        check = eval_spec(cfg, heldout, ["none"], ["ppl"])
        check.lengths = [min(check.lengths)]

        def reload_check(check=check, name=name, entry=entry) -> dict:
            model, tokenizer = load_adapter_output(out / "runs" / name / "final")
            got = ppl_at(evaluate(model, tokenizer, check, journal, progress)["none"], check.lengths[0])
            want = ppl_at(entry["eval"], check.lengths[0])
            return {"length": check.lengths[0], "adapter_ppl": got, "merged_ppl": want, "rel_diff": abs(got / want - 1)}

        key = {"spec": spec_key(check), "weights": entry["train"]["final_hash"], **split_key}
        entry["reload"] = stage(stages / f"reload-{name}.json", key, reload_check, log, timings)
        publish(f"reload:{name}")
    # (e) the retrieval grid: each fine-tuned run whole (one task at a time), then the base model. A run's weights
    # live only in this checkout (another machine retrains them to other bits), so a run finished here is carried
    # by the committed report; the base model's answers carry anywhere through the journal. Perplexity and the
    # earlier tasks come back from the journal.
    for r in trained:
        for phase, phase_tasks in phases:
            if run_phase_tasks := narrowed(tasks[r["name"]], phase_tasks):
                evaluate_run(r, phase, run_phase_tasks)
    for phase, phase_tasks in phases:
        zero_shot(phase, phase_tasks)
        base.clear()
    publish(None, plots=True)
    log(f"wrote {out / 'results.json'}" + (f" and the report to {report}" if report else ""))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("out", type=Path, help="work folder: data, runs, journal, stages and the report")
    parser.add_argument("--report", type=Path, help="also copy results.json, README.md and the figures here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    run(args.config, args.out, report=args.report, progress=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
