"""Exact KV-cache refresh for length-dependent rotary schemes (dynamic NTK, LongRoPE).

When the frequencies change with the sequence length, keys already in the cache were rotated (and,
in every layer past the first, computed) under the old frequencies. Re-rotating cached keys fixes the
first layer only. The exact fix is to re-encode the whole prefix whenever the scale changes; this
module wraps the decoder's ``forward`` on the instance to do that, keeping the token history on the
cache object. With a bucketed scale (``bucket_ratio > 1``) refreshes are geometric and amortise to O(n).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._compat import cache_keyword, empty_cache, output_cache
from ..errors import CacheRefreshError
from .handle import PatchHandle
from .rotary import sequence_length
from .wrappers import BoundCall, ForwardWrapper

_STATE_ATTR = "_hf_posenc_history"


@dataclass
class _History:
    """Tokens (ids or embeddings, in chunks) and positions of everything in the cache."""

    bucket: Any
    chunks: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    positions: list[torch.Tensor] = field(default_factory=list)
    length: int = 0
    refreshes: int = 0

    def append(self, kind: str, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        self.chunks.append((kind, tokens))
        self.positions.append(positions)
        self.length += positions.shape[-1]

    def reorder(self, index: torch.Tensor) -> None:
        """Follow the cache's rows when beam search reorders them."""
        self.chunks = [(kind, t.index_select(0, index.to(t.device))) for kind, t in self.chunks]
        self.positions = [p.index_select(0, index.to(p.device)) for p in self.positions]

    def replay(self, embed: nn.Module) -> tuple[str, torch.Tensor, torch.Tensor]:
        if all(kind == "ids" for kind, _ in self.chunks):
            tokens = torch.cat([t for _, t in self.chunks], dim=1)
            kind = "ids"
        else:
            tokens = torch.cat([t if k == "embeds" else embed(t) for k, t in self.chunks], dim=1)
            kind = "embeds"
        return kind, tokens, torch.cat(self.positions, dim=-1)


class _ReorderWithHistory:
    """``cache.reorder_cache`` of one cache object: reorders the token history with the cached keys, so
    a refresh during beam search replays each beam's own tokens."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache
        self.inner = cache.reorder_cache

    def __call__(self, beam_idx: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        history = getattr(self.cache, _STATE_ATTR, None)
        if history is not None:
            history.reorder(beam_idx)
        return self.inner(beam_idx, *args, **kwargs)


def _track(cache: Any, history: _History) -> None:
    """Keep ``history`` on ``cache`` (and follow its reorders)."""
    setattr(cache, _STATE_ATTR, history)
    if hasattr(cache, "reorder_cache") and not isinstance(cache.reorder_cache, _ReorderWithHistory):
        cache.reorder_cache = _ReorderWithHistory(cache)


def _require_dynamic(cache: Any, scheme: Any) -> None:
    """A refresh empties the cache and re-encodes the prefix: only dynamic layers can hold that."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None or not all(isinstance(layer, DynamicLayer) for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers or ()}) or ["no layers"]
        raise CacheRefreshError(
            f"{scheme.name} with refresh='exact' needs a dynamic KV cache (DynamicCache, the default of "
            f"forward() and generate()); got {type(cache).__name__} with {', '.join(kinds)}, which cannot be "
            "re-encoded when the scale changes. Use the default cache, or patch with refresh='none' "
            "(transformers' stale-cache behaviour)."
        )


def needs_cache_refresh(scheme: Any) -> bool:
    """True for length-dependent schemes asked to keep the cache exact (``refresh="exact"``)."""
    return getattr(scheme, "length_dependent", False) and getattr(scheme, "refresh", "none") == "exact"


