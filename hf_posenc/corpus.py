"""The embedded real-text corpus (King James Bible, public domain), so evaluation needs no download."""

from __future__ import annotations

import functools
import lzma
import re
from importlib import resources

from .errors import InvalidParameterError

_REFERENCE = re.compile(r"^(?P<book>[1-3]?[A-Za-z]+)(?P<chapter>\d+):(?P<verse>\d+) (?P<text>.*)$")
CORPORA = ("kjv",)


@functools.cache
def load_documents(name: str = "kjv") -> tuple[str, ...]:
    """The corpus as documents (one per book of the KJV), verse references stripped."""
    if name not in CORPORA:
        raise InvalidParameterError(f"Unknown embedded corpus {name!r}; available: {', '.join(CORPORA)}.")
    raw = lzma.decompress(resources.files("hf_posenc.data").joinpath(f"{name}.txt.xz").read_bytes())
    books: dict[str, list[str]] = {}
    for line in raw.decode("utf-8").splitlines():
        match = _REFERENCE.match(line.strip())
        if match:
            books.setdefault(match["book"], []).append(match["text"].strip())
    return tuple(" ".join(verses) for verses in books.values())


def load_corpus(name: str = "kjv") -> str:
    """The whole corpus as one text, documents separated by blank lines."""
    return "\n\n".join(load_documents(name))
