"""hf_posenc's own retrieval tasks: ``passkey`` (the landmark-attention format), ``needle`` (a magic
number in a real-text haystack) and ``multikey`` (the same with three distractor needles, after RULER's
niah_multikey_1). Their prompts, answers and scores are frozen: resumable runs key their journal on the
prompts (tests/test_eval_tasks.py holds their hashes)."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from ...errors import InvalidParameterError
from ..prompts import Probe, build_prompt, sentences
from .base import ProbeTask, TaskInputs, register_task

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


@register_task
class Passkey(ProbeTask):
    name = "passkey"
    summary = "A 5-digit pass key hidden at a depth in repeated filler sentences; asked back at the end"
    scoring = "exact: the first number generated equals the key"
    source = "the landmark-attention passkey prompt (Mohtashami & Jaggi, 2023)"
    tolerance = "short of the length by less than one filler sentence"

    def make_probe(self, tokenizer, length: int, depth: float | None, seed: int, inputs: TaskInputs) -> Probe:
        rng = random.Random(f"{self.name}-{seed}-{depth}")  # the same key at every length
        value = str(rng.randint(10000, 99999))
        prompt, n = build_prompt(
            tokenizer,
            length,
            depth,
            sentences(PASSKEY_FILLER),
            [(depth, PASSKEY_NEEDLE.format(value=value))],
            PASSKEY_INTRO,
            PASSKEY_QUESTION,
            task=self.name,
        )
        return Probe(self.name, prompt, value, length, depth, n)

    def score(self, generated: str, references: Sequence[str]) -> float:
        match = re.search(r"\d+", generated)
        return float(match is not None and match.group() == references[0])


@register_task
class Needle(ProbeTask):
    name = "needle"
    summary = "A 7-digit magic number for a city, hidden at a depth in real text (--data)"
    scoring = "the number appears in the output"
    source = "Needle in a Haystack (Kamradt, 2023) with RULER's needle sentence"
    distractors = 0

    def make_probe(self, tokenizer, length: int, depth: float | None, seed: int, inputs: TaskInputs) -> Probe:
        """Needles and values depend on (task, depth, seed) only: a length sweep asks the same question
        over more haystack."""
        rng = random.Random(f"{self.name}-{seed}-{depth}")
        if not inputs.haystack.strip():
            raise InvalidParameterError(f"{self.name} needs a real-text haystack (haystack_text), got none.")
        haystack = sentences(inputs.haystack)
        start = rng.randrange(max(1, len(haystack) // 2))
        haystack = haystack[start:] + haystack[:start]
        keys = rng.sample(KEYS, 1 + self.distractors)
        values = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
        needles = [(depth, NEEDLE.format(key=keys[0], value=values[0]))]
        for key, value in zip(keys[1:], values[1:], strict=True):  # distractors at random depths
            needles.append((rng.random(), NEEDLE.format(key=key, value=value)))
        question = NEEDLE_QUESTION.format(key=keys[0])
        prompt, n = build_prompt(tokenizer, length, depth, haystack, needles, NEEDLE_INTRO, question, task=self.name)
        return Probe(self.name, prompt, values[0], length, depth, n)

    def score(self, generated: str, references: Sequence[str]) -> float:
        return float(references[0] in generated)


@register_task
class Multikey(Needle):
    name = "multikey"
    summary = "As needle, with three distractor needles (other cities' numbers) at random depths"
    scoring = "the asked city's number appears in the output"
    source = "RULER's niah_multikey_1 with hf_posenc's needle wording"
    distractors = 3
