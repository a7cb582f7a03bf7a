"""``hf-posenc``: list what is supported, patch and save a checkpoint, evaluate, fine-tune, run the demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import list_architectures, list_schemes
from .api import get_handle
from .errors import CheckpointNotFoundError, InvalidParameterError, PosencError


def _ls(_: argparse.Namespace) -> int:
    print("schemes (aliases):")
    for name, aliases in list_schemes().items():
        print(f"  {name}" + (f"  ({', '.join(aliases)})" if aliases else ""))
    print("architectures (model_type -> adapter):")
    for model_type, adapter in list_architectures().items():
        print(f"  {model_type} -> {adapter}")
    print("  any other model whose decoder owns a standard rotary_emb -> rotary (after a structural self-check)")
    from .families import FAMILIES

    print("families checked by the sweep (model_type: layout class; docs/families.md):")
    for model_type, row in sorted(FAMILIES.items()):
        status = f"refused: {row.refused}" if row.refused else row.layout
        print(f"  {model_type}: {status}")
    return 0


def _patch(args: argparse.Namespace) -> int:
    from .api import make_scheme, patch
    from .specs import parse_scheme_spec

    parsed = parse_scheme_spec(args.scheme)
    if parsed is None:
        raise InvalidParameterError(
            f"hf-posenc patch needs a scheme, e.g. yarn:factor=4 ({args.scheme!r} would save the model unchanged)."
        )
    make_scheme(parsed[0], **parsed[1])  # an unknown scheme or parameter fails before the model loads
    out = _output_folder(args.out, args.model)
    name, model, tokenizer = _load_for_patch(args.model)
    handle = patch(model, parsed[0], **parsed[1])
    config_file = out / "config.json"
    before = config_file.stat().st_mtime_ns if config_file.is_file() else None
    model.save_pretrained(out)
    if not config_file.is_file() or config_file.stat().st_mtime_ns == before:
        raise PosencError(f"Saving to {out} wrote no config.json: nothing was saved.")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    else:
        print("note: no tokenizer found next to the model; saved the model only", file=sys.stderr)
    print(f"saved {name} patched with {handle.scheme.name} to {out}; load it with hf_posenc.from_pretrained()")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .api import is_patched, make_scheme, patch
    from .serving import EXPORT_RECORD, export
    from .specs import parse_scheme_spec

    parsed = parse_scheme_spec(args.scheme) if args.scheme else None
    if parsed is not None:
        make_scheme(parsed[0], **parsed[1])  # an unknown scheme or parameter fails before the model loads
    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / EXPORT_RECORD).is_file())):
        raise InvalidParameterError(
            f"--out {args.out} exists and is not an earlier export (no {EXPORT_RECORD}); give a new or empty folder."
        )
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    name, model, tokenizer = _load(args.model, "cpu", "float32")
    if parsed is not None:
        if is_patched(model):
            raise InvalidParameterError(
                f"{args.model} is a checkpoint saved patched: export it as it is (omit --scheme), or export the base "
                "checkpoint with --scheme."
            )
        patch(model, parsed[0], **parsed[1])
    result = export(
        model,
        out,
        args.target,
        tokenizer=tokenizer,
        dtype=args.dtype,
        accept=args.accept,
        verify=args.verify,
        verify_text=args.verify_text,
        verify_tokens=args.verify_tokens,
    )
    print(f"exported {name} ({result.scheme}) for {result.target} {result.engine_version or '(engine not installed)'}")
    print(f"  wrote: {json.dumps(result.written)}")
    for note in result.notes:
        print(f"  note: {note}")
    if result.serve:
        print(f"  serve: {result.serve}")
    if result.verify is not None:
        v = result.verify
        print(
            f"  verified on {v['tokens']} tokens of {v['text']}: max |Δ log-prob| {v['max_abs_diff']:.2e} "
            f"(tolerance {v['tolerance']:g}), perplexity {v['ppl_model']:.4f} (model) vs {v['ppl_engine']:.4f} "
            f"({result.target})"
        )
    print(f"  record: {out / EXPORT_RECORD}")
    return 0


def _output_folder(out: str, model_name: str) -> Path:
    """``--out`` of ``patch``: a new or empty folder, or a saved model folder to overwrite."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise InvalidParameterError(f"--out {out} is an existing file; give a folder (created if missing).")
    source = Path(model_name).expanduser()
    if source.exists() and path.exists() and path.resolve() == source.resolve():
        raise InvalidParameterError(f"--out {out} is the model being patched; give another folder.")
    if path.is_dir() and any(path.iterdir()) and not (path / "config.json").is_file():
        raise InvalidParameterError(
            f"--out {out} is a folder that holds other files and no saved model; give a new or empty folder "
            "(or a previous output, which is overwritten)."
        )
    return path


