"""Token-level negative log-likelihood without materialising full-vocabulary logits for a long window.

The decoder runs once over the window; the LM head and the loss then run over chunks of positions,
so a 16k-token window never holds a 16k x vocab fp32 tensor. This equals the model's own loss for
causal LMs whose head is a plain projection (LLaMA, GPT-2 and BLOOM families); see the tests.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidParameterError


def _decoder(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_decoder", None)
    decoder = get() if get is not None else None
    return decoder if decoder is not None else model.base_model


@torch.inference_mode()
def token_nll(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """NLL (nats) of tokens ``1..L-1`` of each row given their prefix: shape ``(B, L-1)``, fp32.

    With an ``attention_mask`` (1 = token, 0 = padding, left or right), a position is scored only when
    both the token and the one predicting it are real; the others are NaN. Real tokens get the
    positions they would have unpadded (counted from the row's first real token), as in ``generate``.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise InvalidParameterError(f"input_ids must be (batch, length >= 2), got {tuple(input_ids.shape)}.")
    if chunk_size < 1:
        raise InvalidParameterError(f"chunk_size must be >= 1, got {chunk_size}.")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise InvalidParameterError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(attention_mask.shape)}."
        )
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    decoder = _decoder(model)
    kwargs: dict = {}
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
        kwargs["attention_mask"] = attention_mask
        if _accepts(decoder, "position_ids"):  # BLOOM's ALiBi reads the mask itself
            position_ids = attention_mask.long().cumsum(-1) - 1
            kwargs["position_ids"] = position_ids.masked_fill(attention_mask == 0, 1)
    hidden = decoder(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state
    head = model.get_output_embeddings()
    targets = input_ids[:, 1:]
    out = torch.empty(targets.shape, dtype=torch.float32, device=device)
    for start in range(0, targets.shape[1], chunk_size):
        stop = min(start + chunk_size, targets.shape[1])
        logits = head(hidden[:, start:stop]).float()
        flat = F.cross_entropy(logits.flatten(0, 1), targets[:, start:stop].flatten(), reduction="none")
        out[:, start:stop] = flat.view(logits.shape[0], -1)
    if attention_mask is not None:
        scored = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
        out = out.masked_fill(~scored, math.nan)
    return out


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def perplexity(model: nn.Module, input_ids: torch.Tensor, **kwargs) -> float:
    """``exp`` of the mean token NLL over every predicted token of every row (with an ``attention_mask``:
    every real token predicted from a real one; padding is never scored)."""
    nll = token_nll(model, input_ids, **kwargs)
    mask = kwargs.get("attention_mask")
    if mask is not None:  # not nll.isnan(): a NaN the model produced must show, not vanish
        nll = nll[(mask[:, 1:].bool() & mask[:, :-1].bool()).to(nll.device)]
    scored = nll.flatten()
    if scored.numel() == 0:
        raise InvalidParameterError("No token to score: every row has fewer than 2 real tokens.")
    return math.exp(scored.double().mean().item())


@dataclass(frozen=True)
class Window:
    """Tokens ``[start, end)`` go in; targets ``[first_scored, end)`` are scored (each predicted from
    the tokens before it inside the window)."""

    start: int
    end: int
    first_scored: int


def window_spans(n_tokens: int, length: int, stride: int | None = None, max_windows: int | None = None) -> list[Window]:
    """Windows over a token stream of ``n_tokens``.

    Non-overlapping (``stride`` None or equal to ``length``): windows ``[kL, (k+1)L)``; every token but
    the window's first is scored, with 0..L-2 tokens of context. Sliding (``stride < length``): windows
    start every ``stride`` tokens; the first scores all its tokens, each later one only the tokens no
    earlier window scored (its last ``stride``), so every token past the first is scored exactly once
    with at least ``length - stride`` tokens of context. Only full windows are used.
    """
    if length < 2:
        raise InvalidParameterError(f"window length must be >= 2 tokens, got {length}.")
    stride = length if stride is None else stride
    if not 0 < stride <= length:
        raise InvalidParameterError(
            f"stride must be in [1, length], got stride={stride} for length {length} "
            "(omit it for non-overlapping windows)."
        )
    if max_windows is not None and max_windows < 1:
        raise InvalidParameterError(f"max_windows must be >= 1 (or None for all), got {max_windows}.")
    windows: list[Window] = []
    scored_until = 1  # token 0 has no context
    start = 0
    while start + length <= n_tokens and (max_windows is None or len(windows) < max_windows):
        end = start + length
        windows.append(Window(start, end, max(scored_until, start + 1)))
        scored_until = end
        start += stride
    return windows


@dataclass
class PerplexityResult:
    length: int
    stride: int
    windows: int
    tokens_scored: int
    nll: float
    ppl: float
    bucket_size: int
    position_loss: list[float] = field(default_factory=list)  # mean loss per position bucket

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_perplexity(
    model: nn.Module | None,
    token_ids: list[int] | torch.Tensor,
    length: int,
    *,
    stride: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 1,
    buckets: int = 16,
    chunk_size: int = 1024,
    progress: bool = False,
    nll_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> PerplexityResult:
    """Perplexity at window ``length`` over a token stream, with the per-position loss curve.

    Windows are batched (``batch_size`` per forward); the LM head runs in chunks so no full
    ``length x vocab`` fp32 tensor is held per window. The position curve averages the loss at each
    in-window position (bucketed) over the scored tokens of each window. ``nll_fn`` maps a batch of
    windows ``(B, length)`` to their NLLs ``(B, length - 1)`` in place of the model (another engine).
    """
    from tqdm.auto import tqdm

    if batch_size < 1 or buckets < 1 or chunk_size < 1:
        raise InvalidParameterError(
            f"batch_size, buckets and chunk_size must be >= 1, got {batch_size}, {buckets}, {chunk_size}."
        )
    tokens = torch.as_tensor(token_ids, dtype=torch.long)
    spans = window_spans(tokens.numel(), length, stride, max_windows)
    if not spans:
        raise InvalidParameterError(
            f"The text has {tokens.numel()} tokens: too few for one window of {length}. "
            "Use a longer text or shorter lengths."
        )
    bucket_size = max(1, -(-length // buckets))
    sums = torch.zeros(-(-length // bucket_size), dtype=torch.float64)
    counts = torch.zeros_like(sums)
    total, scored = 0.0, 0
    for i in tqdm(range(0, len(spans), batch_size), desc=f"ppl@{length}", disable=not progress, leave=False):
        batch = spans[i : i + batch_size]
        windows = torch.stack([tokens[w.start : w.end] for w in batch])
        nll = nll_fn(windows) if nll_fn is not None else token_nll(model, windows, chunk_size=chunk_size)
        for row, w in zip(nll.double().cpu(), batch, strict=True):
            values = row[w.first_scored - w.start - 1 :]  # row[j] predicts window position j + 1
            positions = torch.arange(w.first_scored - w.start, length)
            total += values.sum().item()
            scored += values.numel()
            sums.index_add_(0, positions // bucket_size, values)
            counts.index_add_(0, positions // bucket_size, torch.ones_like(values))
    curve = torch.where(counts > 0, sums / counts.clamp(min=1), torch.nan)
    mean = total / scored
    return PerplexityResult(
        length=length,
        stride=stride or length,
        windows=len(spans),
        tokens_scored=scored,
        nll=mean,
        ppl=math.exp(mean),
        bucket_size=bucket_size,
        position_loss=[float(v) for v in curve],
    )
