"""Markdown tables, JSON and PNG plots for :func:`run_eval` results."""

from __future__ import annotations

import json
import math
from pathlib import Path


def markdown_report(output: dict) -> str:
    results = output["results"]
    lines: list[str] = []
    first = next(iter(results.values()), {})
    if "ppl" in first:
        lengths = [r["length"] for r in first["ppl"]]
        lines += ["Perplexity (lower is better)", "", "| scheme | " + " | ".join(map(str, lengths)) + " |"]
        lines.append("|---|" + "---:|" * len(lengths))
        for scheme, entry in results.items():
            lines.append(f"| {scheme} | " + " | ".join(f"{r['ppl']:.2f}" for r in entry["ppl"]) + " |")
        lines.append("")
    for task in ("passkey", "needle", "multikey"):
        if task not in first:
            continue
        lengths = first[task]["lengths"]
        lines += [f"{task} accuracy (mean over depths {first[task]['depths']})", ""]
        lines.append("| scheme | " + " | ".join(map(str, lengths)) + " |")
        lines.append("|---|" + "---:|" * len(lengths))
        for scheme, entry in results.items():
            row = [sum(r) / len(r) for r in entry[task]["accuracy"]]
            lines.append(f"| {scheme} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_json(output: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(output, indent=2, allow_nan=True))
    return path


def plot_results(output: dict, out_dir: str | Path) -> list[Path]:
    """ppl_vs_length.png, position_loss.png and <task>_heatmap.png, as the results allow."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = output["results"]
    first = next(iter(results.values()), {})
    written: list[Path] = []
    if "ppl" in first:
        fig, ax = plt.subplots(figsize=(6, 4))
        for scheme, entry in results.items():
            ax.plot([r["length"] for r in entry["ppl"]], [r["ppl"] for r in entry["ppl"]], marker="o", label=scheme)
        ax.set(
            xlabel="window length (tokens)", ylabel="perplexity (log scale)", title="Perplexity vs. evaluation length"
        )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.minorticks_off()
        ax.set_xticks([r["length"] for r in first["ppl"]], [str(r["length"]) for r in first["ppl"]])
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        written.append(_save(fig, out_dir / "ppl_vs_length.png"))

        fig, ax = plt.subplots(figsize=(6, 4))
        for scheme, entry in results.items():
            longest = entry["ppl"][-1]
            size = longest["bucket_size"]
            xs = [(i + 0.5) * size for i, v in enumerate(longest["position_loss"]) if not math.isnan(v)]
            ys = [v for v in longest["position_loss"] if not math.isnan(v)]
            ax.plot(xs, ys, label=scheme)
        ax.set(
            xlabel="position in window (tokens)",
            ylabel="mean loss (nats)",
            title=f"Loss by position at {first['ppl'][-1]['length']} tokens",
        )
        ax.legend()
        fig.tight_layout()
        written.append(_save(fig, out_dir / "position_loss.png"))
    for task in ("passkey", "needle", "multikey"):
        if task not in first:
            continue
        fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3), squeeze=False)
        for ax, (scheme, entry) in zip(axes[0], results.items(), strict=True):
            data = entry[task]
            ax.imshow(data["accuracy"], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(data["depths"])), [f"{d:g}" for d in data["depths"]])
            ax.set_yticks(range(len(data["lengths"])), [str(n) for n in data["lengths"]])
            ax.set(title=scheme, xlabel="depth")
        axes[0][0].set_ylabel("length (tokens)")
        fig.suptitle(f"{task} accuracy")
        fig.tight_layout()
        written.append(_save(fig, out_dir / f"{task}_heatmap.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
