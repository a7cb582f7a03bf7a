"""Tables and the plot for experiments/evidence.py results (docs/evidence/README.md)."""

from __future__ import annotations

import math
from pathlib import Path


def _ppl(nll):
    return "n/a" if nll is None else f"{math.exp(nll):.2f}"


def write_report(results: dict, out: Path) -> None:
    cfg = results["config"]
    short = results["train_short"]
    length = cfg["train_short"]["length"]
    lengths = [m * length for m in cfg["train_short"]["eval_multiples"]]
    lines = [
        "# Evidence: length generalisation with hf_posenc",
        "",
        "Produced by `make evidence` (`python experiments/evidence.py experiments/evidence.yaml`); every "
        "number below is that command's output (`results.json`). Character-level models on the embedded "
        "KJV; perplexity per character on the last three books (held out from training).",
        "",
        f"## 1. Train at L = {length}, test at L..16L",
        "",
        f"Each model: {cfg['train_short']['layers']} layers, width {cfg['train_short']['width']}, "
        f"{cfg['train_short']['steps']} steps x {cfg['train_short']['batch_size']} x {length} tokens, "
        "same data, seed and budget; built from config, patched, then trained with the recipe engine.",
        "",
        "| family / scheme | " + " | ".join(str(n) for n in lengths) + " |",
        "|---|" + "---:|" * len(lengths),
    ]
    for key, entry in short.items():
        lines.append(
            f"| {key} | "
            + " | ".join(_ppl(entry["nll"][str(n)] if str(n) in entry["nll"] else entry["nll"].get(n)) for n in lengths)
            + " |"
        )
    ext = results["extend"]
    lines += [
        "",
        f"## 2. Extend the LLaMA + RoPE model from (1) to 4L = {4 * length}",
        "",
        f"Zero-shot, then {cfg['extend']['steps']} fine-tuning steps at 4L (full, and LoRA with trainable "
        "embeddings and norms). Perplexity at L and 4L; passkey accuracy at 4L.",
        "",
        "| scheme | zero-shot L | zero-shot 4L | full: L | full: 4L | full: passkey | LoRA: L | LoRA: 4L | "
        "LoRA: passkey |",
        "|---|" + "---:|" * 8,
    ]
    for spec, entry in ext.items():
        z = entry["zero_shot"]
        cells = [_ppl(z["L"]), _ppl(z["4L"])]
        for method in ("full", "lora"):
            m = entry.get(method)
            cells += [_ppl(m["L"]), _ppl(m["4L"]), f"{m['passkey_4L']:.2f}"] if m else ["", "", ""]
        lines.append(f"| {spec} | " + " | ".join(cells) + " |")
    if "real_model" in results:
        real = results["real_model"]
        lens = cfg["real_model"]["lengths"]
        lines += [
            "",
            "## 3. SmolLM2-135M (trained context 8192), zero-shot, first window of the KJV",
            "",
            "| scheme | " + " | ".join(str(n) for n in lens) + " |",
            "|---|" + "---:|" * len(lens),
        ]
        for scheme, by_len in real.items():
            lines.append(f"| {scheme} | " + " | ".join(_ppl(by_len.get(str(n), by_len.get(n))) for n in lens) + " |")
    lines += ["", "![train short, test long](train_short.png)", "", "FINDINGS", ""]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    _plot(short, lengths, out / "train_short.png")


def _plot(short: dict, lengths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = sorted({k.split("/")[0] for k in short})
    fig, axes = plt.subplots(1, len(archs), figsize=(4.2 * len(archs), 3.6), sharey=True, squeeze=False)
    for ax, arch in zip(axes[0], archs, strict=True):
        for key, entry in short.items():
            if not key.startswith(arch + "/"):
                continue
            pts = [
                (n, math.exp(v)) for n in lengths if (v := entry["nll"].get(str(n), entry["nll"].get(n))) is not None
            ]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key.split("/")[1])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.minorticks_off()
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set(title=arch, xlabel="evaluation length (tokens)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("perplexity per character (log)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
