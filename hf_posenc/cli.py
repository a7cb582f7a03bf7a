"""``hf-posenc``: list what is supported, patch and save a checkpoint, run the demo."""

from __future__ import annotations

import argparse
import sys

from . import list_architectures, list_schemes


def _ls(_: argparse.Namespace) -> int:
    print("schemes (aliases):")
    for name, aliases in list_schemes().items():
        print(f"  {name}" + (f"  ({', '.join(aliases)})" if aliases else ""))
    print("architectures (model_type -> adapter):")
    for model_type, adapter in list_architectures().items():
        print(f"  {model_type} -> {adapter}")
    return 0


def _patch(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .api import patch
    from .specs import parse_scheme_spec

    parsed = parse_scheme_spec(args.scheme)
    if parsed is None:
        raise SystemExit("hf-posenc patch needs a scheme, e.g. yarn:factor=4")
    model = AutoModelForCausalLM.from_pretrained(args.model)
    handle = patch(model, parsed[0], **parsed[1])
    model.save_pretrained(args.out)
    try:
        AutoTokenizer.from_pretrained(args.model).save_pretrained(args.out)
    except (OSError, ValueError):
        print("note: no tokenizer found next to the model; saved the model only", file=sys.stderr)
    print(
        f"saved {args.model} patched with {handle.scheme.name} to {args.out}; load it with hf_posenc.from_pretrained()"
    )
    return 0


DTYPES = ("auto", "float32", "bfloat16", "float16")


def _load(model_name: str, device: str = "auto", dtype: str = "auto"):
    """The model (transformers' default backend: sdpa where the family has it) on ``device`` in ``dtype``;
    ``auto``: CUDA in bfloat16 when available, else CPU in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .real_model import smollm2_path

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    path = str(smollm2_path()) if model_name == "smollm2" else model_name
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    return path, model, tokenizer


def _run(model_name: str, spec, out: str, threads: int | None, plots: bool, device="auto", dtype="auto") -> int:
    from pathlib import Path

    import torch

    from .eval import markdown_report, plot_results, run_eval, write_json

    if threads:
        torch.set_num_threads(threads)
    path, model, tokenizer = _load(model_name, device, dtype)
    print(
        f"model: {path} (trained context {getattr(model.config, 'max_position_embeddings', '?')}; "
        f"{model.device}, {str(model.dtype).replace('torch.', '')}, {model.config._attn_implementation}); "
        f"text: {spec.data}; schemes: {', '.join(spec.schemes)}; tasks: {', '.join(spec.tasks)}"
    )
    output = run_eval(model, tokenizer, spec)
    output["model"] = path
    report = markdown_report(output)
    out_dir = Path(out)
    write_json(output, out_dir / "results.json")
    (out_dir / "report.md").write_text(report)
    written = plot_results(output, out_dir) if plots else []
    print()
    print(report)
    print(f"wrote {out_dir / 'results.json'}, {out_dir / 'report.md'}" + "".join(f", {p}" for p in written))
    return 0


def _csv(kind):
    return lambda text: [kind(v) for v in text.split(",") if v.strip()]


def _eval(args: argparse.Namespace) -> int:
    from .eval import EvalSpec

    spec = EvalSpec(
        schemes=args.schemes,
        tasks=args.tasks,
        lengths=args.lengths,
        retrieval_lengths=args.retrieval_lengths,
        depths=args.depths,
        trials=args.trials,
        seed=args.seed,
        data=args.data,
        stride=args.stride,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
        attn_implementation=args.attn,
    )
    return _run(args.model, spec, args.out, args.threads, not args.no_plots, args.device, args.dtype)


def _demo(args: argparse.Namespace) -> int:
    from .demo import PRESETS

    preset = PRESETS["full" if args.full else "quick"]
    return _run(args.model, preset, args.out, args.threads, True, args.device, args.dtype)


def _add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bfloat16 on CUDA, else float32")


def _finetune(args: argparse.Namespace) -> int:
    from .train import main as train_main

    return train_main([args.config, *args.overrides])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-posenc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", help="list schemes and architectures").set_defaults(func=_ls)

    p = sub.add_parser("patch", help="patch a checkpoint and save it (reload with hf_posenc.from_pretrained)")
    p.add_argument("model", help="local folder or hub id")
    p.add_argument("scheme", help="scheme spec, e.g. yarn:factor=4 or linear:factor=2")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=_patch)

    e = sub.add_parser("eval", help="perplexity vs length, passkey, needle: schemes side by side")
    e.add_argument("model", help="HF folder or hub id, or 'smollm2' for the packaged SmolLM2-135M")
    e.add_argument(
        "--schemes",
        type=lambda t: t.split(","),
        default=["none"],
        help="comma-separated scheme specs, e.g. none,linear:factor=2,yarn:factor=2",
    )
    e.add_argument("--tasks", type=lambda t: t.split(","), default=["ppl"], help="ppl,passkey,needle,multikey")
    e.add_argument("--lengths", type=_csv(int), default=[2048], help="window lengths in tokens")
    e.add_argument("--retrieval-lengths", type=_csv(int), default=None, help="lengths for passkey/needle")
    e.add_argument("--depths", type=_csv(float), default=[0.1, 0.5, 0.9], help="needle depths in [0, 1]")
    e.add_argument("--trials", type=int, default=1, help="seeded probes per (length, depth) cell")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--data", default="kjv", help="kjv (embedded), a .txt file or folder, or hf:NAME[:CFG]:SPLIT:COL")
    e.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: non-overlapping)")
    e.add_argument("--max-windows", type=int, default=1, help="windows per length")
    e.add_argument("--batch-size", type=int, default=1, help="windows per forward")
    e.add_argument("--out", default="out/eval", help="folder for results.json, report.md and plots")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    e.add_argument("--no-plots", action="store_true")
    e.add_argument(
        "--attn",
        default=None,
        choices=["eager", "sdpa", "flex_attention", "flash_attention_2"],
        help="attention backend for the patched schemes (default: the model's own)",
    )
    _add_device_args(e)
    e.set_defaults(func=_eval)

    f = sub.add_parser("finetune", help="fine-tune for longer context from a recipe YAML (+ key=value overrides)")
    f.add_argument("config", help="recipe YAML, e.g. recipes/configs/tiny/llama_yarn4_lora.yaml")
    f.add_argument("overrides", nargs="*", help="key=value overrides of recipe keys")
    f.set_defaults(func=_finetune)

    d = sub.add_parser("demo", help="SmolLM2-135M on the embedded corpus: schemes side by side")
    d.add_argument("--model", default="smollm2", help="HF folder or hub id (default: the packaged SmolLM2-135M)")
    mode = d.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="default: 3 schemes, 2k/4k, passkey at 4k (minutes)")
    mode.add_argument("--full", action="store_true", help="4 schemes, 2k-16k, passkey and needle (tens of minutes)")
    d.add_argument("--out", default="out/demo", help="folder for results.json, report.md and plots")
    d.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    _add_device_args(d)
    d.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
