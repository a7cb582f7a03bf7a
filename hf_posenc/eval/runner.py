"""Run several schemes x tasks x lengths on one loaded model, side by side (each scheme patched in
turn with :func:`hf_posenc.patched`, so the model is back to its original after every scheme)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field

from torch import nn

from ..api import get_handle, make_scheme, patched
from ..errors import InvalidParameterError, did_you_mean
from ..record import read_record
from ..specs import format_scheme_spec, parse_scheme_spec
from .data import load_texts
from .journal import Journal, entry_key, model_key
from .retrieval import greedy_continuation, greedy_continuations
from .tasks import EvalContext, ProbeTask, TaskInputs, expand_tasks, get_task, list_tasks
from .vllm_engine import EVAL_ENGINES, VllmScheme, check_schemes

#: the tasks registered when hf_posenc.eval was imported (list_tasks() also sees later registrations)
ALL_TASKS = tuple(list_tasks())


@dataclass
class EvalSpec:
    """What to evaluate. ``tasks`` takes task names, aliases and groups (``ruler``), stored expanded to
    task names. ``retrieval_lengths`` defaults to ``lengths``; ``max_new_tokens`` to each task's own
    (12 for passkey/needle/multikey, RULER's budget for RULER's tasks). ``gen_batch_size`` retrieval
    probes are generated per ``generate`` call (left-padded); ``qa_data`` holds qa_1/qa_2's records.
    ``engine="vllm"`` exports each scheme for vLLM and runs the tasks there (``accept``: as
    :func:`hf_posenc.export`'s)."""

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
    max_new_tokens: int | None = None
    gen_batch_size: int = 1
    qa_data: str | None = None
    #: backend for the patched schemes (eager, sdpa, flex_attention, flash_attention_2); None keeps the model's
    attn_implementation: str | None = None
    #: who runs the tasks: "transformers" (the patched model itself) or "vllm" (each scheme exported)
    engine: str = "transformers"
    accept: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Every value a user can get wrong fails here, before any model work."""
        self.tasks = expand_tasks(self.tasks)  # unknown names fail here, with a did-you-mean
        if not self.tasks:
            raise InvalidParameterError(f"No task given; choose from {', '.join(list_tasks())}.")
        for task in self.tasks:
            get_task(task).validate(self)
        _check_engine(self)
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
        for name in ("trials", "max_windows", "batch_size", "gen_batch_size", "max_new_tokens"):
            value = getattr(self, name)
            if (value is not None or name != "max_new_tokens") and (not _is_int(value) or value < 1):
                raise InvalidParameterError(f"{name} must be an integer >= 1, got {value!r}.")
        if self.stride is not None and (not _is_int(self.stride) or not 1 <= self.stride <= min(self.lengths)):
            raise InvalidParameterError(
                f"stride must be between 1 and the shortest length ({min(self.lengths)}), got {self.stride!r}; "
                "omit it for non-overlapping windows."
            )


def _check_engine(spec: EvalSpec) -> None:
    from ..serving.engines import ACCEPTABLE

    if spec.engine not in EVAL_ENGINES:
        raise InvalidParameterError(
            f"Unknown engine {spec.engine!r}; choose from {', '.join(EVAL_ENGINES)}."
            + did_you_mean(spec.engine, EVAL_ENGINES)
        )
    spec.accept = list(spec.accept)
    unknown = [a for a in spec.accept if a not in ACCEPTABLE]
    if unknown:
        raise InvalidParameterError(f"Unknown accept value(s) {unknown}; choose from {', '.join(ACCEPTABLE)}.")
    if spec.engine == "transformers":
        if spec.accept:
            raise InvalidParameterError("accept applies to the vLLM export: use it with engine='vllm' (--engine vllm).")
        return
    runs = [name for name in list_tasks() if spec.engine in get_task(name).engines]
    refused = [name for name in spec.tasks if name not in runs]
    if refused:
        raise InvalidParameterError(
            f"The {spec.engine} engine runs {', '.join(runs)}; not {', '.join(refused)}: "
            "run those with --engine transformers."
        )
    if spec.attn_implementation is not None:
        raise InvalidParameterError(
            f"attn_implementation ({spec.attn_implementation}) chooses a transformers backend; vLLM uses its own "
            "attention: omit --attn with --engine vllm."
        )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_lengths(name: str, lengths, minimum: int, hint: str) -> None:
    if not lengths:
        raise InvalidParameterError(f"{name} is empty; give at least one length in tokens ({hint}).")
    bad = [n for n in lengths if not _is_int(n) or n < minimum]
    if bad:
        raise InvalidParameterError(f"{name} must be integers >= {minimum} tokens, got {bad} in {list(lengths)}.")


#: characters of haystack text per prompt token (generous: English BPE averages about 4)
HAYSTACK_CHARS_PER_TOKEN = 8
#: runs whose longest retrieval length is at most this share one haystack (and so their prompts)
HAYSTACK_MIN_TOKENS = 16384


def haystack_chars(longest: int) -> int:
    """Characters of the text the real-text tasks draw their haystacks from: enough for ``longest``
    tokens, rounded up to a power of two of at least :data:`HAYSTACK_MIN_TOKENS` tokens, so that runs
    over different lengths up to 16k (and within each power of two beyond) build the same prompts, and
    ``--resume`` reuses their answers."""
    tokens = max(HAYSTACK_MIN_TOKENS, 1 << (max(longest, 1) - 1).bit_length())
    return tokens * HAYSTACK_CHARS_PER_TOKEN


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
    retrieval_lengths = spec.retrieval_lengths or spec.lengths
    haystack = " ".join(texts)[: haystack_chars(max(retrieval_lengths))]
    tasks = [get_task(name) for name in spec.tasks]
    ctx = EvalContext(model, tokenizer, spec, texts, TaskInputs(haystack, spec.qa_data), journal, progress=progress)
    for task in tasks:  # a length too short for a prompt, a text too short for a window: fail before any scheme
        task.check(ctx)
    vllm_len = check_schemes(model, tokenizer, spec) if spec.engine == "vllm" else None
    weights = ctx.weights = model_key(model) if journal is not None else None
    results: dict[str, dict] = {}
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
        with contextlib.ExitStack() as stack:
            stack.enter_context(scope)
            served = window_nll = None
            if spec.engine == "vllm":
                served = stack.enter_context(VllmScheme(model, tokenizer, spec, vllm_len, log=log))
                backend = entry["attn_implementation"] = "vllm"
                window_nll = served.window_nll
            else:
                backend = entry["attn_implementation"] = model.config._attn_implementation
            answers = None
            if served is not None or (journal is not None and any(isinstance(task, ProbeTask) for task in tasks)):

                def answers(max_new_tokens: int, label=label, backend=backend, served=served):
                    keys = dict(weights=weights, scheme=label, attn=backend, **ctx.engine_fields)
                    if served is None:
                        return _journaled_answers(
                            journal, model, tokenizer, max_new_tokens, batch_size=spec.gen_batch_size, **keys
                        )
                    generate = lambda prompts: served.generate(prompts, max_new_tokens)  # noqa: E731
                    return _journaled(journal, generate, max_new_tokens, batch_size=None, **keys)

            scheme_ctx = ctx.for_scheme(label, backend, answers, window_nll)
            for task in tasks:
                entry[task.name] = task.run(scheme_ctx)
            if served is not None:
                entry["engine"] = {"name": "vllm", "version": served.version}  # None: every answer was journaled
        entry["seconds"] = time.perf_counter() - start
        results[label] = entry
        log(f"  {label}: done in {entry['seconds']:.0f} s")
    return {"spec": asdict(spec), "saved_scheme": saved, "results": results}


def _journaled_answers(
    journal: Journal | None, model: nn.Module, tokenizer, max_new_tokens: int, *, batch_size: int = 1, **context
):
    """Greedy answers from the model to a list of prompts, taken from the journal when recorded for the same
    context and prompt; the others are generated (``batch_size`` per ``generate`` call) and recorded as they
    finish."""

    def generate(prompts: list[str]) -> list[str]:
        if len(prompts) == 1:
            return [greedy_continuation(model, tokenizer, prompts[0], max_new_tokens)]
        return greedy_continuations(model, tokenizer, prompts, max_new_tokens)

    return _journaled(journal, generate, max_new_tokens, batch_size=batch_size, **context)


def _journaled(journal: Journal | None, generate, max_new_tokens: int, *, batch_size: int | None, **context):
    """Answers to a list of prompts from the journal, or asked of ``generate`` (``batch_size`` prompts per
    call, None: all at once) and recorded as they finish."""

    def fields(prompt: str) -> dict:
        return {"kind": "answer", **context, "max_new_tokens": max_new_tokens, "prompt": entry_key({"p": prompt})}

    def answer(prompts: list[str]) -> list[str]:
        done = [journal.get(fields(p)) if journal is not None else None for p in prompts]
        missing = [i for i, d in enumerate(done) if d is None]
        step = batch_size or max(1, len(missing))
        for start in range(0, len(missing), step):
            todo = missing[start : start + step]
            for i, text in zip(todo, generate([prompts[i] for i in todo]), strict=True):
                done[i] = text
                if journal is not None:
                    journal.put(fields(prompts[i]), text)
        return done

    return answer
