"""BLOOM: ALiBi computed inside ``BloomAttention.forward`` (eager only in transformers).

Each attention module's ``forward`` is replaced on the instance by one that splits the fused qkv,
optionally rotates q and k, updates the cache, and calls hf_posenc's registered attention function for
the chosen backend (eager, sdpa, flex attention or flash-attn), with ALiBi slopes when the scheme is
ALiBi. Native BLOOM therefore gains sdpa, flex and flash-attn, and every other scheme replaces ALiBi. BLOOM takes no
``position_ids``: positions come from the attention mask, as in BLOOM's own ALiBi.
"""

from __future__ import annotations

import types
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedSchemeError
from ..schemes.base import ModelInfo, SchemeConfig
from . import attention
from .base import ArchitectureAdapter, register_architecture
from .common import (
    absolute_module,
    add_alibi_slopes,
    choose_backend,
    install_rotary_context,
    is_flash,
    positional_family_info,
    set_backend,
)
from .context import PositionContext, install_position_context
from .embeddings import apply_rotary
from .handle import PatchHandle


def make_bloom_attention_forward(backend: str, context: PositionContext):
    attend = attention.FUNCTIONS[backend]
    flash = is_flash(backend)

    def forward(
        self: nn.Module,
        hidden_states: torch.Tensor,
        residual: torch.Tensor,
        alibi: torch.Tensor,
        attention_mask: torch.Tensor | None,
        layer_past: Any = None,
        use_cache: bool = False,
        output_attentions: bool = False,
        **kwargs: Any,
    ):
        query, key, value = self._reshape(self.query_key_value(hidden_states))  # (B, H, L, D)
        if context.cos is not None:
            query = apply_rotary(query, context.cos, context.sin, 1)
            key = apply_rotary(key, context.cos, context.sin, 1)
        if layer_past is not None:
            key, value = layer_past.update(key, value, self.layer_idx)
        dropout = self.attention_dropout.p if self.training else 0.0
        # BLOOM's attention receives no position ids; flash-attn needs them to keep packed documents apart
        extra = {"position_ids": context.positions} if flash else {}
        out, probs = attend(
            self, query, key, value, attention_mask, scaling=self.inv_norm_factor, dropout=dropout, **extra
        )
        output = self.dense(out.reshape(*out.shape[:2], -1))
        output = residual + F.dropout(output, p=self.hidden_dropout, training=self.training)
        return output, probs

    return forward


def _no_alibi(self: nn.Module, attention_mask: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros((), dtype=dtype, device=attention_mask.device)


@register_architecture
class BloomAdapter(ArchitectureAdapter):
    name: ClassVar[str] = "bloom"
    model_types: ClassVar[tuple[str, ...]] = ("bloom",)
    kinds: ClassVar[tuple[str, ...]] = ("none", "absolute", "rotary", "alibi")

    def decoder(self, model: nn.Module) -> nn.Module:
        return model if hasattr(model, "word_embeddings") else self.require(model, "transformer")

    def model_info(self, model: nn.Module) -> ModelInfo:
        return positional_family_info(model.config, getattr(model.config, "seq_length", None) or 2048)

    def install(
        self, model: nn.Module, scheme: SchemeConfig, handle: PatchHandle, attn_implementation: str | None = None
    ) -> None:
        if getattr(model.config, "pretraining_tp", 1) > 1 and getattr(model.config, "slow_but_exact", False):
            raise UnsupportedSchemeError("BLOOM with pretraining_tp > 1 and slow_but_exact=True is not supported.")
        decoder = self.decoder(model)
        blocks = self.require(decoder, "h")
        attns = [self.require(block, "self_attention") for block in blocks]
        for attn in attns:
            self.require(attn, "query_key_value")
            self.require(attn, "_reshape")
        info = self.model_info(model)
        weight = decoder.get_input_embeddings().weight
        name = choose_backend(model.config, attn_implementation, needs_hook=True)
        # flash-attn finds packed documents from the positions itself; the others take a 4D mask
        packed_mask = not is_flash(name)
        if scheme.kind == "rotary":
            context = install_rotary_context(
                decoder,
                scheme,
                info.head_dim,
                handle,
                from_mask=True,
                device=weight.device,
                packed_mask=packed_mask,
                outer=model,
            )
        elif scheme.kind == "absolute":
            table = absolute_module(scheme, model.config.hidden_size, dtype=weight.dtype, device=weight.device)
            handle.set_attr(decoder, "hf_posenc_positions", table)
            context = install_position_context(
                decoder, handle, from_mask=True, embed_positions=table, packed_mask=packed_mask, outer=model
            )
        else:  # ALiBi or NoPE: positions only for packed sequences
            context = install_position_context(decoder, handle, from_mask=True, packed_mask=packed_mask, outer=model)
        if scheme.kind == "alibi":
            add_alibi_slopes(attns, scheme, info.num_attention_heads, handle, weight.device)
        # BLOOM's own ALiBi tensor is unused by the replaced attention; skip building it (it also cannot
        # take the 4D mask used for packed sequences).
        handle.set_attr(decoder, "build_alibi_tensor", types.MethodType(_no_alibi, decoder))
        backend = attention.base_backend(name)
        for attn in attns:
            handle.set_attr(attn, "forward", types.MethodType(make_bloom_attention_forward(backend, context), attn))
        set_backend(model, handle, name)
