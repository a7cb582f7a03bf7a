"""GPT-2: a learned ``transformer.wpe`` table added to the token embeddings; attention via the registry.

- absolute schemes and NoPE replace ``wpe`` (a learned table can be resized past ``n_positions``);
- RoPE and its scalings zero ``wpe`` and rotate q and k inside each block's fused ``c_attn`` output (a
  forward hook), so the cache holds rotated keys exactly as in LLaMA-like models;
- ALiBi zeros ``wpe`` and routes attention through hf_posenc's registered backends.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from ..schemes.base import ModelInfo, SchemeConfig
from .base import ArchitectureAdapter, register_architecture
from .common import (
    RefillOriginalRows,
    absolute_module,
    add_alibi_slopes,
    choose_backend,
    install_rotary_context,
    positional_family_info,
    set_backend,
)
from .handle import PatchHandle


@register_architecture
class GPT2Adapter(ArchitectureAdapter):
    name: ClassVar[str] = "gpt2"
    model_types: ClassVar[tuple[str, ...]] = ("gpt2",)
    kinds: ClassVar[tuple[str, ...]] = ("none", "absolute", "rotary", "alibi")

    def decoder(self, model: nn.Module) -> nn.Module:
        return model if hasattr(model, "wpe") else self.require(model, "transformer")

    def model_info(self, model: nn.Module) -> ModelInfo:
        return positional_family_info(model.config, model.config.n_positions)

    def install(
        self, model: nn.Module, scheme: SchemeConfig, handle: PatchHandle, attn_implementation: str | None = None
    ) -> None:
        decoder = self.decoder(model)
        wpe = self.require(decoder, "wpe")
        blocks = self.require(decoder, "h")
        info = self.model_info(model)
        attns = [self.require(block, "attn") for block in blocks]
        backend = choose_backend(model.config, attn_implementation, needs_hook=scheme.kind == "alibi")
        replacement = absolute_module(
            scheme if scheme.kind == "absolute" else None,
            model.config.n_embd,
            dtype=wpe.weight.dtype,
            device=wpe.weight.device,
            existing=wpe,
        )
        handle.set_attr(decoder, "wpe", replacement)
        if scheme.name == "learned" and not scheme.new_table:
            # The extended table keeps the original rows; after a reload they refill the original.
            rows = min(wpe.num_embeddings, replacement.num_embeddings)
            handle.after_load.append(RefillOriginalRows(wpe.weight, replacement, rows))
        if scheme.kind == "rotary":
            for attn in attns:
                self.require(attn, "c_attn")  # fused q | k | v
            install_rotary_context(
                decoder,
                scheme,
                info.head_dim,
                handle,
                from_mask=False,
                device=wpe.weight.device,
                attentions=attns,
                projections=("c_attn",),
                num_heads=info.num_attention_heads,
                parts=2,
            )
        if scheme.kind == "alibi":
            add_alibi_slopes(attns, scheme, info.num_attention_heads, handle, wpe.weight.device)
        set_backend(model, handle, backend)

    def native_config(self, model: nn.Module, scheme: SchemeConfig) -> dict[str, Any]:
        if scheme.name == "learned":
            return {"n_positions": scheme.max_positions}
        return {}
