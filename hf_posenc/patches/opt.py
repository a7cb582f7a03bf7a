"""OPT: a learned table with a 2-row offset (``decoder.embed_positions``), positions from the mask.

Same plan as GPT-2: absolute schemes and NoPE replace the table; RoPE zeroes it and rotates the
outputs of ``q_proj`` and ``k_proj`` (forward hooks; the cache then holds rotated keys); ALiBi zeroes
it and routes attention through hf_posenc's registered backends.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..schemes.absolute import extend_table
from ..schemes.base import ModelInfo, SchemeConfig
from .base import ArchitectureAdapter, register_architecture
from .common import (
    RefillOriginalRows,
    absolute_module,
    add_alibi_slopes,
    choose_backend,
    install_rotary_context,
    is_flash,
    positional_family_info,
    set_backend,
)
from .context import install_position_context
from .embeddings import LearnedPositions, keep_retired_table
from .handle import PatchHandle

OFFSET = 2  # OPT reserves the first two rows of its table


def opt_positions(attention_mask: torch.Tensor, cache_length: int, position_ids: torch.Tensor | None) -> torch.Tensor:
    if position_ids is None:
        position_ids = (torch.cumsum(attention_mask, dim=1) * attention_mask - 1).long()[:, cache_length:]
    return position_ids


class OPTPositions(nn.Module):
    """OPT's ``embed_positions`` call signature over any position module (zero, sinusoidal)."""

    def __init__(self, inner: nn.Module, retired: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        keep_retired_table(self, retired)

    def forward(self, attention_mask, cache_length: int = 0, position_ids=None) -> torch.Tensor:
        return self.inner(opt_positions(attention_mask, cache_length, position_ids))


class OPTLearnedPositions(LearnedPositions):
    """A resized OPT table that keeps OPT's layout (offset rows first), so it loads natively."""

    def forward(self, attention_mask, cache_length: int = 0, position_ids=None) -> torch.Tensor:
        return super().forward(opt_positions(attention_mask, cache_length, position_ids) + OFFSET)


@register_architecture
class OPTAdapter(ArchitectureAdapter):
    name: ClassVar[str] = "opt"
    model_types: ClassVar[tuple[str, ...]] = ("opt",)
    kinds: ClassVar[tuple[str, ...]] = ("none", "absolute", "rotary", "alibi")

    def decoder(self, model: nn.Module) -> nn.Module:
        return self.require(model, "model.decoder") if hasattr(model, "model") else self.require(model, "decoder")

    def model_info(self, model: nn.Module) -> ModelInfo:
        return positional_family_info(model.config, model.config.max_position_embeddings)

    def install(
        self, model: nn.Module, scheme: SchemeConfig, handle: PatchHandle, attn_implementation: str | None = None
    ) -> None:
        decoder = self.decoder(model)
        table = self.require(decoder, "embed_positions")
        attns = [self.require(layer, "self_attn") for layer in self.require(decoder, "layers")]
        info = self.model_info(model)
        weight = table.weight
        backend = choose_backend(model.config, attn_implementation, needs_hook=scheme.kind == "alibi")
        packed_mask = not is_flash(backend or model.config._attn_implementation)  # flash-attn takes none
        if scheme.name == "learned":
            rows = torch.cat([weight[:OFFSET], extend_table(weight[OFFSET:], scheme.max_positions, scheme.extend)])
            replacement = OPTLearnedPositions(rows.shape[0], rows.shape[1], device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                replacement.weight.copy_(rows)
            kept = min(weight.shape[0], rows.shape[0])
            handle.after_load.append(RefillOriginalRows(weight, replacement, kept))
        else:
            position_scheme = scheme if scheme.kind == "absolute" else None
            inner = absolute_module(position_scheme, info.head_dim * info.num_attention_heads, dtype=weight.dtype)
            replacement = OPTPositions(inner.to(weight.device), weight)
        handle.set_attr(decoder, "embed_positions", replacement)
        if scheme.kind == "rotary":
            for attn in attns:
                self.require(attn, "q_proj")
                self.require(attn, "k_proj")
            install_rotary_context(
                decoder,
                scheme,
                info.head_dim,
                handle,
                from_mask=True,
                device=weight.device,
                attentions=attns,
                projections=("q_proj", "k_proj"),
                num_heads=info.num_attention_heads,
                parts=1,
                packed_mask=packed_mask,
            )
        else:  # positions only for the packed-sequence mask (OPT builds none)
            install_position_context(decoder, handle, from_mask=True, packed_mask=packed_mask)
        if scheme.kind == "alibi":
            add_alibi_slopes(attns, scheme, info.num_attention_heads, handle, weight.device)
        set_backend(model, handle, backend)

    def native_config(self, model: nn.Module, scheme: SchemeConfig) -> dict[str, Any]:
        if scheme.name == "learned":
            return {"max_position_embeddings": scheme.max_positions}
        return {}
