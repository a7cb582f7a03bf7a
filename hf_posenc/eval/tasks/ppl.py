"""``ppl``: perplexity vs. window length, with the mean loss by position in the longest window."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ...errors import InvalidParameterError
from ..data import token_stream
from ..journal import entry_key
from ..perplexity import evaluate_perplexity
from .base import EvalContext, Task, register_task


@register_task
class Perplexity(Task):
    name = "ppl"
    aliases = ("perplexity",)
    summary = "Perplexity of --max-windows windows of each --lengths length cut from the --data text"
    scoring = "exp(mean token NLL), lower is better; plus the mean loss by position in the longest window"
    source = "the sliding-window protocol (non-overlapping windows, or --stride for overlapping ones)"
    engines = ("transformers", "vllm")

    def check(self, ctx: EvalContext) -> None:
        spec = ctx.spec
        tokens = token_stream(ctx.tokenizer, ctx.texts, max(spec.lengths) * spec.max_windows + 1)
        if len(tokens) < max(spec.lengths):
            raise InvalidParameterError(
                f"The text {spec.data!r} has {len(tokens)} tokens: too few for one window of {max(spec.lengths)}. "
                "Use a longer text (--data) or shorter lengths."
            )
        ctx.shared["ppl_tokens"] = tokens
        ctx.shared["ppl_tokens_hash"] = entry_key({"tokens": list(tokens)}) if ctx.journal is not None else None

    def run(self, ctx: EvalContext) -> list[dict]:
        spec, journal = ctx.spec, ctx.journal
        if "ppl_tokens" not in ctx.shared:
            self.check(ctx)
        tokens = ctx.shared["ppl_tokens"]
        out = []
        for length in spec.lengths:
            fields = {
                "kind": "ppl", "model": ctx.weights, "scheme": ctx.label, "attn": ctx.backend,
                "tokens": ctx.shared["ppl_tokens_hash"], "length": length, "stride": spec.stride,
                "max_windows": spec.max_windows, "batch_size": spec.batch_size, **ctx.engine_fields,
            }  # fmt: skip
            done = journal.get(fields) if journal is not None else None
            if done is None:
                done = evaluate_perplexity(
                    ctx.model,
                    tokens,
                    length,
                    stride=spec.stride,
                    max_windows=spec.max_windows,
                    # vLLM scores every window of a length in one batch
                    batch_size=spec.batch_size if ctx.window_nll is None else spec.max_windows,
                    progress=ctx.progress,
                    nll_fn=ctx.window_nll,
                ).to_dict()
                if journal is not None:
                    journal.put(fields, done)
            out.append(done)
        return out

    def report_lines(self, results: dict[str, Any]) -> list[str]:
        first = next(iter(results.values()))
        lengths = [r["length"] for r in first]
        lines = ["Perplexity (lower is better)", "", "| scheme | " + " | ".join(map(str, lengths)) + " |"]
        lines.append("|---|" + "---:|" * len(lengths))
        for scheme, rows in results.items():
            lines.append(f"| {scheme} | " + " | ".join(f"{r['ppl']:.2f}" for r in rows) + " |")
        lines.append("")
        return lines

    def plot(self, results: dict[str, Any], out_dir: Path) -> list[Path]:
        import matplotlib.ticker

        from ..report import pyplot, save_figure

        plt = pyplot()
        first = next(iter(results.values()))
        fig, ax = plt.subplots(figsize=(6, 4))
        for scheme, rows in results.items():
            ax.plot([r["length"] for r in rows], [r["ppl"] for r in rows], marker="o", label=scheme)
        ax.set(
            xlabel="window length (tokens)", ylabel="perplexity (log scale)", title="Perplexity vs. evaluation length"
        )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.minorticks_off()
        ax.set_xticks([r["length"] for r in first], [str(r["length"]) for r in first])
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        written = [save_figure(fig, out_dir / "ppl_vs_length.png")]

        fig, ax = plt.subplots(figsize=(6, 4))
        for scheme, rows in results.items():
            longest = rows[-1]
            size = longest["bucket_size"]
            xs = [(i + 0.5) * size for i, v in enumerate(longest["position_loss"]) if not math.isnan(v)]
            ys = [v for v in longest["position_loss"] if not math.isnan(v)]
            ax.plot(xs, ys, label=scheme)
        ax.set(
            xlabel="position in window (tokens)",
            ylabel="mean loss (nats)",
            title=f"Loss by position at {first[-1]['length']} tokens",
        )
        ax.legend()
        fig.tight_layout()
        written.append(save_figure(fig, out_dir / "position_loss.png"))
        return written
