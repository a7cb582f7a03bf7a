"""Bridge to EleutherAI's lm-evaluation-harness (``pip install hf_posenc[lm-eval]``).

``lm_eval_model(model, tokenizer)`` wraps an already loaded (and patched) model in lm-eval's ``HFLM``,
so any harness task sees the patched positions. ``kjv_last_word_task(folder)`` writes a small
LAMBADA-style task over the embedded corpus (predict a verse's last word) that runs offline.
``evaluate_long_context(model, tokenizer, ["longbench", "babilong", "ruler"], data_dir, work_dir)`` runs
lm-eval's long-context groups with their datasets read from a local folder (``hf-posenc eval MODEL
--lm-eval longbench,babilong --lm-eval-data DIR``; docs/eval_tasks.md).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..corpus import load_documents
from ..errors import InvalidParameterError, did_you_mean

TASK_NAME = "hf_posenc_kjv_last_word"


def lm_eval_model(model: Any, tokenizer: Any, *, batch_size: int = 1, max_length: int | None = None) -> Any:
    """An lm-eval ``HFLM`` over this model instance (patches stay in force)."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("The lm-eval bridge needs the [eval] extra: pip install 'hf_posenc[eval]'") from err
    kwargs = {"max_length": max_length} if max_length else {}
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)


def kjv_last_word_task(folder: str | Path, *, n: int = 64, seed: int = 0, context_verses: int = 20) -> str:
    """Write an lm-eval task (YAML + JSONL) to ``folder``; returns its name. Each document is
    ``context_verses`` consecutive verses with the last word of the last one held out; metrics are
    lm-eval's ``acc`` (greedy match) and ``perplexity`` of that word."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = " ".join(load_documents("kjv"))
    verses = [v.strip() for v in text.replace("?", ".").split(".") if len(v.split()) > 4]
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start = rng.randrange(len(verses) - context_verses)
        passage = ". ".join(verses[start : start + context_verses])
        context, _, target = passage.rpartition(" ")
        rows.append({"context": context, "target": target})
    data = folder / f"{TASK_NAME}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{TASK_NAME}.yaml").write_text(
        "\n".join(
            [
                f"task: {TASK_NAME}",
                "dataset_path: json",
                "dataset_kwargs:",
                "  data_files:",
                f"    test: {data.resolve()}",
                "test_split: test",
                "output_type: loglikelihood",
                'doc_to_text: "{{context}}"',
                'doc_to_target: " {{target}}"',
                "metric_list:",
                "  - metric: acc",
                "    aggregation: mean",
                "    higher_is_better: true",
                "  - metric: perplexity",
                "    aggregation: perplexity",
                "    higher_is_better: false",
            ]
        )
        + "\n"
    )
    return TASK_NAME


def evaluate_with_lm_eval(model: Any, tokenizer: Any, folder: str | Path, **task_kwargs: Any) -> dict:
    """Run the offline KJV task through lm-eval on this model; returns lm-eval's results for it."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    name = kjv_last_word_task(folder, **task_kwargs)
    results = simple_evaluate(
        model=lm_eval_model(model, tokenizer), tasks=[name], task_manager=TaskManager(include_path=str(folder))
    )
    return results["results"][name]


# --- lm-eval's long-context groups (LongBench, BABILong, RULER) on local data ---------------------------

#: lm-eval's long-context task families the bridge runs, by their folder in lm_eval/tasks
LONG_CONTEXT_FAMILIES = ("longbench", "babilong", "ruler")
#: RULER tasks lm-eval generates offline (from the model's tokenizer and wonderwords' word lists)
RULER_OFFLINE = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
_ESSAYS = "lm-eval loads Paul Graham's essays from the HF hub (baber/paul_graham_essays) and nltk's punkt_tab"
#: RULER tasks whose text lm-eval fetches at run time (no local folder replaces it)
RULER_ONLINE = {
    "niah_single_2": _ESSAYS,
    "niah_single_3": _ESSAYS,
    "niah_multikey_1": _ESSAYS,
    "niah_multiquery": _ESSAYS,
    "niah_multivalue": _ESSAYS,
    "ruler_qa_squad": "lm-eval downloads SQuAD v2 from its website (for local QA data use hf-posenc's own qa_1)",
    "ruler_qa_hotpot": "lm-eval downloads HotpotQA from its website (for local QA data use hf-posenc's own qa_2)",
}
#: the lengths lm-eval's RULER reports (its metrics are named by them)
RULER_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
#: BABILong's lengths (configs of RMT-team/babilong-1k-samples; qa6-qa20 exist at 0k only)
BABILONG_LENGTHS = ("0k", "1k", "2k", "4k", "8k", "16k", "32k", "64k", "128k")
#: the fields each family's records need (LongBench: the Xnhyacinth/LongBench names; and question where asked)
RECORD_FIELDS = {"longbench": ("context", "answers"), "babilong": ("input", "question", "target")}


