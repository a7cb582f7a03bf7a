"""RULER's aggregation tasks: common-words extraction (``cwe``: ten words repeated more often than the
rest of a numbered list) and frequent-words extraction (``fwe``: the three most frequent coded words of
a Zipf-distributed text). Follows NVIDIA/RULER ``scripts/data/synthetic/common_words_extraction.py``
(freq_cw 30, freq_ucw 3, num_cw 10; 6 and 1 below 4096 tokens; one worked example) and
``freq_words_extraction.py`` (alpha 2, six-letter coded words, vocabulary length // 50, the most
frequent word replaced by dots), with the instructions of ``scripts/data/synthetic/constants.py``,
reworded. The list grows to the largest size whose prompt fits the length."""

from __future__ import annotations

import math
import random
import string

from ..prompts import Probe, fit_to_budget
from .base import ProbeTask, TaskInputs, register_task
from .vocabulary import shuffled_words

CWE_INTRO = "Below is a numbered list of words. Some occur more often than the others; memorize the most frequent."
CWE_QUESTION = "Question: Which are the 10 most common words in the list above?"
CWE_ANSWER = " Answer: The 10 words that occur most often in the list are:"
COMMON = 10

FWE_INTRO = (
    "Read the coded text below and count how often each coded word occurs. Find the three coded words that "
    "occur most often."
)
FWE_QUESTION = "Question: Give no explanation, and ignore the dots '....'. Which three words occur most often in the coded text above?"  # noqa: E501
FWE_ANSWER = " Answer: In the coded text above, the three most frequent words are:"
ZETA_2 = math.pi**2 / 6  # the Zipf normaliser for alpha = 2


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


@register_task
class CommonWords(ProbeTask):
    name = "cwe"
    aliases = ("common_words_extraction",)
    groups = ("ruler", "ruler_all")
    has_depth = False
    new_tokens = 120  # RULER's tokens_to_generate for cwe
    summary = "A numbered word list where 10 words repeat more often than the rest; list those 10"
    scoring = "string_match_all: the fraction of the 10 common words found in the output"
    source = "RULER cwe (freq_cw 30, freq_ucw 3, num_cw 10; 6/1 below 4096 tokens; one worked example)"
    tolerance = "short of the length by less than one more rare word's entries (3 list entries, 1 below 4096)"

    def make_probe(self, tokenizer, length: int, depth: float | None, seed: int, inputs: TaskInputs) -> Probe:
        # RULER: below 4096 tokens the common words repeat 6 times and the others once (30 and 3 above),
        # and the worked example lists 20 words (40) with frequencies 3 and 1 (10 and 3)
        repeats, (size, *example_repeats) = ((6, 1), (20, 3, 1)) if length < 4096 else ((30, 3), (40, 10, 3))
        rng = random.Random(f"{self.name}-{seed}")
        drawn = shuffled_words(rng, size + COMMON + length)  # k <= length: every entry takes a token
        example = self._example(rng, drawn[:size], *example_repeats)
        words = drawn[size:]

        def build(k: int) -> str:  # k distinct words: the 10 common ones and k - 10 rare ones
            entries = words[:COMMON] * repeats[0] + words[COMMON:k] * repeats[1]
            random.Random(f"{self.name}-{seed}-{repeats}-{k}").shuffle(entries)
            return f"{example}\n{CWE_INTRO}\n{_numbered(entries)}\n{CWE_QUESTION}{CWE_ANSWER}"

        prompt, n, _ = fit_to_budget(
            tokenizer, length, build, task=self.name, low=COMMON, limit=len(words),
            parts="instructions, worked example and 10 words",
        )  # fmt: skip
        common = words[:COMMON]
        return Probe(self.name, prompt, _numbered(common), length, None, n, tuple(common))

    @staticmethod
    def _example(rng: random.Random, words: list[str], common_repeats: int, rare_repeats: int) -> str:
        """A solved instance over ``words`` (the first 10 common), as RULER prepends."""
        entries = words[:COMMON] * common_repeats + words[COMMON:] * rare_repeats
        rng.shuffle(entries)
        return f"{CWE_INTRO}\n{_numbered(entries)}\n{CWE_QUESTION}{CWE_ANSWER} {_numbered(words[:COMMON])}"


@register_task
class FrequentWords(ProbeTask):
    name = "fwe"
    aliases = ("freq_words_extraction",)
    groups = ("ruler", "ruler_all")
    has_depth = False
    new_tokens = 50  # RULER's tokens_to_generate for fwe
    summary = "A coded text of Zipf-distributed six-letter words; name the three most frequent (dots aside)"
    scoring = "string_match_all: the fraction of the 3 most frequent coded words found in the output"
    source = "RULER fwe (alpha 2, six-letter coded words, vocabulary of length // 50, the top word as dots)"
    tolerance = "short of the length by less than the few words one more unit of the Zipf budget adds"

    def make_probe(self, tokenizer, length: int, depth: float | None, seed: int, inputs: TaskInputs) -> Probe:
        vocab = self._vocabulary(random.Random(f"{self.name}-{seed}"), max(8, length // 50))

        def counts(budget: int) -> list[int]:  # RULER: int(budget * k^-alpha / zeta(alpha)) copies of word k
            return [int(budget / (k * k) / ZETA_2) for k in range(1, len(vocab) + 1)]

        def build(budget: int) -> str:
            text = [w for w, c in zip(vocab, counts(budget), strict=True) for _ in range(c)]
            random.Random(f"{self.name}-{seed}-{budget}").shuffle(text)
            return f"{FWE_INTRO} {' '.join(text)}\n{FWE_QUESTION}{FWE_ANSWER}"

        # the answer is only well defined once the 4th word (the 3rd after the dots) outnumbers the 5th
        low = next(b for b in range(1, 10_000) if counts(b)[3] > counts(b)[4])
        prompt, n, _ = fit_to_budget(
            tokenizer, length, build, task=self.name, low=low, parts="instructions and shortest coded text"
        )
        answer = vocab[1:4]
        return Probe(self.name, prompt, " ".join(answer), length, None, n, tuple(answer))

    @staticmethod
    def _vocabulary(rng: random.Random, size: int) -> list[str]:
        """``size`` distinct six-letter coded words, the first of them replaced by dots (noise)."""
        vocab: list[str] = []
        while len(vocab) < size:
            word = "".join(rng.choices(string.ascii_lowercase, k=6))
            vocab += [word] if word not in vocab else []
        return ["...", *vocab[1:]]
