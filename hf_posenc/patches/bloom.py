"""BLOOM: ALiBi computed inside ``BloomAttention.forward`` (eager only in transformers).

Each attention module's ``forward`` is replaced on the instance by one that splits the fused qkv,
optionally rotates q and k, updates the cache, and calls hf_posenc's registered attention function for
the chosen backend (eager, sdpa, flex attention or flash-attn), with ALiBi slopes when the scheme is
ALiBi. Native BLOOM therefore gains sdpa, flex and flash-attn, and every other scheme replaces ALiBi. BLOOM takes no
``position_ids``: positions come from the attention mask, as in BLOOM's own ALiBi.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HookPointMissingError, UnsupportedSchemeError
from ..schemes.alibi import AlibiConfig
from ..schemes.base import ModelInfo, SchemeConfig
from . import attention
from .backends import base_backend
from .base import ArchitectureAdapter, register_architecture
from .common import (
    POSITIONS_ATTR,
    absolute_module,
    add_alibi_slopes,
    choose_backend,
    install_rotary_context,
    is_flash,
    positional_family_info,
    set_backend,
)
from .context import DecoderPositions, PositionState, install_position_context
from .embeddings import apply_rotary
from .handle import PatchHandle
from .wrappers import bound_call, current_state


class BloomAttentionForward:
    """``BloomAttention.forward`` of one attention module: split the fused qkv, rotate q and k when the
    scheme is rotary, update the cache, attend through the chosen backend. This call's positions and
    rotary tables arrive as BLOOM's ``alibi`` argument (see :class:`StateAsAlibi`), which every block
    receives and gradient checkpointing keeps for the recomputation in backward."""

    def __init__(self, module: nn.Module, backend: str) -> None:
        self.module = module
        self.backend = backend

    def __call__(
        self,
        hidden_states: torch.Tensor,
        residual: torch.Tensor,
        alibi: Any,
        attention_mask: torch.Tensor | None,
        layer_past: Any = None,
        use_cache: bool = False,
        output_attentions: bool = False,
        **kwargs: Any,
    ):
        attn = self.module
        if not isinstance(alibi, PositionState):
            raise HookPointMissingError(
                "BLOOM's attention did not receive hf_posenc's position state in place of its alibi tensor: "
                "the installed transformers changed how BloomModel builds it."
            )
        query, key, value = attn._reshape(attn.query_key_value(hidden_states))  # (B, H, L, D)
        if alibi.cos is not None:
            query = apply_rotary(query, alibi.cos, alibi.sin, 1)
            key = apply_rotary(key, alibi.cos, alibi.sin, 1)
        if layer_past is not None:
            key, value = layer_past.update(key, value, attn.layer_idx)
        dropout = attn.attention_dropout.p if attn.training else 0.0
        # BLOOM's attention receives no position ids; flash-attn needs them to keep packed documents apart
        extra = {"position_ids": alibi.positions} if is_flash(self.backend) else {}
        attend = attention.FUNCTIONS[self.backend]
        out, probs = attend(
            attn, query, key, value, attention_mask, scaling=attn.inv_norm_factor, dropout=dropout, **extra
        )
        output = attn.dense(out.reshape(*out.shape[:2], -1))
        output = residual + F.dropout(output, p=attn.hidden_dropout, training=attn.training)
        return output, probs


class StateAsAlibi:
    """``BloomModel.build_alibi_tensor`` of one instance: instead of BLOOM's ALiBi tensor (unused by the
    replaced attention; it also cannot take the 4D mask of packed sequences) it returns the decoder
    call's :class:`PositionState`, which BLOOM then hands to every block."""

    def __init__(self, source: DecoderPositions) -> None:
        self.source = source

    def __call__(self, attention_mask: torch.Tensor, num_heads: int, dtype: torch.dtype) -> PositionState:
        state = current_state(self.source)
        if state is None:
            raise HookPointMissingError("BloomModel built its alibi tensor outside hf_posenc's decoder forward.")
        return state


#: the context BLOOM was trained with, assumed where its config has no seq_length
BLOOM_CONTEXT = 2048


@register_architecture
class BloomAdapter(ArchitectureAdapter):
    name: ClassVar[str] = "bloom"
    model_types: ClassVar[tuple[str, ...]] = ("bloom",)
    kinds: ClassVar[tuple[str, ...]] = ("none", "absolute", "rotary", "alibi")

    def decoder(self, model: nn.Module) -> nn.Module:
        return model if hasattr(model, "word_embeddings") else self.require(model, "transformer")

    def loads_natively(self, model: nn.Module, scheme: SchemeConfig) -> bool:
        return isinstance(scheme, AlibiConfig) and scheme.slope_scale == 1.0  # BLOOM's own ALiBi

    def model_info(self, model: nn.Module) -> ModelInfo:
        # BLOOM's config records no context length: assume its training context (2,048 tokens) unless the
        # config has seq_length; schemes override it with original_max_position_embeddings= / max_positions=.
        return positional_family_info(model.config, getattr(model.config, "seq_length", None) or BLOOM_CONTEXT)

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
                explicit_mask=True,
            )
        else:
            embed_attr = None
            if scheme.kind == "absolute":  # ALiBi or NoPE: positions only for packed sequences and flash
                table = absolute_module(scheme, model.config.hidden_size, dtype=weight.dtype, device=weight.device)
                handle.set_attr(decoder, POSITIONS_ATTR, table)
                embed_attr = POSITIONS_ATTR
            context = install_position_context(
                decoder,
                handle,
                from_mask=True,
                embed_attr=embed_attr,
                packed_mask=packed_mask,
                outer=model,
                explicit_mask=True,
            )
        if scheme.kind == "alibi":
            add_alibi_slopes(attns, scheme, info.num_attention_heads, handle, weight.device)
        handle.set_attr(decoder, "build_alibi_tensor", bound_call(StateAsAlibi(context)))
        backend = base_backend(name)
        for attn in attns:
            handle.set_attr(attn, "forward", bound_call(BloomAttentionForward(attn, backend)))
        set_backend(model, handle, name)
