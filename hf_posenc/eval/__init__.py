"""Long-document evaluation over (model, tokenizer, texts): perplexity vs length with a per-position
loss curve, and retrieval tasks (passkey, needle, multikey and RULER's synthetic tasks) from the task
registry (:mod:`hf_posenc.eval.tasks`)."""

from .data import load_texts, token_stream
from .perplexity import PerplexityResult, evaluate_perplexity, perplexity, token_nll, window_spans
from .prompts import Probe
from .report import markdown_report, plot_results, write_json
from .retrieval import (
    RetrievalResult,
    greedy_continuation,
    greedy_continuations,
    is_correct,
    make_probe,
    run_retrieval,
)
from .runner import ALL_TASKS, EvalSpec, run_eval
from .tasks import ProbeTask, Task, TaskInputs, expand_tasks, get_task, list_groups, list_tasks, register_task

__all__ = [
    "ALL_TASKS",
    "EvalSpec",
    "PerplexityResult",
    "Probe",
    "ProbeTask",
    "RetrievalResult",
    "Task",
    "TaskInputs",
    "evaluate_perplexity",
    "expand_tasks",
    "get_task",
    "greedy_continuation",
    "greedy_continuations",
    "is_correct",
    "list_groups",
    "list_tasks",
    "load_texts",
    "make_probe",
    "markdown_report",
    "perplexity",
    "plot_results",
    "register_task",
    "run_eval",
    "run_retrieval",
    "token_nll",
    "token_stream",
    "window_spans",
    "write_json",
]
