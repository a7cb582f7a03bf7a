"""Per-forward position handling for families whose attention does not see position ids.

:class:`DecoderPositions` is installed as the decoder's ``forward`` on the instance: on every call
(prefill, decode step, or a cache refresh replay) it works out the position of each new token, can add
an absolute position embedding to the input embeddings, builds the block-causal mask of packed
sequences for families that build none, and computes the rotary ``(cos, sin)`` once for every layer.
That per-call :class:`PositionState` lives in a context variable for the duration of the call only
(see :mod:`.wrappers`), so threads never share it; pieces that run again in backward (gradient
checkpointing recomputes a layer after the forward returned) take their positions from the layer's
own arguments instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._compat import cache_keyword
from .handle import PatchHandle
from .wrappers import BoundCall, ForwardWrapper, call_with_state, current_state


@dataclass
class PositionState:
    """Positions ``(B, L)`` of the tokens of one decoder call, and their rotary tables (or None)."""

    positions: torch.Tensor
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None


def infer_positions(call: BoundCall, cache_kw: str, *, from_mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the new tokens: given ``position_ids``; else, if ``from_mask``, from the 2D
    attention mask (left padding, as generate() does); else ``arange(past, past + L)`` as transformers.
    Also returns the new tokens (ids or embeddings)."""
    input_ids = call.get("input_ids")
    new = input_ids if input_ids is not None else call.get("inputs_embeds")
    batch, length = new.shape[0], new.shape[1]
    given = call.get("position_ids")
    if given is not None:
        return given.expand(batch, -1), new
    cache = call.get(cache_kw)
    past = cache.get_seq_length() if cache is not None else 0
    mask = call.get("attention_mask")
    if from_mask and mask is not None and mask.dim() == 2:
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
        return positions.to(new.device), new
    return torch.arange(past, past + length, device=new.device).unsqueeze(0).expand(batch, -1), new


def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) booleans: where a packed document starts (a position that is not its predecessor + 1).
    The first token of a row is never marked; callers treat it as a start."""
    return torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1


def packed_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive (B, 1, L, L) block-causal mask for packed sequences (``position_ids`` restarting), or None
    when nothing restarts. For families whose forward cannot pass position ids to mask creation."""
    starts = document_starts(position_ids)
    if not bool(starts[:, 1:].any()):
        return None
    doc = starts.cumsum(-1)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (doc[:, :, None] == doc[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


class OuterPositionIds(ForwardWrapper):
    """For a model whose forward drops ``position_ids`` (BLOOM's CausalLM): holds them for the
    decoder's :class:`DecoderPositions` during this call."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return call_with_state(self, kwargs.get("position_ids"), self.call_inner, *args, **kwargs)


class DecoderPositions(ForwardWrapper):
    """The decoder's forward, computing this call's positions (see the module docstring).

    Attributes name the decoder's submodules (looked up at call time, so peft's wrappers and
    ``set_input_embeddings`` are honoured):

    - ``embed_attr``: a module mapping positions to (B, L, hidden), added to the input embeddings;
    - ``rotary_attr``: a rotary module whose (cos, sin) are computed once per call;
    - ``packed_mask``: build a block-causal 4D mask when ``position_ids`` restart with no mask and no cache;
    - ``pass_positions``: hand the computed ``position_ids`` to the wrapped forward (so layers receive
      the very tensor the rotary tables were computed for);
    - ``explicit_mask``: always pass an attention mask (BLOOM then calls ``build_alibi_tensor``, which
      hf_posenc uses to hand every layer this call's state).
    """

    def __init__(
        self,
        decoder: nn.Module,
        *,
        from_mask: bool = False,
        embed_attr: str | None = None,
        rotary_attr: str | None = None,
        packed_mask: bool = False,
        pass_positions: bool = False,
        explicit_mask: bool = False,
        outer: OuterPositionIds | None = None,
    ) -> None:
        super().__init__(decoder)
        self.from_mask = from_mask
        self.embed_attr = embed_attr
        self.rotary_attr = rotary_attr
        self.packed_mask = packed_mask
        self.pass_positions = pass_positions
        self.explicit_mask = explicit_mask
        self.outer = outer
        self.cache_kw = cache_keyword(self.inner_forward())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        decoder = self.module
        call = BoundCall(self, args, kwargs)
        pending = current_state(self.outer) if self.outer is not None else None
        if pending is not None and call.get("position_ids") is None:
            call.set("position_ids", pending)
        positions, new = infer_positions(call, self.cache_kw, from_mask=self.from_mask)
        state = PositionState(positions)
        token_embeddings = decoder.get_input_embeddings()
        if self.rotary_attr is not None:
            reference = new if new.is_floating_point() else token_embeddings.weight
            state.cos, state.sin = getattr(decoder, self.rotary_attr)(reference, positions)
        if self.pass_positions:
            call.set("position_ids", positions)
        use_cache = call.get("use_cache")
        use_cache = getattr(decoder.config, "use_cache", False) if use_cache is None else use_cache
        cache = call.get(self.cache_kw)
        # as transformers does for the families it handles: packing only without a mask and without a cache
        if self.packed_mask and call.get("attention_mask") is None and cache is None and not use_cache:
            dtype = token_embeddings.weight.dtype
            mask = packed_causal_mask(positions, dtype if dtype.is_floating_point else torch.float32)
            if mask is not None:
                call.set("attention_mask", mask)
                if "position_ids" in call.parameters:  # a 4D mask cannot stand in for positions
                    call.set("position_ids", positions)
        if self.explicit_mask and call.get("attention_mask") is None:
            past = cache.get_seq_length() if cache is not None else 0
            call.set("attention_mask", torch.ones(new.shape[0], past + new.shape[1], device=new.device))
        if self.embed_attr is not None:
            embeds = call.get("inputs_embeds")
            if embeds is None:
                embeds = token_embeddings(call.get("input_ids"))
                call.set("input_ids", None)
            call.set("inputs_embeds", embeds + getattr(decoder, self.embed_attr)(positions).to(embeds.dtype))
        return call_with_state(self, state, self.call_inner, **call.kwargs())


def install_position_context(
    decoder: nn.Module,
    handle: PatchHandle,
    *,
    outer: nn.Module | None = None,
    **options: Any,
) -> DecoderPositions:
    """Install :class:`DecoderPositions` on ``decoder`` (options: see its docstring). ``outer``: the
    model around the decoder, when its forward drops ``position_ids``."""
    outer_wrapper = None
    if outer is not None and outer is not decoder:
        outer_wrapper = OuterPositionIds(outer)
        outer_wrapper.install(handle)
    wrapper = DecoderPositions(decoder, outer=outer_wrapper, **options)
    wrapper.install(handle)
    return wrapper
