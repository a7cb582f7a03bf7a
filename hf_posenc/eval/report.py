"""Markdown tables, JSON and PNG plots for :func:`run_eval` results. Each task writes its own sections
(:meth:`~hf_posenc.eval.tasks.Task.report_lines`, :meth:`~hf_posenc.eval.tasks.Task.plot`); the helpers
here draw the retrieval tables and heatmaps they share, and the average of each task group (RULER)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .tasks import get_task, is_task, list_groups


def _task_names(results: dict[str, dict]) -> list[str]:
    """Every task any row holds, in the order the rows hold them (rows may differ: results merged from
    several runs)."""
    names: list[str] = []
    for entry in results.values():
        names += [name for name in entry if is_task(name) and name not in names]
    return names


def _by_scheme(results: dict[str, dict], task: str) -> dict[str, Any]:
    """``{scheme: its result for task}`` over the rows that ran ``task``."""
    return {scheme: entry[task] for scheme, entry in results.items() if task in entry}


def markdown_report(output: dict) -> str:
    results = output["results"]
    lines: list[str] = []
    names = _task_names(results)
    engine = (output.get("spec") or {}).get("engine", "transformers")
    if engine != "transformers":
        versions = sorted({str((e.get("engine") or {}).get("version")) for e in results.values()} - {"None"})
        lines += [" ".join(["Engine:", engine, *versions, "(each scheme exported for it)"]), ""]
    for name in names:
        lines += get_task(name).report_lines(_by_scheme(results, name))
    shown: list[list[str]] = []
    for group, members in list_groups().items():
        present = [n for n in names if n in members]
        if len(present) > 1 and present not in shown:
            shown.append(present)
            lines += group_lines(group, present, results)
    return "\n".join(lines).rstrip() + "\n"


def row_means(result: dict) -> list[float]:
    """A retrieval result's accuracy per length (the mean over its depths)."""
    return [sum(row) / len(row) for row in result["accuracy"]]


def trials_of(result: dict) -> int:
    """Probes per cell (results written before ``trials`` was recorded: from the sample count)."""
    cells = len(result["lengths"]) * len(result["depths"])
    return result.get("trials") or max(1, len(result.get("samples", [])) // max(1, cells))


def cell_text(accuracy: float, trials: int) -> str:
    """``2/3``: the probes answered right (partial credit summed) out of those asked."""
    return f"{round(accuracy * trials, 2):g}/{trials}"


def has_depths(result: dict) -> bool:
    return any(d is not None for d in result["depths"])


def accuracy_lines(task: str, results: dict[str, dict], scoring: str = "") -> list[str]:
    """``| scheme | length... |`` with each scheme's accuracy per length."""
    first = next(iter(results.values()))
    lengths = first["lengths"]
    if has_depths(first):
        title = f"{task} accuracy (mean over depths {first['depths']})"
    else:
        title = f"{task} accuracy ({trials_of(first)} probe(s) per length; {scoring.split(':')[0] or 'exact'})"
    lines = [title, "", "| scheme | " + " | ".join(map(str, lengths)) + " |", "|---|" + "---:|" * len(lengths)]
    for scheme, result in results.items():
        lines.append(f"| {scheme} | " + " | ".join(f"{v:.2f}" for v in row_means(result)) + " |")
    return [*lines, ""]


def heatmap_lines(task: str, scheme: str, result: dict) -> list[str]:
    """The depth x length grid of one scheme, each cell ``right/trials`` (nothing for a task without depth)."""
    if not has_depths(result):
        return []
    trials, lengths = trials_of(result), result["lengths"]
    lines = [f"{task}, {scheme}: probes right per depth (rows) and length (columns)", ""]
    lines += ["| depth | " + " | ".join(map(str, lengths)) + " |", "|---:|" + "---:|" * len(lengths)]
    for d, depth in enumerate(result["depths"]):
        cells = [cell_text(result["accuracy"][n][d], trials) for n in range(len(lengths))]
        lines.append(f"| {depth:g} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def group_lines(group: str, tasks: list[str], results: dict[str, dict]) -> list[str]:
    """The group's average per length for each scheme, then each scheme's per-task accuracy per length."""
    title = group.upper().replace("_ALL", " (all tasks)")
    results = {scheme: entry for scheme, entry in results.items() if all(t in entry for t in tasks)}
    if not results:
        return []
    lengths = results[next(iter(results))][tasks[0]]["lengths"]
    table = {scheme: {t: row_means(entry[t]) for t in tasks} for scheme, entry in results.items()}
    average = {
        s: [sum(rows[t][i] for t in tasks) / len(tasks) for i in range(len(lengths))] for s, rows in table.items()
    }
    lines = [f"{title} average over {len(tasks)} tasks ({', '.join(tasks)})", ""]
    lines += ["| scheme | " + " | ".join(map(str, lengths)) + " |", "|---|" + "---:|" * len(lengths)]
    lines += [f"| {s} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for s, row in average.items()]
    lines.append("")
    for scheme, rows in table.items():
        lines += [f"{title} per task, {scheme}", "", "| length | " + " | ".join(tasks) + " | average |"]
        lines.append("|---:|" + "---:|" * (len(tasks) + 1))
        for i, length in enumerate(lengths):
            cells = [f"{rows[t][i]:.2f}" for t in tasks] + [f"{average[scheme][i]:.2f}"]
            lines.append(f"| {length} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def write_json(output: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(output, indent=2, allow_nan=True))
    return path


def plot_results(output: dict, out_dir: str | Path) -> list[Path]:
    """Each task's plots (ppl_vs_length.png, position_loss.png, <task>_heatmap.png), as the results allow."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = output["results"]
    written: list[Path] = []
    for name in _task_names(results):
        written += get_task(name).plot(_by_scheme(results, name), out_dir)
    return written


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(task: str, results: dict[str, dict], out_dir: Path) -> list[Path]:
    """``<task>_heatmap.png``: accuracy by depth (rows) and length (columns), one panel per scheme, each
    cell labelled ``right/trials`` (nothing for a task without depth)."""
    first = next(iter(results.values()))
    if not has_depths(first):
        return []
    plt = pyplot()
    lengths, depths = first["lengths"], first["depths"]
    width, height = max(3.2, 0.8 * len(lengths) + 1.6), max(3.0, 0.4 * len(depths) + 1.6)
    fig, axes = plt.subplots(1, len(results), figsize=(width * len(results), height), squeeze=False)
    for ax, (scheme, data) in zip(axes[0], results.items(), strict=True):
        grid = [[data["accuracy"][n][d] for n in range(len(lengths))] for d in range(len(depths))]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        trials = trials_of(data)
        for d in range(len(depths)):
            for n in range(len(lengths)):
                ax.text(n, d, cell_text(grid[d][n], trials), ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set(title=scheme, xlabel="length (tokens)")
    axes[0][0].set_ylabel("depth")
    fig.suptitle(f"{task} accuracy (probes right / probes)")
    fig.tight_layout()
    return [save_figure(fig, out_dir / f"{task}_heatmap.png")]


def save_figure(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
