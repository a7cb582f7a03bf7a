"""Where text comes from, for evaluation and training alike: the embedded corpus, local files, or a
``datasets`` dataset.

A source is a string:

- ``kjv`` (default): the embedded King James Bible, no download;
- a path to a ``.txt`` file, or a folder (every ``*.txt`` below it, sorted);
- ``hf:NAME[:CONFIG]:SPLIT:COLUMN`` for a ``datasets`` dataset, e.g. ``hf:pg19::test:text`` (loaded
  with ``datasets.load_dataset``; local dataset folders work offline).
"""

from __future__ import annotations

from pathlib import Path

from .corpus import CORPORA, load_documents
from .errors import InvalidParameterError, SourceNotFoundError

HF_FORMAT = "hf:NAME[:CONFIG]:SPLIT:COLUMN"


def load_texts(source: str = "kjv", *, limit: int | None = None) -> list[str]:
    """Documents of ``source`` (at most ``limit`` of them)."""
    if source in CORPORA:
        texts = list(load_documents(source))
    elif source.startswith("hf:"):
        texts = _load_dataset(source)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(path.rglob("*.txt"))
            if not files:
                raise SourceNotFoundError(f"No .txt files under {path}.")
            texts = [_read_text(f) for f in files]
        elif path.is_file():
            texts = [_read_text(path)]
        else:
            raise SourceNotFoundError(
                f"Unknown text source {source!r}: not an embedded corpus ({', '.join(CORPORA)}), "
                f"an existing file or folder, or {HF_FORMAT}."
            )
    texts = [t for t in texts if t.strip()]
    return texts[:limit] if limit else texts


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidParameterError(
            f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); text sources must be UTF-8 .txt "
            "files (convert it, e.g. with iconv, or point at another file)."
        ) from exc


def parse_hf_source(source: str, fields: tuple[str, ...] = ("SPLIT", "COLUMN"), flag: str = "") -> list:
    """``hf:NAME[:CONFIG]:<fields>`` as ``[name, config or None, *fields]``; an error naming the format."""
    fmt = ":".join(["hf:NAME[:CONFIG]", *fields])
    parts = source[3:].split(":")
    if len(parts) == len(fields) + 1:
        parts.insert(1, "")
    if len(parts) != len(fields) + 2:
        raise InvalidParameterError(f"Expected {flag}{fmt}, got {source!r}.")
    if not all(parts[:1] + parts[2:]):
        names = ", ".join(["NAME", *fields[:-1]]) + f" and {fields[-1]}"
        raise InvalidParameterError(f"Expected {flag}{fmt} with {names} set, got {source!r}.")
    return [parts[0], parts[1] or None, *parts[2:]]


def _load_dataset(source: str) -> list[str]:
    name, config, split, column = parse_hf_source(source)
    from datasets import load_dataset

    dataset = load_dataset(name, config, split=split)
    if column not in dataset.column_names:
        raise InvalidParameterError(f"Column {column!r} not in {name} ({', '.join(dataset.column_names)}).")
    return [str(t) for t in dataset[column]]