def _load_for_patch(model_name: str):
    """(name, model in float32 on CPU, tokenizer or None) for ``patch``; refuses a checkpoint that is
    already patched, whose plain load would drop its saved scheme."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .record import read_record
    from .tiny import TINY_PREFIX, char_tokenizer, tiny_model

    if model_name.startswith(TINY_PREFIX):
        return model_name, tiny_model(_tiny_family(model_name)), char_tokenizer()
    path = _model_path(model_name)
    record = read_record(_load_config(path), source=path)
    if record is not None:
        raise InvalidParameterError(
            f"{model_name} is already patched ({record.label}); patch the base checkpoint it was made from, "
            "or load it with hf_posenc.from_pretrained and call hf_posenc.patch(..., replace=True)."
        )
    model = AutoModelForCausalLM.from_pretrained(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None
    return model_name, model, tokenizer


#: optional packages -> the extra that installs them (patching itself needs none of them)
OPTIONAL_PACKAGES = {
    "peft": "train",
    "accelerate": "train",
    "datasets": "eval",
    "matplotlib": "eval",
    "lm_eval": "lm-eval",
    "gguf": "demo",
}
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEBUG_HELP = "errors you can fix print one line (hf-posenc: error: ...); --debug shows the full traceback instead"


def _tiny_family(model_name: str) -> str:
    from .tiny import TINY_FAMILIES, TINY_PREFIX

    family = model_name[len(TINY_PREFIX) :]
    if family not in TINY_FAMILIES:
        raise InvalidParameterError(
            f"Unknown tiny model {model_name!r}; choose tiny:<model_type> with one of {', '.join(TINY_FAMILIES)}."
        )
    return family


def _model_path(model_name: str) -> str:
    """The folder or hub id to load: ``smollm2`` is the packaged model; a name that looks like a local
    path (starts with ``.``, ``/`` or ``~``, or exists) must be a folder holding a ``config.json``."""
    from .loading import check_local_path

    if model_name == "smollm2":
        from .real_model import smollm2_path

        return str(smollm2_path())
    path = Path(model_name).expanduser()
    if path.is_dir() and not (path / "config.json").exists() and (path / "adapter_config.json").exists():
        raise CheckpointNotFoundError(
            f"{model_name} has no config.json: it holds a LoRA adapter (an hf-posenc finetune output with "
            "save_merged: false). Load it in Python with hf_posenc.train.load_adapter_output, or fine-tune "
            "with save_merged: true."
        )
    check_local_path(model_name)  # "no such folder" / "no config.json", not the hub's "bad repo id"
    return str(path) if path.exists() else model_name


def _load_config(path: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except OSError as exc:  # an unknown hub id, no network, a broken config.json
        raise CheckpointNotFoundError(f"Cannot load {path!r}: {' '.join(str(exc).split())}") from exc


def _load(model_name: str, device: str = "auto", dtype: str = "auto", attn: str | None = None):
    """``(name, model, tokenizer)``: the model on ``device`` in ``dtype`` (``auto``: CUDA in bfloat16 when
    available, else CPU in float32). A checkpoint saved patched (its config holds an hf_posenc record)
    loads through :func:`hf_posenc.from_pretrained`, so it runs with its saved scheme (``attn``: the
    backend for it); any other with transformers' default backend (sdpa where the family has it).
    ``tiny:<model_type>`` builds a tiny random model with a character tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .loading import from_pretrained
    from .record import read_record
    from .tiny import TINY_PREFIX, char_tokenizer, tiny_model

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    torch_dtype = getattr(torch, dtype)
    if model_name.startswith(TINY_PREFIX):
        family = _tiny_family(model_name)
        model = tiny_model(family, attn="eager" if family == "bloom" else "sdpa")  # BLOOM has no sdpa of its own
        return model_name, model.to(device=device, dtype=torch_dtype).eval(), char_tokenizer()
    path = _model_path(model_name)
    record = read_record(_load_config(path), source=path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise CheckpointNotFoundError(
            f"No tokenizer loads from {path} ({' '.join(str(exc).split())}); save the model's tokenizer beside "
            "it (tokenizer.save_pretrained)."
        ) from exc
    if record is not None:
        backend = {"attn_implementation": attn} if attn else {}
        model = from_pretrained(path, dtype=torch_dtype, **backend)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    return path, model.to(device).eval(), tokenizer


def _run(
    model_name: str,
    spec,
    out: str,
    threads: int | None,
    plots: bool,
    device="auto",
    dtype="auto",
    resume: bool = False,
) -> int:
    import torch

    from .eval import markdown_report, plot_results, run_eval, write_json
    from .eval.journal import Journal

    if threads is not None:
        if threads < 1:
            raise InvalidParameterError(f"--threads must be >= 1, got {threads}.")
        torch.set_num_threads(threads)
    out_dir = Path(out).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidParameterError(f"--out {out} is an existing file; give a folder for the results.")
    path, model, tokenizer = _load(model_name, device, dtype, spec.attn_implementation)
    handle = get_handle(model)
    saved = f"; saved scheme: {_saved_label(model)}" if handle is not None else ""
    print(
        f"model: {path} (trained context {getattr(model.config, 'max_position_embeddings', '?')}; "
        f"{model.device}, {str(model.dtype).replace('torch.', '')}, {model.config._attn_implementation}{saved}); "
        f"text: {spec.data}; schemes: {', '.join(spec.schemes)}; tasks: {', '.join(spec.tasks)}"
    )
    journal = Journal(out_dir / "journal.jsonl", resume=resume)
    if resume:
        print(f"resuming: {len(journal)} finished results in {journal.path}")
    output = run_eval(model, tokenizer, spec, journal=journal)
    output["model"] = path
    report = markdown_report(output)
    write_json(output, out_dir / "results.json")
    (out_dir / "report.md").write_text(report)
    written = plot_results(output, out_dir) if plots else []
    print()
    print(report)
    print(f"wrote {out_dir / 'results.json'}, {out_dir / 'report.md'}" + "".join(f", {p}" for p in written))
    return 0


def _saved_label(model) -> str:
    from .record import read_record

    record = read_record(model.config)
    return record.label if record is not None else get_handle(model).scheme.name


def _csv(kind):
    def parse(text: str) -> list:
        return [kind(v) for v in text.split(",") if v.strip()]

    parse.__name__ = f"comma-separated {kind.__name__}"  # argparse names the type in its error
    return parse


def _tasks_help() -> str:
    """``--tasks`` help, from the task registry."""
    from .eval.tasks import list_groups, list_tasks

    groups = ", ".join(f"{group} ({len(members)} tasks)" for group, members in list_groups().items())
    return f"comma-separated tasks: {', '.join(list_tasks())}; or groups: {groups} (see docs/eval_tasks.md)"


def _eval(args: argparse.Namespace) -> int:
    from .eval import EvalSpec

    if args.lm_eval:
        return _eval_lm_eval(args)
    spec = EvalSpec(
        schemes=args.schemes,
        tasks=args.tasks if args.tasks is not None else ["ppl"],
        lengths=args.lengths,
        retrieval_lengths=args.retrieval_lengths,
        depths=args.depths,
        trials=args.trials,
        seed=args.seed,
        data=args.data,
        stride=args.stride,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        gen_batch_size=args.gen_batch_size,
        qa_data=args.qa_data,
        attn_implementation=args.attn,
        engine=args.engine,
        accept=args.accept,
    )
    device = args.device
    if spec.engine == "vllm":
        from .serving.engines import vllm_python

        vllm_python(required=True)  # before the model loads
        device = "cpu" if device == "auto" else device  # the model only feeds the export: vLLM runs it
    return _run(args.model, spec, args.out, args.threads, not args.no_plots, device, args.dtype, args.resume)


def _eval_lm_eval(args: argparse.Namespace) -> int:
    """``eval --lm-eval``: lm-eval's long-context groups on local data, each scheme in turn."""
    from .api import make_scheme
    from .eval.lm_eval_bridge import evaluate_long_context, long_context_table, plan_long_context
    from .specs import parse_scheme_spec

    if args.tasks is not None or args.engine != "transformers":
        raise InvalidParameterError(
            "--lm-eval runs lm-eval's tasks on the transformers model (lm-eval's HFLM): drop --tasks and --engine, "
            "or run them in another hf-posenc eval."
        )
    kw = dict(
        ruler_lengths=args.retrieval_lengths or [4096],
        babilong_length=args.babilong_length,
        download=args.lm_eval_download,
        limit=args.lm_eval_limit,
        max_length=args.lm_eval_max_length,
    )
    plan_long_context(args.lm_eval, args.lm_eval_data, **kw)  # refusals before the model loads
    for parsed in filter(None, map(parse_scheme_spec, args.schemes)):
        make_scheme(parsed[0], **parsed[1])
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out).expanduser()
    path, model, tokenizer = _load(args.model, args.device, args.dtype, args.attn)
    output = evaluate_long_context(
        model, tokenizer, args.lm_eval, args.lm_eval_data, out / "lm_eval_work", schemes=args.schemes,
        batch_size=args.batch_size, **kw,
    )  # fmt: skip
    output["model"] = path
    table = long_context_table(output)
    (out / "lm_eval.json").write_text(json.dumps(output, indent=2, default=str) + "\n")
    (out / "lm_eval.md").write_text(table)
    print(table)
    print(f"wrote {out / 'lm_eval.json'}, {out / 'lm_eval.md'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import PRESETS

    return _run(args.model, PRESETS[args.preset], args.out, args.threads, True, args.device, args.dtype, args.resume)


def _add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bfloat16 on CUDA, else float32")


def _finetune(args: argparse.Namespace) -> int:
    from .train import main as train_main

    return train_main([args.config, *args.overrides])


def _plan(args: argparse.Namespace) -> int:
    import json

    from .plan import GIB, PlanOptions, estimate, fitting_options, load_shape, plan_markdown

    precision = {"bf16": 2, "fp16": 2, "fp32": 4}[args.dtype]
    options = PlanOptions(
        seq_len=args.seq_len, batch_size=args.batch_size, lora=args.lora, lora_r=args.lora_r,
        trainable_embeddings=args.trainable_embeddings, trainable_norms=args.trainable_norms,
        checkpointing=not args.no_checkpointing, offload=args.offload, loss=args.loss,
        loss_chunk_size=args.loss_chunk_size, gpus=args.gpus, parallel=args.parallel, shard=not args.no_shard,
        weight_bytes=precision, activation_bytes=precision, attention=args.attention,
    )  # fmt: skip
    shape = load_shape(args.model)
    plan = estimate(shape, options)
    fits = fitting_options(shape, options, int(args.memory * GIB))
    if args.json:
        print(json.dumps({**plan.to_dict(), "fits": [p.options.label for p in fits]}, indent=2))
    else:
        print(plan_markdown(args.model, shape, plan, args.memory, fits), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-posenc", description=__doc__, epilog=DEBUG_HELP)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    # --debug is also accepted after the command; SUPPRESS keeps the subparser from resetting it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", parents=[common], help="list schemes and architectures").set_defaults(func=_ls)

    p = sub.add_parser(
        "patch", parents=[common], help="patch a checkpoint and save it (reload with hf_posenc.from_pretrained)"
    )
    p.add_argument("model", help="local folder, hub id, 'smollm2', or tiny:<model_type>")
    p.add_argument("scheme", help="scheme spec, e.g. yarn:factor=4 or linear:factor=2")
    p.add_argument("--out", required=True, help="output folder: new, empty, or a previous output (overwritten)")
    p.set_defaults(func=_patch)

    x = sub.add_parser(
        "export", parents=[common], help="write a model for a serving engine (vllm, llama.cpp), checked by running it"
    )
    x.add_argument("model", help="HF folder (saved patched or plain), hub id, 'smollm2', or tiny:<model_type>")
    x.add_argument("--target", required=True, help="transformers, vllm or llama.cpp")
    x.add_argument("--out", required=True, help="output folder: new, empty, or an earlier export (overwritten)")
    x.add_argument("--scheme", default=None, help="patch a base checkpoint first, e.g. yarn:factor=2")
    x.add_argument("--dtype", default="f32", help="f32 or f16 (bf16 for transformers/vllm); never quantised")
    x.add_argument("--accept", type=_csv(str), default=[], help="consequences accepted, e.g. longrope_long_factors")
    x.add_argument("--verify", action="store_true", help="load the export in the engine and compare log-probs")
    x.add_argument("--verify-text", default="kjv", help="text scored by --verify (as eval's --data)")
    x.add_argument("--verify-tokens", type=int, default=512, help="tokens scored by --verify")
    x.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    x.set_defaults(func=_export)

    e = sub.add_parser(
        "eval", parents=[common], help="perplexity vs length, passkey, needle, RULER: schemes side by side"
    )
    e.add_argument(
        "model",
        help="HF folder or hub id (a checkpoint saved patched runs with its saved scheme: evaluate it with "
        "--schemes none), 'smollm2' for the packaged SmolLM2-135M, or tiny:<model_type> (random tiny model)",
    )
    e.add_argument(
        "--schemes",
        type=lambda t: t.split(","),
        default=["none"],
        help="comma-separated scheme specs, e.g. none,linear:factor=2,yarn:factor=2",
    )
    e.add_argument("--tasks", type=lambda t: t.split(","), default=None, help=_tasks_help() + " (default: ppl)")
    e.add_argument("--lengths", type=_csv(int), default=[2048], help="window lengths in tokens")
    e.add_argument("--retrieval-lengths", type=_csv(int), default=None, help="lengths for the retrieval tasks")
    e.add_argument(
        "--depths", type=_csv(float), default=[0.1, 0.5, 0.9], help="needle depths in [0, 1] (tasks that have one)"
    )
    e.add_argument("--trials", type=int, default=1, help="seeded probes per (length, depth) cell")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--data", default="kjv", help="kjv (embedded), a .txt file or folder, or hf:NAME[:CFG]:SPLIT:COL")
    e.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: non-overlapping)")
    e.add_argument("--max-windows", type=int, default=1, help="windows per length")
    e.add_argument("--batch-size", type=int, default=1, help="windows per forward")
    e.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="greedy tokens generated per retrieval probe (default: the task's own: 12 for passkey/needle/multikey, "
        "RULER's budget for RULER's tasks)",
    )
    e.add_argument(
        "--gen-batch-size", type=int, default=1, help="retrieval probes generated per forward (left-padded batch)"
    )
    e.add_argument(
        "--qa-data",
        default=None,
        help="qa_1/qa_2 only: a folder holding qa_1.jsonl / qa_2.jsonl (or .json), or one such file, of "
        'records {"context" or "contexts", "question", "answers"}, or hf:NAME[:CONFIG]:SPLIT (SQuAD/HotpotQA '
        "shapes read as they are)",
    )
    e.add_argument("--out", default="out/eval", help="folder for results.json, report.md and plots")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    e.add_argument("--no-plots", action="store_true")
    e.add_argument(
        "--resume",
        action="store_true",
        help="reuse the finished results in OUT/journal.jsonl (same weights, scheme, backend and inputs); "
        "without it the journal starts empty",
    )
    e.add_argument(
        "--attn",
        default=None,
        choices=["eager", "sdpa", "flex_attention", "flash_attention_2"],
        help="attention backend for the patched schemes (default: the model's own)",
    )
    e.add_argument(
        "--engine",
        default="transformers",
        choices=["transformers", "vllm"],
        help="vllm: export each scheme for vLLM ($HF_POSENC_VLLM_PYTHON, `make vllm`) and run the retrieval tasks "
        "and ppl there (the model loads on the CPU unless --device says otherwise)",
    )
    e.add_argument(
        "--accept", type=_csv(str), default=[], help="--engine vllm: consequences accepted, as export's --accept"
    )
    e.add_argument(
        "--lm-eval",
        type=_csv(str),
        default=None,
        help="instead of --tasks: lm-eval's long-context groups or tasks (longbench, babilong, ruler, ...) on the "
        "data in --lm-eval-data (docs/eval_tasks.md); RULER's lengths: --retrieval-lengths (default 4096)",
    )
    e.add_argument("--lm-eval-data", default=None, help="folder holding longbench/<name>.jsonl, babilong/<length>/")
    e.add_argument("--lm-eval-limit", type=int, default=None, help="documents per lm-eval task (default: all)")
    e.add_argument(
        "--lm-eval-max-length",
        type=int,
        default=None,
        help="tokens lm-eval keeps of a prompt (cut on the left; default: the longest RULER length, else the config's)",
    )
    e.add_argument("--babilong-length", default="0k", help="BABILong length read: <lm-eval-data>/babilong/<it>/")
    e.add_argument(
        "--lm-eval-download", action="store_true", help="let lm-eval fetch the data not found locally (network)"
    )
    _add_device_args(e)
    e.set_defaults(func=_eval)

    f = sub.add_parser(
        "finetune", parents=[common], help="fine-tune for longer context from a recipe YAML (+ key=value overrides)"
    )
    f.add_argument("config", help="recipe YAML, e.g. recipes/configs/llama/tiny_yarn4_lora.yaml")
    f.add_argument("overrides", nargs="*", help="key=value overrides of recipe keys")
    f.set_defaults(func=_finetune)

    m = sub.add_parser(
        "plan", parents=[common], help="peak memory per device of a fine-tuning recipe, and which options make it fit"
    )
    m.add_argument("model", help="local folder, hub id, 'smollm2', or a preset: llama3-1b, llama3-8b")
    m.add_argument("--seq-len", type=int, required=True, help="tokens per sequence")
    m.add_argument("--batch-size", type=int, default=1)
    m.add_argument("--lora", action="store_true", help="LoRA on every linear layer (default: full fine-tuning)")
    m.add_argument("--lora-r", type=int, default=16)
    m.add_argument("--trainable-embeddings", action="store_true")
    m.add_argument("--trainable-norms", action="store_true")
    m.add_argument("--loss", default="plain", help="plain, chunked or fused (liger/cce)")
    m.add_argument("--loss-chunk-size", type=int, default=1024)
    m.add_argument("--no-checkpointing", action="store_true", help="keep every activation (default: checkpointing)")
    m.add_argument("--offload", action="store_true", help="checkpointed layer inputs in host memory")
    m.add_argument("--gpus", type=int, default=1)
    m.add_argument("--parallel", default="none", help="none, cp (context parallel) or sp (Ulysses) across --gpus")
    m.add_argument("--no-shard", action="store_true", help="replicate weights and optimizer (DDP) instead of FSDP")
    m.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="weights and activations")
    m.add_argument("--attention", default="sdpa", help="sdpa (memory-efficient: sdpa, flash, flex) or eager")
    m.add_argument("--memory", type=float, default=80.0, help="GiB per device to fit in (default 80)")
    m.add_argument("--json", action="store_true", help="print the plan as JSON")
    m.set_defaults(func=_plan)

    d = sub.add_parser("demo", parents=[common], help="SmolLM2-135M on the embedded corpus: schemes side by side")
    d.add_argument("--model", default="smollm2", help="HF folder or hub id (default: the packaged SmolLM2-135M)")
    mode = d.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        dest="preset",
        action="store_const",
        const="quick",
        help="the default: 3 schemes, 2k/4k, passkey at 4k (minutes)",
    )
    mode.add_argument(
        "--full",
        dest="preset",
        action="store_const",
        const="full",
        help="4 schemes, 2k-16k, passkey and needle with 3 trials per cell (about 70 min on a 2-core CPU)",
    )
    d.set_defaults(preset="quick")
    d.add_argument("--out", default="out/demo", help="folder for results.json, report.md and plots")
    d.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    d.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from OUT/journal.jsonl (see `eval --resume`)"
    )
    _add_device_args(d)
    d.set_defaults(func=_demo)
    return parser


#: what a user can cause and fix: reported in one line (``--debug`` shows the traceback)
USER_ERRORS = (PosencError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"hf-posenc: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        extra = OPTIONAL_PACKAGES.get((exc.name or "").split(".")[0])
        if extra is None or args.debug:
            raise
        print(f"hf-posenc: error: {args.command} needs {exc.name}: pip install 'hf_posenc[{extra}]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
