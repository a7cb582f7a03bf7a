"""Bridge to EleutherAI's lm-evaluation-harness (``pip install hf_posenc[eval]``).

``lm_eval_model(model, tokenizer)`` wraps an already loaded (and patched) model in lm-eval's ``HFLM``,
so any harness task sees the patched positions. ``kjv_last_word_task(folder)`` writes a small
LAMBADA-style task over the embedded corpus (predict a verse's last word) that runs offline.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from ..corpus import load_documents

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
