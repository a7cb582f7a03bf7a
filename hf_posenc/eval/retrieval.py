"""Synthetic long-context retrieval: the retrieval tasks of the registry (:mod:`hf_posenc.eval.tasks`:
passkey, needle, multikey and RULER's synthetic tasks) run over lengths x depths with seeded probes,
answered by greedy generation (one prompt at a time, or a left-padded batch) and scored by string
match (no model judge)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice

import torch
from torch import nn

from ..errors import InvalidParameterError
from .prompts import Probe, build_prompt, sentences
from .tasks import ProbeTask, TaskInputs, get_task, list_tasks

__all__ = [
    "Probe",
    "RetrievalResult",
    "build_prompt",
    "greedy_continuation",
    "greedy_continuations",
    "is_correct",
    "make_probe",
    "probe_task",
    "run_retrieval",
    "sentences",
]


@dataclass
class RetrievalResult:
    """Accuracy per length and depth: ``accuracy[length][depth]`` is the mean score of ``trials`` probes
    (``depths == [None]`` for a task without depth)."""

    task: str
    lengths: list[int]
    depths: list[float | None]
    accuracy: list[list[float]]  # [length][depth]
    samples: list[dict] = field(default_factory=list)
    trials: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def mean(self) -> float:
        cells = [v for row in self.accuracy for v in row]
        return sum(cells) / len(cells)


def probe_task(name: str) -> ProbeTask:
    """The registered retrieval task ``name`` (did-you-mean error for an unknown name or ``ppl``)."""
    task = get_task(name)
    if not isinstance(task, ProbeTask):
        retrieval = [n for n in list_tasks() if isinstance(get_task(n), ProbeTask)]
        raise InvalidParameterError(f"{name!r} is not a retrieval task; choose from {', '.join(retrieval)}.")
    return task


def make_probe(
    task: str,
    tokenizer,
    length: int,
    depth: float | None,
    seed: int,
    haystack_text: str = "",
    *,
    qa_data: str | None = None,
) -> Probe:
    """A deterministic probe for (task, length, depth, seed). ``haystack_text``: real text for the tasks
    that hide needles in it; ``qa_data``: the QA records of qa_1/qa_2."""
    return probe_task(task).make_probe(tokenizer, length, depth, seed, TaskInputs(haystack_text, qa_data))


def is_correct(task: str, generated: str, answer: str | Sequence[str]) -> bool:
    """Whether ``generated`` earns the full score (passkey: the first number generated is the key;
    needles: the value appears in the output; RULER: every reference appears)."""
    references = (answer,) if isinstance(answer, str) else tuple(answer)
    return probe_task(task).score(generated, references) == 1.0


@torch.inference_mode()
def greedy_continuation(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 12) -> str:
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@torch.inference_mode()
def greedy_continuations(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 12) -> list[str]:
    """:func:`greedy_continuation` of several prompts in one ``generate`` call: left-padded, with an
    attention mask (the model's generate derives each row's positions from it)."""
    device = next(model.parameters()).device
    rows = [tokenizer(p)["input_ids"] for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    out = model.generate(
        ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
    )
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def run_retrieval(
    task: str,
    model: nn.Module | None,
    tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float],
    *,
    trials: int = 1,
    seed: int = 0,
    haystack_text: str = "",
    qa_data: str | None = None,
    max_new_tokens: int | None = None,
    progress: bool = False,
    answer_fn: Callable[[str], str] | None = None,
    answer_batch: Callable[[list[str]], list[str]] | None = None,
    gen_batch_size: int = 1,
    probe_cache: dict | None = None,
) -> RetrievalResult:
    """Accuracy over ``lengths x depths`` (``trials`` seeded probes per cell; lengths only for a task
    without depth). Answers come from ``answer_batch`` (a list of prompts at a time) or ``answer_fn``
    (one prompt) if given, else from greedy generation of ``max_new_tokens`` (default: the task's own),
    ``gen_batch_size`` probes per ``generate`` call. ``probe_cache`` keeps the probes built, by (length,
    depth, seed), for another call with the same tokenizer and inputs (the next scheme)."""
    from tqdm.auto import tqdm

    spec = probe_task(task)
    if trials < 1:
        raise InvalidParameterError(f"trials must be >= 1 (probes per length and depth), got {trials}.")
    if not lengths or (spec.has_depth and not depths):
        raise InvalidParameterError(f"{task} needs at least one length and one depth, got {lengths} and {depths}.")
    max_new_tokens = max_new_tokens if max_new_tokens is not None else spec.new_tokens
    if max_new_tokens < 1:
        raise InvalidParameterError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if not isinstance(gen_batch_size, int) or gen_batch_size < 1:
        raise InvalidParameterError(f"gen_batch_size must be an integer >= 1, got {gen_batch_size!r}.")

    if answer_batch is None and answer_fn is not None:
        answer_batch = lambda prompts: [answer_fn(p) for p in prompts]  # noqa: E731
    if answer_batch is None:
        answer_batch = lambda prompts: (  # noqa: E731
            greedy_continuations(model, tokenizer, prompts, max_new_tokens)
            if len(prompts) > 1
            else [greedy_continuation(model, tokenizer, prompts[0], max_new_tokens)]
        )
    inputs = TaskInputs(haystack_text, qa_data)
    cache = probe_cache if probe_cache is not None else {}

    def probe(length: int, depth: float | None, seed: int) -> Probe:
        if (length, depth, seed) not in cache:
            cache[length, depth, seed] = spec.make_probe(tokenizer, length, depth, seed, inputs)
        return cache[length, depth, seed]

    cell_depths = spec.probe_depths(depths)
    totals = [[0.0] * len(cell_depths) for _ in lengths]
    samples: list[dict] = []
    jobs = [
        (i, j, trial) for i in range(len(lengths)) for j in range(len(cell_depths)) for trial in range(trials)
    ]  # fmt: skip
    bar = tqdm(total=len(jobs), desc=task, disable=not progress, leave=False)
    for chunk in _chunks(jobs, gen_batch_size):
        probes = [probe(lengths[i], cell_depths[j], seed + t) for i, j, t in chunk]
        answers = answer_batch([p.prompt for p in probes])
        for (i, j, _), asked, generated in zip(chunk, probes, answers, strict=True):
            score = spec.score(generated, asked.references)
            totals[i][j] += score
            samples.append(
                {
                    "length": asked.length,
                    "depth": asked.depth,
                    "answer": asked.answer,
                    "generated": generated,
                    "correct": score == 1.0,
                    "n_tokens": asked.n_tokens,
                    "score": score,
                    "references": list(asked.references),
                }
            )
        bar.update(len(chunk))
    bar.close()
    accuracy = [[total / trials for total in row] for row in totals]
    return RetrievalResult(spec.name, list(lengths), cell_depths, accuracy, samples, trials)
