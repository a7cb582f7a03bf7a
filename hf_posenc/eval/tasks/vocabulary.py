"""Offline stand-ins for the random words, numbers and UUIDs RULER draws (it uses the ``wonderwords``
package's noun, adjective and verb lists): the lowercase vocabulary of the embedded KJV corpus, then
generated pseudo-words when more are needed. Everything is drawn from a caller's seeded ``Random``."""

from __future__ import annotations

import functools
import itertools
import random
import re
import uuid

from ...corpus import load_documents

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@functools.cache
def corpus_words() -> tuple[str, ...]:
    """The distinct words of 4 to 10 letters the KJV writes in lowercase (about 8,000), sorted."""
    text = " ".join(load_documents("kjv"))
    return tuple(sorted({w for w in re.findall(r"(?<![A-Za-z'-])[a-z]{4,10}(?![A-Za-z'-])", text)}))


def pseudo_words():
    """Endless distinct pronounceable non-words (``babada``, ``babade``, ...), none of them a corpus word."""
    real = set(corpus_words())
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    for n in itertools.count(3):
        for parts in itertools.product(syllables, repeat=n):
            word = "".join(parts)
            if word not in real:
                yield word


def shuffled_words(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct words: the corpus vocabulary in ``rng``'s order, then pseudo-words."""
    words = list(corpus_words())
    rng.shuffle(words)
    if count > len(words):
        words += itertools.islice(pseudo_words(), count - len(words))
    return words[:count]


def random_key(rng: random.Random) -> str:
    """A two-word key such as ``harvest-lantern`` (RULER's keys are adjective-noun pairs)."""
    words = corpus_words()
    return f"{rng.choice(words)}-{rng.choice(words)}"


def random_number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def random_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))
