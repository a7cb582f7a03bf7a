"""RULER's variable tracking (``vt``): a chain ``VAR ABCDE = 12345``, ``VAR FGHIJ = VAR ABCDE``, ...
(one chain, four hops) spread through the repeated noise paragraph, after one short worked example;
the answer is every variable that ends up holding the value. Follows NVIDIA/RULER
``scripts/data/synthetic/variable_tracking.py`` (``--num_chains 1 --num_hops 4``, noise haystack, its
in-context example) with the instructions of ``scripts/data/synthetic/constants.py``, reworded."""

from __future__ import annotations

import random
import string

from ..prompts import Probe, build_prompt
from .base import ProbeTask, TaskInputs, register_task
from .ruler_niah import NOISE

INTRO = "Keep track of the chain(s) of variable assignments hidden in the text below."
QUESTION = "Question: Which variables are assigned the value {value} in the text above?"
ANSWER = " Answer: Following the chain(s) of assignments above, {n} variables hold the value {value}; they are:"
EXAMPLE_NOISE = 3  # noise lines around the worked example's chain


def _chain(rng: random.Random, hops: int) -> tuple[list[str], list[str], str]:
    """(variable names, assignment lines, value) of one chain."""
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        names += [name] if name not in names else []
    value = str(rng.randint(10000, 99999))
    lines = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(hops)]
    return names, lines, value


@register_task
class VariableTracking(ProbeTask):
    name = "vt"
    aliases = ("variable_tracking",)
    groups = ("ruler", "ruler_all")
    has_depth = False
    new_tokens = 30  # RULER's tokens_to_generate for vt
    hops = 4
    summary = "Follow a chain of variable assignments hidden in noise; name every variable holding the value"
    scoring = "string_match_all: the fraction of the chain's variables found in the output"
    source = "RULER vt (1 chain, 4 hops, noise haystack, one in-context example)"
    tolerance = "short of the length by less than one noise paragraph"

    def make_probe(self, tokenizer, length: int, depth: float | None, seed: int, inputs: TaskInputs) -> Probe:
        rng = random.Random(f"{self.name}-{seed}")
        names, lines, value = _chain(rng, self.hops)
        positions = sorted(rng.random() for _ in lines)
        example = self._example(random.Random(f"{self.name}-{seed}-example"))
        question = QUESTION.format(value=value) + ANSWER.format(n=len(names), value=value)
        prompt, n = build_prompt(
            tokenizer,
            length,
            0.0,
            [NOISE],
            list(zip(positions, lines, strict=True)),
            f"{example}\n{INTRO}\n",
            question,
            task=self.name,
            sep="\n",
            frame="\n",
            keep_order=True,
        )
        return Probe(self.name, prompt, " ".join(names), length, None, n, tuple(names))

    def _example(self, rng: random.Random) -> str:
        """A short solved instance, as RULER prepends (its chain among a few noise lines)."""
        names, lines, value = _chain(rng, self.hops)
        slots = sorted(rng.choices(range(EXAMPLE_NOISE + 1), k=len(lines)))  # chain lines before noise line s
        body: list[str] = []
        for s in range(EXAMPLE_NOISE + 1):
            body += [line for line, slot in zip(lines, slots, strict=True) if slot == s]
            body += [NOISE] if s < EXAMPLE_NOISE else []
        question = QUESTION.format(value=value) + ANSWER.format(n=len(names), value=value)
        return "\n".join([INTRO + "\n", *body, question + " " + " ".join(names)]) + "\n"
