"""The properties every patched model must keep, as checks the test modules share (no tests here).

Each ``check_*`` takes a patched model, runs it, and fails with the worst difference it found: cached
decoding equals a fresh forward, a left-padded row equals the row alone, packed documents equal separate
ones, relative schemes ignore a shift of every position, NoPE ignores positions altogether.
"""

from __future__ import annotations

import torch
from conftest import cache_kwargs, max_diff, out_cache, tiny_model, tokens
from transformers import DynamicCache

import hf_posenc


def logits(model, x: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(x, **kw).logits


def patched_model(arch: str, scheme: str, params: dict, backend: str | None = None, **overrides):
    """A tiny model of ``arch`` patched with ``scheme`` on attention ``backend``."""
    model = tiny_model(arch, attn="eager" if arch == "bloom" else "sdpa", **overrides)
    hf_posenc.patch(model, scheme, attn_implementation=backend, **params)
    return model


def check_cache_decode(model, prompt: int, total: int, *, tol: float = 1e-5, batch: int = 2, seed: int = 3) -> float:
    """Feed ``total - prompt`` tokens one at a time through a cache the test owns; each step's logits
    equal a fresh forward of the same prefix. Returns the worst difference."""
    x = tokens(batch, total, seed=seed)
    cache = DynamicCache(config=model.config)
    worst = 0.0
    with torch.no_grad():
        out = model(x[:, :prompt], use_cache=True, **cache_kwargs(model, cache))
        assert out_cache(out) is cache
        for t in range(prompt, total):
            step = model(x[:, t : t + 1], use_cache=True, **cache_kwargs(model, cache)).logits[:, -1]
            fresh = model(x[:, : t + 1], use_cache=False).logits[:, -1]
            worst = max(worst, max_diff(step, fresh))
    assert worst <= tol, f"cached decode differs from a fresh forward by {worst}"
    return worst


def check_model_made_cache_decode(model, x: torch.Tensor, prompt: int, *, tol: float = 1e-4) -> None:
    """Cached decoding from the cache the model creates itself (``use_cache=True`` with no cache): the
    last step equals a fresh forward of the whole input."""
    with torch.no_grad():
        cache = out_cache(model(x[:, :prompt], use_cache=True))
        for t in range(prompt, x.shape[1]):
            step = model(x[:, t : t + 1], use_cache=True, **cache_kwargs(model, cache))
            cache = out_cache(step)
        fresh = model(x, use_cache=False).logits[:, -1]
    assert max_diff(step.logits[:, -1], fresh) <= tol


def left_pad(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


def check_left_padding(model, rows: list[torch.Tensor], *, positions: bool = True, tol: float = 1e-5) -> None:
    """A left-padded batch equals each row alone. ``positions``: pass ``position_ids`` counted from the
    first real token (BLOOM takes none). Length-dependent schemes scale a batch by its longest row, as
    transformers does: give them rows that all stay on one side of the original context."""
    ids, mask = left_pad(rows)
    kw = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)} if positions else {}
    padded = logits(model, ids, attention_mask=mask, **kw)
    for i, r in enumerate(rows):
        assert max_diff(padded[i, -len(r) :], logits(model, r[None])[0]) <= tol, f"row {i}"


def check_packing(model, docs: list[torch.Tensor], *, tol: float = 1e-5) -> None:
    """Documents packed in one row, positions restarting per document, equal each document alone."""
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    out = logits(model, torch.cat(docs)[None], position_ids=position_ids, use_cache=False)
    start = 0
    for d in docs:
        assert max_diff(out[0, start : start + len(d)], logits(model, d[None], use_cache=False)[0]) <= tol
        start += len(d)


def check_shift_invariance(model, length: int = 40, shift: int = 17, *, tol: float = 1e-4) -> None:
    """A relative scheme's output ignores adding ``shift`` to every position."""
    x = tokens(1, length)
    base = torch.arange(length)[None]
    assert max_diff(logits(model, x, position_ids=base), logits(model, x, position_ids=base + shift)) <= tol


def check_position_free(model, length: int = 40) -> None:
    """NoPE: any position ids give bitwise the same output."""
    x = tokens(2, length)
    shuffled = torch.randint(0, 10_000, (2, length), generator=torch.Generator().manual_seed(9))
    assert torch.equal(logits(model, x), logits(model, x, position_ids=shuffled))
