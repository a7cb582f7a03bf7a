"""Long-document evaluation over (model, tokenizer, texts): perplexity vs length with a per-position
loss curve, passkey retrieval, needle in a real-text haystack and a multi-key needle."""

from .data import load_texts, token_stream
from .perplexity import PerplexityResult, evaluate_perplexity, perplexity, token_nll, window_spans
from .report import markdown_report, plot_results, write_json
from .retrieval import RetrievalResult, is_correct, make_probe, run_retrieval
from .runner import ALL_TASKS, EvalSpec, run_eval

__all__ = [
    "ALL_TASKS",
    "EvalSpec",
    "PerplexityResult",
    "RetrievalResult",
    "evaluate_perplexity",
    "is_correct",
    "load_texts",
    "make_probe",
    "markdown_report",
    "perplexity",
    "plot_results",
    "run_eval",
    "run_retrieval",
    "token_nll",
    "token_stream",
    "window_spans",
    "write_json",
]
