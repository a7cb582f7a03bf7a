"""Where evaluation text comes from: the embedded corpus, local files, or a ``datasets`` dataset.

A source is a string:

- ``kjv`` (default): the embedded King James Bible, no download;
- a path to a ``.txt`` file, or a folder (every ``*.txt`` below it, sorted);
- ``hf:NAME[:CONFIG]:SPLIT:COLUMN`` for a ``datasets`` dataset, e.g. ``hf:pg19::test:text`` (loaded
  with ``datasets.load_dataset``; local dataset folders work offline).
"""

from __future__ import annotations

from pathlib import Path

from ..corpus import CORPORA, load_documents


def load_texts(source: str = "kjv", *, limit: int | None = None) -> list[str]:
    """Documents of ``source`` (at most ``limit`` of them)."""
    if source in CORPORA:
        texts = list(load_documents(source))
    elif source.startswith("hf:"):
        texts = _load_dataset(source)
    else:
        path = Path(source)
        if path.is_dir():
            files = sorted(path.rglob("*.txt"))
            if not files:
                raise FileNotFoundError(f"No .txt files under {path}.")
            texts = [f.read_text(encoding="utf-8") for f in files]
        elif path.is_file():
            texts = [path.read_text(encoding="utf-8")]
        else:
            raise FileNotFoundError(
                f"Unknown text source {source!r}: not an embedded corpus ({', '.join(CORPORA)}), "
                "an existing file or folder, or hf:NAME[:CONFIG]:SPLIT:COLUMN."
            )
    texts = [t for t in texts if t.strip()]
    return texts[:limit] if limit else texts


def _load_dataset(source: str) -> list[str]:
    parts = source[3:].split(":")
    if len(parts) == 3:
        name, split, column = parts
        config = None
    elif len(parts) == 4:
        name, config, split, column = parts
        config = config or None
    else:
        raise ValueError(f"Expected hf:NAME[:CONFIG]:SPLIT:COLUMN, got {source!r}.")
    from datasets import load_dataset

    dataset = load_dataset(name, config, split=split)
    if column not in dataset.column_names:
        raise ValueError(f"Column {column!r} not in {name} ({', '.join(dataset.column_names)}).")
    return [str(t) for t in dataset[column]]


def token_stream(tokenizer, texts: list[str], needed: int) -> list[int]:
    """Token ids of the documents joined by EOS, stopping once ``needed`` tokens are collected."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= needed:
            break
    return ids