@dataclass
class LongContextPlan:
    """What :func:`evaluate_long_context` asks lm-eval for: ``names`` (groups whose every task has its data,
    and single tasks), ``overrides`` (task -> the config keys that point it at its local file), ``skipped``
    (task of a requested group -> why it cannot run here), ``metadata`` (for lm-eval's TaskManager)."""

    names: list[str]
    overrides: dict[str, dict[str, Any]]
    skipped: dict[str, str]
    metadata: dict[str, Any]
    max_length: int | None


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise InvalidParameterError(
            "The lm-eval bridge needs the [lm-eval] extra: pip install 'hf_posenc[lm-eval]'"
        ) from err


def _family_dirs() -> list[str]:
    """lm-eval's own task folders of the long-context families (a TaskManager over them alone is built in
    a fraction of a second; over all of lm-eval's tasks, in about ten)."""
    import lm_eval.tasks

    return [str(Path(lm_eval.tasks.__file__).parent / family) for family in LONG_CONTEXT_FAMILIES]


@functools.cache
def _index() -> dict[str, Any]:
    """The tasks, groups and tags of lm-eval's long-context families."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False, include_path=_family_dirs()).task_index


def _family(entry: Any) -> str | None:
    path = getattr(entry, "yaml_path", None)
    return path.parent.name if path is not None and path.parent.name in LONG_CONTEXT_FAMILIES else None


def _leaves(index: dict[str, Any], name: str) -> list[str]:
    """The single tasks under a group, a tag or a task name (in lm-eval's order)."""
    from lm_eval.tasks._index import Kind

    entry = index[name]
    if entry.kind == Kind.TAG:
        return sorted(entry.tags)
    if entry.kind != Kind.GROUP:
        return [name]
    out: list[str] = []
    for member in entry.cfg.get("task", []):
        member = member if isinstance(member, str) else member.get("task") or member.get("group")
        out += [leaf for leaf in _leaves(index, member) if leaf not in out]
    return out


def _data_file(folder: Path, stem: str) -> Path | None:
    return next((p for p in (folder / f"{stem}.jsonl", folder / f"{stem}.json") if p.is_file()), None)


def _check_records(path: Path, fields: tuple[str, ...]) -> None:
    """The first record of ``path`` has every field the task's template and metric read."""
    with path.open() as handle:
        first = handle.readline() if path.suffix == ".jsonl" else handle.read()
    try:
        record = json.loads(first)
        record = record[0] if isinstance(record, list) else record
    except (json.JSONDecodeError, IndexError, KeyError) as err:
        raise InvalidParameterError(f"{path}: not JSON lines (or a JSON list) of records ({err}).") from err
    missing = [f for f in fields if f not in record]
    if missing:
        hint = " (THUDM/LongBench names the question 'input': rename it 'question')" if "input" in record else ""
        raise InvalidParameterError(
            f"{path}: records lack {', '.join(missing)}; this task reads {', '.join(fields)}{hint}."
        )


def plan_long_context(
    tasks: list[str],
    data_dir: str | Path | None,
    *,
    ruler_lengths: tuple[int, ...] | list[int] = (4096,),
    babilong_length: str = "0k",
    tokenizer_dir: str | Path | None = None,
    max_length: int | None = None,
    download: bool = False,
    limit: int | None = None,
) -> LongContextPlan:
    """Check ``tasks`` (lm-eval group or task names of LongBench, BABILong, RULER) against the local data
    before any model loads; every refusal names what is valid. ``download=True`` lets lm-eval fetch what is
    not local (needs the network)."""
    for name, value in (("limit", limit), ("max_length", max_length)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise InvalidParameterError(f"{name} must be an integer >= 1 (or None), got {value!r}.")
    _require_lm_eval()
    from lm_eval.tasks._yaml_loader import load_yaml

    index = _index()
    data = Path(data_dir).expanduser() if data_dir is not None else None
    if data is not None and not data.is_dir():
        raise InvalidParameterError(
            f"The lm-eval data folder {data} does not exist; give the folder that holds longbench/, babilong/."
        )
    if babilong_length not in BABILONG_LENGTHS:
        raise InvalidParameterError(
            f"babilong_length must be one of {', '.join(BABILONG_LENGTHS)}, got {babilong_length!r}."
        )
    bad = [n for n in ruler_lengths if n not in RULER_LENGTHS]
    if bad or not ruler_lengths:
        raise InvalidParameterError(
            f"lm-eval's RULER reports the lengths {', '.join(map(str, RULER_LENGTHS))}; got {list(ruler_lengths)}."
        )
    names, overrides, skipped = [], {}, {}
    for name in filter(None, (t.strip() for t in tasks)):
        if name not in index:
            raise InvalidParameterError(
                f"Unknown lm-eval long-context task {name!r}: the bridge runs the groups "
                f"{', '.join(LONG_CONTEXT_FAMILIES)}, their subgroups and tasks (any other lm-eval task: "
                "lm_eval_model(model, tokenizer))." + did_you_mean(name, index)
            )
        leaves = _leaves(index, name)
        why: dict[str, str] = {}
        for leaf in leaves:
            entry = index[leaf]
            family = _family(entry)
            if family == "ruler":
                if leaf in RULER_ONLINE and not download:
                    why[leaf] = RULER_ONLINE[leaf]
                continue
            cfg = load_yaml(entry.yaml_path, resolve_func=False)
            folder = (data / family) if data is not None else None
            stem = cfg.get("dataset_name") if family == "longbench" else cfg["test_split"]
            if family == "babilong" and folder is not None:
                folder = folder / babilong_length
            found = _data_file(folder, stem) if folder is not None else None
            if found is None:
                if not download:
                    where = (
                        f"{folder / stem}.jsonl"
                        if folder
                        else f"<data>/{family}/{stem}.jsonl, and no data folder given"
                    )
                    why[leaf] = f"no {where}"
                continue
            asks = ("question",) if "{{question" in str(cfg.get("doc_to_text")) else ()  # LongBench: 25 of 34
            _check_records(found, (*RECORD_FIELDS[family], *(asks if family == "longbench" else ())))
            overrides[leaf] = {
                "include": str(entry.yaml_path),
                "task": leaf,
                "custom_dataset": None,
                "dataset_path": "json",
                "dataset_name": None,
                "dataset_kwargs": {"data_files": {cfg["test_split"]: str(found.resolve())}},
            }
        ran = [leaf for leaf in leaves if leaf not in why]
        if name in leaves and why:  # a single task asked for by name must run
            raise InvalidParameterError(f"{name} cannot run here: {why[name]}.")
        if not ran:
            raise InvalidParameterError(
                f"No task of {name} has its data here: "
                + "; ".join(f"{k}: {v}" for k, v in list(why.items())[:6])
                + "."
            )
        names += [name] if not why else [leaf for leaf in ran if leaf not in names]
        skipped.update(why)
    metadata: dict[str, Any] = {}
    if any(_family(index[leaf]) == "ruler" for n in names for leaf in _leaves(index, n)):
        if importlib.util.find_spec("wonderwords") is None:
            raise InvalidParameterError(
                "lm-eval's RULER generates its data with wonderwords and nltk: pip install 'lm_eval[ruler]'."
            )
        metadata = {"max_seq_lengths": sorted(ruler_lengths)}
        if tokenizer_dir is not None:  # RULER sizes its prompts with the model's tokenizer, saved there
            metadata["tokenizer"] = str(tokenizer_dir)
        max_length = max_length or max(ruler_lengths)
    return LongContextPlan(names, overrides, skipped, metadata, max_length)


def _write_overrides(plan: LongContextPlan, folder: Path) -> None:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    for name, override in plan.overrides.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(override, sort_keys=False))


def evaluate_long_context(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    data_dir: str | Path | None,
    work_dir: str | Path,
    *,
    schemes: list[str] | tuple[str, ...] = ("none",),
    limit: int | None = None,
    ruler_lengths: tuple[int, ...] | list[int] = (4096,),
    babilong_length: str = "0k",
    max_length: int | None = None,
    batch_size: int = 1,
    download: bool = False,
) -> dict:
    """Run lm-eval's long-context ``tasks`` (``longbench``, ``babilong``, ``ruler``, their subgroups or
    single tasks) on ``model`` patched with each of ``schemes`` in turn, reading LongBench and BABILong from
    ``data_dir`` (``longbench/<dataset_name>.jsonl``, ``babilong/<babilong_length>/<qaN>.jsonl``) instead of
    the HF hub; RULER's offline tasks are generated at ``ruler_lengths`` with the model's tokenizer. The
    tasks of a requested group without local data are skipped (listed in ``skipped``); the group's own
    aggregate is reported only when all its tasks ran. ``work_dir`` receives the task overrides, the
    tokenizer RULER reads, and the datasets cache. ``max_length`` (default: ``max(ruler_lengths)`` with RULER,
    else what lm-eval reads from the model's config) is where lm-eval cuts longer prompts on the left.
    Returns ``{"tasks", "skipped", "limit", "max_length": {scheme: n}, "results": {scheme: {"results": ...,
    "groups": ...}}}`` (lm-eval's per-task and per-group metrics)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from ..api import get_handle, make_scheme, patched
    from ..record import read_record
    from ..specs import format_scheme_spec, parse_scheme_spec

    work = Path(work_dir)
    parsed = [parse_scheme_spec(s) for s in schemes]
    for name_params in filter(None, parsed):
        make_scheme(name_params[0], **name_params[1])  # an unknown scheme fails before lm-eval runs
    own = "none"
    if get_handle(model) is not None:  # a checkpoint saved patched runs as saved
        record = read_record(model.config)
        own = f"{record.label if record is not None else get_handle(model).scheme.name} (saved)"
        if any(parsed):
            raise InvalidParameterError(
                f"The model is already patched ({own}): evaluate it with schemes=['none'], or evaluate its base "
                f"checkpoint to compare schemes (got {list(schemes)})."
            )
    tokenizer_dir = work / "tokenizer"
    plan = plan_long_context(
        tasks, data_dir, ruler_lengths=ruler_lengths, babilong_length=babilong_length,
        tokenizer_dir=tokenizer_dir, max_length=max_length, download=download, limit=limit,
    )  # fmt: skip
    if plan.metadata:
        tokenizer.save_pretrained(tokenizer_dir)
    for override in plan.overrides.values():
        override["dataset_kwargs"]["cache_dir"] = str(work / "datasets_cache")
    _write_overrides(plan, work / "tasks")
    folders = [*_family_dirs(), str(work / "tasks")]  # the overrides last: they replace lm-eval's tasks
    manager = TaskManager(include_defaults=False, include_path=folders, metadata=plan.metadata or None)
    out: dict[str, Any] = {"tasks": plan.names, "skipped": plan.skipped, "limit": limit}
    out.update(max_length={}, results={})
    for name_params in parsed:
        label = format_scheme_spec(name_params) if name_params is not None else own
        scope = patched(model, name_params[0], **name_params[1]) if name_params else contextlib.nullcontext()
        with scope:
            lm = lm_eval_model(model, tokenizer, batch_size=batch_size, max_length=plan.max_length)
            out["max_length"][label] = lm.max_length  # prompts longer than it are cut on the left by lm-eval
            evaluated = simple_evaluate(
                model=lm, tasks=plan.names, task_manager=manager, limit=limit, log_samples=False
            )
        out["results"][label] = {"results": evaluated["results"], "groups": evaluated.get("groups", {})}
    return out


def long_context_table(output: dict) -> str:
    """A markdown table of :func:`evaluate_long_context`'s metrics: one row per task (or group) and
    metric, one column per scheme; then the skipped tasks."""
    schemes = list(output["results"])
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for scheme, result in output["results"].items():
        for task, metrics in {**result["results"], **result["groups"]}.items():
            for key, value in metrics.items():
                metric, _, _ = key.partition(",")
                if isinstance(value, (int, float)) and not metric.endswith("_stderr") and metric != "sample_len":
                    if metric.isdigit() and value == -1:
                        continue  # RULER's placeholder for a length not asked
                    rows.setdefault((task, metric), {})[scheme] = value
    lines = [
        f"lm-evaluation-harness (limit {output['limit']}; prompts cut on the left at max_length)",
        "",
        "| task | metric | " + " | ".join(schemes) + " |",
        "|---|---|" + "---:|" * len(schemes),
        "| (max_length) | | " + " | ".join(str(output["max_length"].get(s)) for s in schemes) + " |",
    ]
    for (task, metric), values in rows.items():
        cells = [f"{values[s]:.4f}" if s in values else "" for s in schemes]
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    if output["skipped"]:
        lines += ["", "Skipped (no local data):"]
        lines += [f"- {task}: {why}" for task, why in output["skipped"].items()]
    return "\n".join(lines) + "\n"
