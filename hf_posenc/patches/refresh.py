"""Exact KV-cache refresh for length-dependent rotary schemes (dynamic NTK, LongRoPE).

When the frequencies change with the sequence length, keys already in the cache were rotated (and,
in every layer past the first, computed) under the old frequencies. Re-rotating cached keys fixes the
first layer only. The exact fix is to re-encode the whole prefix whenever the scale changes; this
module wraps the decoder's ``forward`` on the instance to do that, keeping the token history on the
cache object. With a bucketed scale (``bucket_ratio > 1``) refreshes are geometric and amortise to O(n).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._compat import cache_keyword, empty_cache, output_cache
from ..errors import CacheRefreshError
from .handle import PatchHandle
from .rotary import sequence_length

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


def _follow_reorders(cache: Any) -> None:
    """Wrap ``cache.reorder_cache`` (this cache object only, once) so the token history is reordered
    with the cached keys: otherwise a refresh during beam search would replay other beams' tokens."""
    if getattr(cache, "_hf_posenc_follows_reorders", False) or not hasattr(cache, "reorder_cache"):
        return
    original = cache.reorder_cache

    def reorder_cache(beam_idx: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        history = getattr(cache, _STATE_ATTR, None)
        if history is not None:
            history.reorder(beam_idx)
        return original(beam_idx, *args, **kwargs)

    cache.reorder_cache = reorder_cache
    cache._hf_posenc_follows_reorders = True


def needs_cache_refresh(scheme: Any) -> bool:
    """True for length-dependent schemes asked to keep the cache exact (``refresh="exact"``)."""
    return getattr(scheme, "length_dependent", False) and getattr(scheme, "refresh", "none") == "exact"


def install_cache_refresh(decoder: nn.Module, scheme: Any, handle: PatchHandle) -> None:
    """Wrap ``decoder.forward`` (this instance only) so cached decoding re-encodes on a scale change."""
    original = decoder.forward
    signature = inspect.signature(original)
    cache_kw = cache_keyword(original)

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        arguments = bound.arguments
        extra = arguments.pop("kwargs", {})
        cache = arguments.get(cache_kw)
        if cache is None:
            return original(*args, **kwargs)
        input_ids = arguments.get("input_ids")
        inputs_embeds = arguments.get("inputs_embeds")
        new = input_ids if input_ids is not None else inputs_embeds
        batch, length = new.shape[0], new.shape[1]
        past = cache.get_seq_length()
        positions = arguments.get("position_ids")
        if positions is None:
            positions = torch.arange(past, past + length, device=new.device).unsqueeze(0)
        positions = positions.expand(batch, -1)
        bucket = scheme.length_bucket(sequence_length(positions))
        kind, tokens = ("ids", input_ids) if input_ids is not None else ("embeds", inputs_embeds)
        history: _History | None = getattr(cache, _STATE_ATTR, None)

        if past == 0:
            history = _History(bucket=bucket)
            setattr(cache, _STATE_ATTR, history)
            _follow_reorders(cache)
        elif history is None or history.length != past:
            raise CacheRefreshError(
                f"{scheme.name}: this cache holds {past} tokens that hf_posenc did not see (it was filled "
                "before patching or edited outside the model), so it cannot be re-encoded when the "
                "scale changes. Start generation from an empty cache."
            )
        if history.bucket == bucket or past == 0:
            history.append(kind, tokens, positions)
            return original(*args, **kwargs)

        # The scale changed: re-encode the prefix plus the new tokens under the new frequencies.
        history.append(kind, tokens, positions)
        mask = arguments.get("attention_mask")
        if mask is not None and (mask.dim() != 2 or mask.shape[-1] != history.length):
            raise CacheRefreshError(
                f"{scheme.name}: a cache refresh needs a 2D attention_mask covering all "
                f"{history.length} tokens, got shape {tuple(mask.shape)}."
            )
        replay_kind, all_tokens, all_positions = history.replay(self.get_input_embeddings())
        empty_cache(cache)
        arguments["input_ids"] = all_tokens if replay_kind == "ids" else None
        arguments["inputs_embeds"] = all_tokens if replay_kind == "embeds" else None
        arguments["position_ids"] = all_positions
        out = original(**arguments, **extra)
        history.bucket = bucket
        history.refreshes += 1
        if output_cache(out) is not cache:
            raise CacheRefreshError(f"{scheme.name}: the model replaced its cache during a refresh.")
        out.last_hidden_state = out.last_hidden_state[:, -length:]
        if getattr(out, "hidden_states", None) is not None:
            out.hidden_states = tuple(h[:, -length:] for h in out.hidden_states)
        return out

    handle.replace_forward(decoder, forward, signature)


def refresh_count(cache: Any) -> int:
    """How many times a cache was re-encoded (0 for a cache hf_posenc never refreshed)."""
    history = getattr(cache, _STATE_ATTR, None)
    return history.refreshes if history is not None else 0
