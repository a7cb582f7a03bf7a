"""Run several schemes x tasks x lengths on one loaded model, side by side (each scheme patched in
turn with :func:`hf_posenc.patched`, so the model is back to its original after every scheme)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field

from torch import nn

from ..api import patched
from ..specs import format_scheme_spec, parse_scheme_spec
from .data import load_texts, token_stream
from .perplexity import evaluate_perplexity
from .retrieval import TASKS as RETRIEVAL_TASKS
from .retrieval import run_retrieval

ALL_TASKS = ("ppl", *RETRIEVAL_TASKS)


@dataclass
class EvalSpec:
    """What to evaluate. ``retrieval_lengths`` defaults to ``lengths``."""

    schemes: list[str] = field(default_factory=lambda: ["none"])
    tasks: list[str] = field(default_factory=lambda: ["ppl"])
    lengths: list[int] = field(default_factory=lambda: [2048])
    retrieval_lengths: list[int] | None = None
    depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    trials: int = 1
    seed: int = 0
    data: str = "kjv"
    stride: int | None = None
    max_windows: int = 1
    batch_size: int = 1
    max_new_tokens: int = 12
    #: backend for the patched schemes (eager, sdpa, flex_attention, flash_attention_2); None keeps the model's
    attn_implementation: str | None = None

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in ALL_TASKS]
        if unknown:
            raise ValueError(f"Unknown task(s) {unknown}; choose from {', '.join(ALL_TASKS)}.")
        for spec in self.schemes:
            parse_scheme_spec(spec)  # fail before any model work
        if any(d < 0 or d > 1 for d in self.depths):
            raise ValueError(f"depths must lie in [0, 1], got {self.depths}.")


def run_eval(model: nn.Module, tokenizer, spec: EvalSpec, *, progress: bool = True, log=print) -> dict:
    """Results as a JSON-ready dict: ``{"spec": ..., "results": {scheme: {task: ...}}}``."""
    texts = load_texts(spec.data)
    results: dict[str, dict] = {}
    needed = max(spec.lengths) * spec.max_windows + 1
    tokens = token_stream(tokenizer, texts, needed) if "ppl" in spec.tasks else []
    haystack = " ".join(texts)[: max(spec.retrieval_lengths or spec.lengths) * 8]
    for scheme_spec in spec.schemes:
        parsed = parse_scheme_spec(scheme_spec)
        label = format_scheme_spec(parsed)
        entry: dict = {}
        start = time.perf_counter()
        scope = (
            patched(model, parsed[0], attn_implementation=spec.attn_implementation, **parsed[1])
            if parsed is not None
            else contextlib.nullcontext()
        )
        with scope:
            entry["attn_implementation"] = model.config._attn_implementation
            if "ppl" in spec.tasks:
                entry["ppl"] = [
                    evaluate_perplexity(
                        model,
                        tokens,
                        length,
                        stride=spec.stride,
                        max_windows=spec.max_windows,
                        batch_size=spec.batch_size,
                        progress=progress,
                    ).to_dict()
                    for length in spec.lengths
                ]
            for task in (t for t in spec.tasks if t in RETRIEVAL_TASKS):
                entry[task] = run_retrieval(
                    task,
                    model,
                    tokenizer,
                    spec.retrieval_lengths or spec.lengths,
                    spec.depths,
                    trials=spec.trials,
                    seed=spec.seed,
                    haystack_text=haystack,
                    max_new_tokens=spec.max_new_tokens,
                    progress=progress,
                ).to_dict()
        entry["seconds"] = time.perf_counter() - start
        results[label] = entry
        log(f"  {label}: done in {entry['seconds']:.0f} s")
    return {"spec": asdict(spec), "results": results}
