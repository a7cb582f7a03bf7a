"""Evaluation text: the documents of a source (see :mod:`hf_posenc.texts`, re-exported here) and the
token stream the perplexity windows are cut from."""

from __future__ import annotations

from ..texts import load_texts

__all__ = ["load_texts", "token_stream"]


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
