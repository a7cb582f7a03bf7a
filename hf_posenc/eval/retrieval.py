"""Synthetic long-context retrieval: passkey (landmark-attention format), needle in a real-text
haystack, and RULER's multi-key needle. Prompts are built to a token budget, seeded, and scored by
exact / substring match of greedy continuations (no model judge)."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import InvalidParameterError

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The pass key is {value}. Remember it. {value} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"

NEEDLE_INTRO = "A special magic number is hidden within the following text. Make sure to memorize it."
NEEDLE = "One of the special magic numbers for {key} is: {value}."
NEEDLE_QUESTION = "What is the special magic number for {key} mentioned in the provided text? The special magic number for {key} mentioned in the provided text is"  # noqa: E501
KEYS = (
    "Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Hobart", "Dakar", "Bergen", "Cusco", "Tromso",
    "Accra", "Lhasa", "Perth", "Zagreb", "Kyoto", "Leon", "Malmo", "Porto", "Sapporo", "Tunis",
)  # fmt: skip
TASKS = ("passkey", "needle", "multikey")


@dataclass
class Probe:
    """One prompt: its answer, target length (tokens), needle depth (0 = start, 1 = end)."""

    task: str
    prompt: str
    answer: str
    length: int
    depth: float
    n_tokens: int


@dataclass
class RetrievalResult:
    task: str
    lengths: list[int]
    depths: list[float]
    accuracy: list[list[float]]  # [length][depth]
    samples: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def mean(self) -> float:
        cells = [v for row in self.accuracy for v in row]
        return sum(cells) / len(cells)


def _sentences(text: str) -> list[str]:
    return [s.strip() + "." for s in re.split(r"(?<=[.!?])\s+", text) if len(s.strip()) > 1]


def build_prompt(
    tokenizer,
    target_tokens: int,
    depth: float,
    haystack: Sequence[str],
    needles: Sequence[tuple[float, str]],
    intro: str,
    question: str,
    *,
    task: str = "retrieval",
) -> tuple[str, int]:
    """Fill ``intro + haystack sentences + question`` up to ``target_tokens`` and insert each
    ``(depth, sentence)`` needle at that fraction of the haystack. Returns (prompt, token count).

    The prompt holds as many haystack sentences (cycled, in order, then topped up with later ones that
    still fit) as its real token count allows: at most ``target_tokens``, short of it by less than the
    shortest sentence skipped.

    Raises :class:`InvalidParameterError` when ``target_tokens`` cannot hold the intro, the question
    and the needles themselves."""

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def assemble(sentences: list[str]) -> tuple[str, int]:
        chosen = list(sentences)
        for d, needle in sorted(needles, key=lambda n: n[0], reverse=True):
            chosen.insert(round(d * len(chosen)), needle)
        prompt = " ".join([intro, *chosen, question])
        return prompt, count(prompt)

    def first(k: int) -> list[str]:
        return [haystack[i % len(haystack)] for i in range(k)]

    fixed = assemble([])[1]
    if fixed > target_tokens:
        raise InvalidParameterError(
            f"A {task} prompt of {target_tokens} tokens is too short: its instructions, question and "
            f"needle(s) alone take {fixed} tokens with this tokenizer. Use retrieval lengths of at least "
            f"{fixed} tokens (--retrieval-lengths), better several times that."
        )
    if not haystack:
        return assemble([])

    # The prompt grows with the number k of haystack sentences: find the largest k whose joined prompt fits
    # (counting sentences one by one would overestimate: a space joins into the next token), then top it
    # up with later sentences short enough for what is left.
    low, high = 0, 1
    while assemble(first(high))[1] <= target_tokens:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if assemble(first(mid))[1] <= target_tokens else (low, mid)
    chosen, misses = first(low), 0
    for i in range(low, low + len(haystack)):
        if misses == 20:
            break
        candidate = [*chosen, haystack[i % len(haystack)]]
        if assemble(candidate)[1] <= target_tokens:
            chosen = candidate
        else:
            misses += 1
    return assemble(chosen)


def make_probe(task: str, tokenizer, length: int, depth: float, seed: int, haystack_text: str = "") -> Probe:
    """A deterministic probe for (task, length, depth, seed); its needle(s) and values depend on (task,
    depth, seed) only, so a length sweep asks the same question over more haystack."""
    rng = random.Random(f"{task}-{seed}-{depth}")  # the same needles at every length
    if task == "passkey":
        value = str(rng.randint(10000, 99999))
        prompt, n = build_prompt(
            tokenizer,
            length,
            depth,
            _sentences(PASSKEY_FILLER),
            [(depth, PASSKEY_NEEDLE.format(value=value))],
            PASSKEY_INTRO,
            PASSKEY_QUESTION,
            task=task,
        )
        return Probe(task, prompt, value, length, depth, n)
    if task not in ("needle", "multikey"):
        raise InvalidParameterError(f"Unknown retrieval task {task!r}; choose from {', '.join(TASKS)}.")
    if not haystack_text.strip():
        raise InvalidParameterError(f"{task} needs a real-text haystack (haystack_text), got none.")
    sentences = _sentences(haystack_text)
    start = rng.randrange(max(1, len(sentences) // 2))
    sentences = sentences[start:] + sentences[:start]
    keys = rng.sample(KEYS, 4 if task == "multikey" else 1)
    values = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
    needles = [(depth, NEEDLE.format(key=keys[0], value=values[0]))]
    for key, value in zip(keys[1:], values[1:], strict=True):  # distractors at random depths
        needles.append((rng.random(), NEEDLE.format(key=key, value=value)))
    prompt, n = build_prompt(
        tokenizer, length, depth, sentences, needles, NEEDLE_INTRO, NEEDLE_QUESTION.format(key=keys[0]), task=task
    )
    return Probe(task, prompt, values[0], length, depth, n)


def is_correct(task: str, generated: str, answer: str) -> bool:
    """Passkey: the first number generated equals the key. Needles: the value appears in the output."""
    if task == "passkey":
        match = re.search(r"\d+", generated)
        return match is not None and match.group() == answer
    return answer in generated


@torch.inference_mode()
def greedy_continuation(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 12) -> str:
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def run_retrieval(
    task: str,
    model: nn.Module,
    tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float],
    *,
    trials: int = 1,
    seed: int = 0,
    haystack_text: str = "",
    max_new_tokens: int = 12,
    progress: bool = False,
    answer_fn: Callable[[str], str] | None = None,
) -> RetrievalResult:
    """Accuracy over ``lengths x depths`` (``trials`` seeded probes per cell)."""
    from tqdm.auto import tqdm

    if task not in TASKS:
        raise InvalidParameterError(f"Unknown retrieval task {task!r}; choose from {', '.join(TASKS)}.")
    if trials < 1:
        raise InvalidParameterError(f"trials must be >= 1 (probes per length and depth), got {trials}.")
    if not lengths or not depths:
        raise InvalidParameterError(f"{task} needs at least one length and one depth, got {lengths} and {depths}.")
    if max_new_tokens < 1:
        raise InvalidParameterError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")

    answer_fn = answer_fn or (lambda prompt: greedy_continuation(model, tokenizer, prompt, max_new_tokens))
    grid, samples = [], []
    cells = [(length, depth) for length in lengths for depth in depths]
    bar = tqdm(total=len(cells) * trials, desc=task, disable=not progress, leave=False)
    for length in lengths:
        row = []
        for depth in depths:
            hits = 0
            for trial in range(trials):
                probe = make_probe(task, tokenizer, length, depth, seed + trial, haystack_text)
                generated = answer_fn(probe.prompt)
                ok = is_correct(task, generated, probe.answer)
                hits += ok
                samples.append(
                    {
                        "length": length,
                        "depth": depth,
                        "answer": probe.answer,
                        "generated": generated,
                        "correct": ok,
                        "n_tokens": probe.n_tokens,
                    }
                )
                bar.update()
            row.append(hits / trials)
        grid.append(row)
    bar.close()
    return RetrievalResult(task, list(lengths), list(depths), grid, samples)
