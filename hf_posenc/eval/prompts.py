"""Prompt building blocks shared by every retrieval task: the :class:`Probe`, the fill-to-budget search
(:func:`largest_fitting`) and :func:`build_prompt`, which fills a haystack of sentences up to a token
budget and inserts needles at given depths."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import InvalidParameterError


@dataclass
class Probe:
    """One prompt: its answer, target length (tokens), needle depth (0 = start, 1 = end; None for a task
    without depth) and real token count. ``references`` are the strings the score looks for (the
    answer alone unless given)."""

    task: str
    prompt: str
    answer: str
    length: int
    depth: float | None
    n_tokens: int
    references: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.references:
            self.references = (self.answer,)


def split_sentences(text: str) -> list[str]:
    """``text`` split into sentences after ``.``, ``!`` or ``?``, as written."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.strip()) > 1]


def sentences(text: str) -> list[str]:
    """The haystack sentences of passkey, needle and multikey: split as :func:`split_sentences`, then a
    period appended (doubling a sentence's own). Frozen: their prompts must not change."""
    return [s + "." for s in split_sentences(text)]


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def largest_fitting(fits: Callable[[int], bool], low: int = 0, limit: int | None = None) -> int:
    """The largest ``k >= low`` with ``fits(k)``, for a ``fits`` true at ``low`` and monotone (a prompt
    growing with ``k``): doubling, then bisection, so ``fits(k)`` holds and ``fits(k + 1)`` does not
    (or ``k == limit``)."""
    high = max(1, 2 * low)
    while (limit is None or high <= limit) and fits(high):
        low, high = high, high * 2
    if limit is not None:
        high = min(high, limit + 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def too_short(
    task: str, target_tokens: int, fixed: int, parts: str = "instructions, question and needle(s)"
) -> InvalidParameterError:
    """The error for a length that cannot hold a task's fixed ``parts`` (``fixed`` tokens)."""
    return InvalidParameterError(
        f"A {task} prompt of {target_tokens} tokens is too short: its {parts} alone take {fixed} tokens "
        f"with this tokenizer. Use retrieval lengths of at least "
        f"{fixed} tokens (--retrieval-lengths), better several times that."
    )


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
    sep: str = " ",
    frame: str = " ",
    keep_order: bool = False,
) -> tuple[str, int]:
    """Fill ``intro + haystack sentences + question`` up to ``target_tokens`` and insert each
    ``(depth, sentence)`` needle at that fraction of the haystack. Returns (prompt, token count).

    Haystack sentences and needles are joined by ``sep``, and that body is set between ``intro`` and
    ``question`` by ``frame`` (both a space by default). ``keep_order`` places each needle at its depth
    of the haystack alone, so needles keep the order of their depths (a chain of them stays in order);
    by default each lands at its depth of the haystack with the deeper needles already in it.

    The prompt holds as many haystack sentences (cycled, in order, then topped up with later ones that
    still fit) as its real token count allows: at most ``target_tokens``, short of it by less than the
    shortest sentence skipped.

    Raises :class:`InvalidParameterError` when ``target_tokens`` cannot hold the intro, the question
    and the needles themselves."""

    def assemble(chosen_sentences: list[str]) -> tuple[str, int]:
        chosen = list(chosen_sentences)
        if keep_order:
            size = len(chosen)
            for _, (d, needle) in sorted(enumerate(needles), key=lambda n: (n[1][0], n[0]), reverse=True):
                chosen.insert(round(d * size), needle)
        else:
            for d, needle in sorted(needles, key=lambda n: n[0], reverse=True):
                chosen.insert(round(d * len(chosen)), needle)
        body = [sep.join(chosen)] if chosen else []
        prompt = frame.join([intro, *body, question])
        return prompt, token_count(tokenizer, prompt)

    def first(k: int) -> list[str]:
        return [haystack[i % len(haystack)] for i in range(k)]

    fixed = assemble([])[1]
    if fixed > target_tokens:
        raise too_short(task, target_tokens, fixed)
    if not haystack:
        return assemble([])

    # The prompt grows with the number k of haystack sentences: find the largest k whose joined prompt fits
    # (counting sentences one by one would overestimate: a space joins into the next token), then top it
    # up with later sentences short enough for what is left.
    low = largest_fitting(lambda k: assemble(first(k))[1] <= target_tokens)
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


def fit_to_budget(
    tokenizer,
    target_tokens: int,
    build: Callable[[int], str],
    *,
    task: str,
    low: int = 0,
    limit: int | None = None,
    parts: str = "instructions, question and shortest content",
) -> tuple[str, int, int]:
    """The prompt ``build(k)`` for the largest ``k >= low`` (a count of list entries, documents, ...)
    whose real token count fits ``target_tokens``: ``(prompt, tokens, k)``. For prompts that are not a
    haystack of sentences (word lists, documents); :func:`build_prompt` covers those."""

    def count(k: int) -> int:
        return token_count(tokenizer, build(k))

    fixed = count(low)
    if fixed > target_tokens:
        raise too_short(task, target_tokens, fixed, parts)
    k = largest_fitting(lambda k: count(k) <= target_tokens, low, limit)
    prompt = build(k)
    return prompt, token_count(tokenizer, prompt), k
