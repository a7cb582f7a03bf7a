"""Run several schemes x tasks x lengths on one loaded model, side by side (each scheme patched in
turn with :func:`hf_posenc.patched`, so the model is back to its original after every scheme)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field

from torch import nn

from ..api import get_handle, make_scheme, patched
from ..errors import InvalidParameterError
from ..record import read_record
from ..specs import format_scheme_spec, parse_scheme_spec
from .data import load_texts, token_stream
from .journal import Journal, entry_key, model_key
from .perplexity import evaluate_perplexity
from .retrieval import TASKS as RETRIEVAL_TASKS
from .retrieval import greedy_continuation, make_probe, run_retrieval

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
        """Every value a user can get wrong fails here, before any model work."""
        if not self.tasks:
            raise InvalidParameterError(f"No task given; choose from {', '.join(ALL_TASKS)}.")
        unknown = [t for t in self.tasks if t not in ALL_TASKS]
        if unknown:
            raise InvalidParameterError(f"Unknown task(s) {unknown}; choose from {', '.join(ALL_TASKS)}.")
        if not self.schemes:
            raise InvalidParameterError("No scheme given; use 'none' for the model as loaded.")
        parsed = [parse_scheme_spec(spec) for spec in self.schemes]
        for name_params in filter(None, parsed):  # unknown names and parameters fail before any model work
            make_scheme(name_params[0], **name_params[1])
        labels = [format_scheme_spec(p) for p in parsed]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise InvalidParameterError(f"Scheme(s) listed twice: {', '.join(repeated)} (schemes: {self.schemes}).")
        _check_lengths("lengths", self.lengths, 2, "the shortest window that scores a token")
        if self.retrieval_lengths is not None:
            _check_lengths("retrieval_lengths", self.retrieval_lengths, 2, "omit it to use lengths")
        if not self.depths:
            raise InvalidParameterError("depths is empty; give at least one needle depth in [0, 1], e.g. 0.5.")
        if any(not 0 <= d <= 1 for d in self.depths):
            raise InvalidParameterError(f"depths must lie in [0, 1] (0 = start, 1 = end), got {self.depths}.")
        for name in ("trials", "max_windows", "batch_size", "max_new_tokens"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise InvalidParameterError(f"{name} must be an integer >= 1, got {value!r}.")
        if self.stride is not None and (not _is_int(self.stride) or not 1 <= self.stride <= min(self.lengths)):
            raise InvalidParameterError(
                f"stride must be between 1 and the shortest length ({min(self.lengths)}), got {self.stride!r}; "
                "omit it for non-overlapping windows."
            )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_lengths(name: str, lengths, minimum: int, hint: str) -> None:
    if not lengths:
        raise InvalidParameterError(f"{name} is empty; give at least one length in tokens ({hint}).")
    bad = [n for n in lengths if not _is_int(n) or n < minimum]
    if bad:
        raise InvalidParameterError(f"{name} must be integers >= {minimum} tokens, got {bad} in {list(lengths)}.")


def run_eval(
    model: nn.Module, tokenizer, spec: EvalSpec, *, progress: bool = True, log=print, journal: Journal | None = None
) -> dict:
    """Results as a JSON-ready dict: ``{"spec": ..., "saved_scheme": ..., "results": {scheme: {task: ...}}}``.

    With a :class:`~hf_posenc.eval.journal.Journal`, each perplexity result and each generated answer is
    recorded as it finishes and taken from the journal when already there (same weights, scheme, backend
    and inputs), so an interrupted run resumes and a rerun with more trials or schemes reuses the rest.

    A model hf_posenc already patched (a saved patched checkpoint loaded with
    :func:`hf_posenc.from_pretrained`) is evaluated as it is: only ``schemes=["none"]`` is accepted, its
    row is labelled ``"<its spec> (saved)"`` and ``saved_scheme`` holds its spec. To compare schemes,
    evaluate the unpatched base model.
    """
    label_of_model = "none"
    saved = None
    handle = get_handle(model)
    if handle is not None:
        record = read_record(model.config)
        label = record.label if record is not None else handle.scheme.name
        if any(parse_scheme_spec(s) is not None for s in spec.schemes):
            raise InvalidParameterError(
                f"The model is already patched with {label} (a saved patched checkpoint?): it is evaluated as "
                f"saved, so use schemes=['none'] (--schemes none, the default), got {spec.schemes}. To compare "
                "schemes, evaluate the base checkpoint it was made from, e.g. "
                f"--schemes none,{label}."
            )
        label_of_model = f"{label} (saved)"
        saved = {"label": label, "spec": dict(record.spec) if record is not None else handle.scheme.to_dict()}
    texts = load_texts(spec.data)
    retrieval_tasks = [t for t in spec.tasks if t in RETRIEVAL_TASKS]
    retrieval_lengths = spec.retrieval_lengths or spec.lengths
    haystack = " ".join(texts)[: max(retrieval_lengths) * 8]
    for task in retrieval_tasks:  # a length too short for the prompt fails now, not after the first scheme ran
        for depth in spec.depths:
            make_probe(task, tokenizer, min(retrieval_lengths), depth, spec.seed, haystack)
    results: dict[str, dict] = {}
    needed = max(spec.lengths) * spec.max_windows + 1
    tokens = token_stream(tokenizer, texts, needed) if "ppl" in spec.tasks else []
    if "ppl" in spec.tasks and len(tokens) < max(spec.lengths):
        raise InvalidParameterError(
            f"The text {spec.data!r} has {len(tokens)} tokens: too few for one window of {max(spec.lengths)}. "
            "Use a longer text (--data) or shorter lengths."
        )
    weights = model_key(model) if journal is not None else None
    tokens_hash = entry_key({"tokens": list(tokens)}) if journal is not None and tokens else None
    for scheme_spec in spec.schemes:
        parsed = parse_scheme_spec(scheme_spec)
        label = format_scheme_spec(parsed) if parsed is not None else label_of_model
        entry: dict = {}
        start = time.perf_counter()
        scope = (
            patched(model, parsed[0], attn_implementation=spec.attn_implementation, **parsed[1])
            if parsed is not None
            else contextlib.nullcontext()
        )
        with scope:
            entry["attn_implementation"] = model.config._attn_implementation
            backend = model.config._attn_implementation
            if "ppl" in spec.tasks:
                entry["ppl"] = []
                for length in spec.lengths:
                    fields = {
                        "kind": "ppl", "model": weights, "scheme": label, "attn": backend, "tokens": tokens_hash,
                        "length": length, "stride": spec.stride, "max_windows": spec.max_windows,
                        "batch_size": spec.batch_size,
                    }  # fmt: skip
                    done = journal.get(fields) if journal is not None else None
                    if done is None:
                        done = evaluate_perplexity(
                            model,
                            tokens,
                            length,
                            stride=spec.stride,
                            max_windows=spec.max_windows,
                            batch_size=spec.batch_size,
                            progress=progress,
                        ).to_dict()
                        if journal is not None:
                            journal.put(fields, done)
                    entry["ppl"].append(done)
            answer_fn = None
            if journal is not None:
                answer_fn = _journaled_answers(
                    journal, model, tokenizer, spec.max_new_tokens, weights=weights, scheme=label, attn=backend
                )
            for task in retrieval_tasks:
                entry[task] = run_retrieval(
                    task,
                    model,
                    tokenizer,
                    retrieval_lengths,
                    spec.depths,
                    trials=spec.trials,
                    seed=spec.seed,
                    haystack_text=haystack,
                    max_new_tokens=spec.max_new_tokens,
                    progress=progress,
                    answer_fn=answer_fn,
                ).to_dict()
        entry["seconds"] = time.perf_counter() - start
        results[label] = entry
        log(f"  {label}: done in {entry['seconds']:.0f} s")
    return {"spec": asdict(spec), "saved_scheme": saved, "results": results}


def _journaled_answers(journal: Journal, model: nn.Module, tokenizer, max_new_tokens: int, **context):
    """Greedy answers taken from the journal when recorded for the same context and prompt."""

    def answer(prompt: str) -> str:
        fields = {"kind": "answer", **context, "max_new_tokens": max_new_tokens, "prompt": entry_key({"p": prompt})}
        done = journal.get(fields)
        if done is None:
            done = greedy_continuation(model, tokenizer, prompt, max_new_tokens)
            journal.put(fields, done)
        return done

    return answer