class CacheRefreshForward(ForwardWrapper):
    """The decoder's forward for a length-dependent scheme: re-encodes the cached prefix whenever the
    scale changes during cached decoding. The history of cached tokens lives on the cache object, so
    a cache is tracked however it came into being: passed by the caller or by ``generate``, or created
    by the model inside a first ``use_cache=True`` call. ``pinned_length``: as on the rotary module
    (a sharded step's global length), so shards of one sequence share one scale and never refresh."""

    pinned_length: int | None = None

    def __init__(self, decoder: nn.Module, scheme: Any) -> None:
        super().__init__(decoder)
        self.scheme = scheme
        self.cache_kw = cache_keyword(self.inner_forward())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        scheme = self.scheme
        call = BoundCall(self, args, kwargs)
        cache = call.get(self.cache_kw)
        input_ids = call.get("input_ids")
        inputs_embeds = call.get("inputs_embeds")
        new = input_ids if input_ids is not None else inputs_embeds
        batch, length = new.shape[0], new.shape[1]
        past = cache.get_seq_length() if cache is not None else 0
        positions = call.get("position_ids")
        if positions is None:
            positions = torch.arange(past, past + length, device=new.device).unsqueeze(0)
        positions = positions.expand(batch, -1)
        bucket = scheme.length_bucket(sequence_length(positions, self.pinned_length))
        kind, tokens = ("ids", input_ids) if input_ids is not None else ("embeds", inputs_embeds)
        if cache is None:  # the model may create a cache inside this call: track it if it does
            out = self.call_inner(**call.kwargs())
            created = output_cache(out)
            if created is not None and getattr(created, _STATE_ATTR, None) is None:
                try:
                    _require_dynamic(created, scheme)
                except CacheRefreshError as exc:  # e.g. a hybrid model's cache: fine unless decoding continues
                    created._hf_posenc_untracked = str(exc)
                    return out
                history = _History(bucket=bucket)
                history.append(kind, tokens, positions)
                _track(created, history)
            return out
        history: _History | None = getattr(cache, _STATE_ATTR, None)
        if past == 0:
            _require_dynamic(cache, scheme)
            history = _History(bucket=bucket)
            _track(cache, history)
        elif history is None and getattr(cache, "_hf_posenc_untracked", None):
            raise CacheRefreshError(cache._hf_posenc_untracked)
        elif history is None or history.length != past:
            raise CacheRefreshError(
                f"{scheme.name}: this cache holds {past} tokens that hf_posenc did not see (it was filled "
                "before patching or edited outside the model), so it cannot be re-encoded when the "
                "scale changes. Start generation from an empty cache."
            )
        if history.bucket == bucket or past == 0:
            history.append(kind, tokens, positions)
            return self.call_inner(**call.kwargs())

        # The scale changed: re-encode the prefix plus the new tokens under the new frequencies.
        history.append(kind, tokens, positions)
        mask = call.get("attention_mask")
        if mask is not None and (mask.dim() != 2 or mask.shape[-1] != history.length):
            raise CacheRefreshError(
                f"{scheme.name}: a cache refresh needs a 2D attention_mask covering all "
                f"{history.length} tokens, got shape {tuple(mask.shape)}."
            )
        replay_kind, all_tokens, all_positions = history.replay(self.module.get_input_embeddings())
        empty_cache(cache)
        call.set("input_ids", all_tokens if replay_kind == "ids" else None)
        call.set("inputs_embeds", all_tokens if replay_kind == "embeds" else None)
        call.set("position_ids", all_positions)
        out = self.call_inner(**call.kwargs())
        history.bucket = bucket
        history.refreshes += 1
        if output_cache(out) is not cache:
            raise CacheRefreshError(f"{scheme.name}: the model replaced its cache during a refresh.")
        out.last_hidden_state = out.last_hidden_state[:, -length:]
        if getattr(out, "hidden_states", None) is not None:
            out.hidden_states = tuple(h[:, -length:] for h in out.hidden_states)
        return out


def install_cache_refresh(decoder: nn.Module, scheme: Any, handle: PatchHandle) -> None:
    """Wrap ``decoder.forward`` (this instance only) so cached decoding re-encodes on a scale change."""
    CacheRefreshForward(decoder, scheme).install(handle)


def refresh_count(cache: Any) -> int:
    """How many times a cache was re-encoded (0 for a cache hf_posenc never refreshed)."""
    history = getattr(cache, _STATE_ATTR, None)
    return history.refreshes if history is not None else 0
