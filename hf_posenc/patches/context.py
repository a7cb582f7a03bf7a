"""Per-forward position bookkeeping for families whose attention does not see position ids.

The decoder's ``forward`` is wrapped on the instance: on every call (prefill, decode step, or a cache
refresh replay) it works out the position of each new token and stores it on a
:class:`PositionContext` that the installed pieces (q/k rotation, absolute embeddings) read. It can
also add an absolute position embedding to the input embeddings, for families that have none.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._compat import cache_keyword
from .handle import PatchHandle


@dataclass
class PositionContext:
    """Positions ``(B, L)`` of the tokens of the latest decoder forward, and their rotary tables.

    Kept after the forward returns, so gradient checkpointing's recomputation in backward reads the
    same values as the forward it belongs to.
    """

    positions: torch.Tensor | None = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    #: position_ids given to the outer model whose forward does not pass them on (BLOOM's CausalLM)
    pending: torch.Tensor | None = None


def infer_positions(
    arguments: dict[str, Any], cache_kw: str, *, from_mask: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Positions of the new tokens: given ``position_ids``; else, if ``from_mask``, from the 2D
    attention mask (left padding, as generate() does); else ``arange(past, past + L)`` as transformers."""
    input_ids = arguments.get("input_ids")
    embeds = arguments.get("inputs_embeds")
    new = input_ids if input_ids is not None else embeds
    batch, length = new.shape[0], new.shape[1]
    extra = arguments.get("kwargs") or {}
    given = arguments.get("position_ids", extra.get("position_ids"))
    if given is not None:
        return given.expand(batch, -1), new
    cache = arguments.get(cache_kw)
    past = cache.get_seq_length() if cache is not None else 0
    mask = arguments.get("attention_mask")
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


def install_position_context(
    decoder: nn.Module,
    handle: PatchHandle,
    *,
    from_mask: bool = False,
    embed_positions: nn.Module | None = None,
    rotary: nn.Module | None = None,
    packed_mask: bool = False,
    outer: nn.Module | None = None,
) -> PositionContext:
    """Wrap ``decoder.forward`` to fill a :class:`PositionContext`.

    ``embed_positions`` (positions -> (B, L, hidden)) is added to the input embeddings; ``rotary``
    (a :class:`PosencRotaryEmbedding`) has its (cos, sin) computed once per forward for all layers.
    ``packed_mask``: when ``position_ids`` restart with no attention mask and no cache (``use_cache=False``),
    pass a block-causal 4D mask (transformers builds none for families like BLOOM and OPT).
    ``outer``: the model around the decoder, when its forward drops ``position_ids`` (a pre-hook on it
    hands them to the decoder's wrapper).
    """
    token_embeddings = decoder.get_input_embeddings()
    context = PositionContext()
    original = decoder.forward
    signature = inspect.signature(original)
    cache_kw = cache_keyword(original)

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        pending, context.pending = context.pending, None
        if pending is not None and bound.arguments.get("position_ids") is None:
            bound.arguments.setdefault("kwargs", {})["position_ids"] = pending
        positions, new = infer_positions(bound.arguments, cache_kw, from_mask=from_mask)
        context.positions = positions
        if rotary is not None:
            reference = new if new.is_floating_point() else token_embeddings.weight
            context.cos, context.sin = rotary(reference, positions)
        arguments = bound.arguments
        changed = False
        use_cache = arguments.get("use_cache")
        use_cache = getattr(self.config, "use_cache", False) if use_cache is None else use_cache
        # as transformers does for the families it handles: packing only without a mask and without a cache
        no_cache = arguments.get(cache_kw) is None and not use_cache
        if packed_mask and arguments.get("attention_mask") is None and no_cache:
            dtype = token_embeddings.weight.dtype
            mask = packed_causal_mask(positions, dtype if dtype.is_floating_point else torch.float32)
            if mask is not None:
                arguments["attention_mask"] = mask
                if "position_ids" in signature.parameters:  # a 4D mask cannot stand in for positions
                    arguments["position_ids"] = positions
                changed = True
        if embed_positions is not None:
            changed = True
            if arguments.get("inputs_embeds") is None:
                arguments["inputs_embeds"] = token_embeddings(arguments["input_ids"])
                arguments["input_ids"] = None
            embeds = arguments["inputs_embeds"]
            arguments["inputs_embeds"] = embeds + embed_positions(positions).to(embeds.dtype)
        if changed:
            extra = arguments.pop("kwargs", {})
            return original(**arguments, **extra)
        return original(*args, **kwargs)

    handle.replace_forward(decoder, forward, signature)
    if outer is not None and outer is not decoder:

        def capture(module: nn.Module, args: Any, kwargs: dict) -> None:
            context.pending = kwargs.get("position_ids")

        handle.add_hook(outer.register_forward_pre_hook(capture, with_kwargs=True))
    return context
