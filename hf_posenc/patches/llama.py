"""LLaMA-like families: one ``model.rotary_emb`` feeds ``(cos, sin)`` to every attention layer.

Every rotary scheme (and NoPE, as zero frequencies) is installed by swapping that one module for a
:class:`PosencRotaryEmbedding` on the instance. Length-dependent schemes also get the exact cache
refresh wrapper on the decoder. ALiBi and absolute schemes install zero frequencies (identity rotation)
and then add their own signal: ALiBi through hf_posenc's registered attention backends, absolute
embeddings added to the input embeddings by the decoder's position context.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from ..schemes.base import ModelInfo, SchemeConfig
from ..schemes.nope import NoPEConfig
from .base import ArchitectureAdapter, register_architecture
from .common import absolute_module, add_alibi_slopes, choose_backend, set_backend
from .context import install_position_context
from .handle import PatchHandle
from .refresh import install_cache_refresh
from .rotary import PosencRotaryEmbedding


@register_architecture
class LlamaFamilyAdapter(ArchitectureAdapter):
    """LLaMA, Mistral, Qwen2 (GQA included): swap ``model.model.rotary_emb``."""

    name: ClassVar[str] = "llama"
    model_types: ClassVar[tuple[str, ...]] = ("llama", "mistral", "qwen2")
    kinds: ClassVar[tuple[str, ...]] = ("rotary", "none", "alibi", "absolute")

    def decoder(self, model: nn.Module) -> nn.Module:
        """The module that owns ``rotary_emb`` (``model.model`` for a CausalLM, else the model)."""
        return model if hasattr(model, "rotary_emb") else self.require(model, "model")

    def model_info(self, model: nn.Module) -> ModelInfo:
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rope = getattr(config, "rope_parameters", None) or {}
        return ModelInfo(
            model_type=config.model_type,
            head_dim=head_dim,
            num_attention_heads=config.num_attention_heads,
            max_position_embeddings=getattr(config, "max_position_embeddings", None),
            rope_theta=rope.get("rope_theta"),
            original_max_position_embeddings=rope.get("original_max_position_embeddings"),
        )

    def install(
        self, model: nn.Module, scheme: SchemeConfig, handle: PatchHandle, attn_implementation: str | None = None
    ) -> None:
        decoder = self.decoder(model)
        current = self.require(decoder, "rotary_emb")
        layers = self.require(decoder, "layers")
        inv_freq = getattr(current, "inv_freq", None)
        device = inv_freq.device if inv_freq is not None and inv_freq.device.type != "meta" else None
        info = self.model_info(model)
        backend = choose_backend(model.config, attn_implementation, needs_hook=scheme.kind == "alibi")
        frequencies = scheme if scheme.kind == "rotary" else NoPEConfig()
        handle.set_attr(decoder, "rotary_emb", PosencRotaryEmbedding(frequencies, info.head_dim, device))
        if getattr(scheme, "length_dependent", False) and getattr(scheme, "refresh", "none") == "exact":
            install_cache_refresh(decoder, scheme, handle)
        if scheme.kind == "alibi":
            attns = [self.require(layer, "self_attn") for layer in layers]
            add_alibi_slopes(attns, scheme, info.num_attention_heads, handle, device)
        if scheme.kind == "absolute":
            weight = decoder.get_input_embeddings().weight
            table = absolute_module(scheme, model.config.hidden_size, dtype=weight.dtype, device=weight.device)
            handle.set_attr(decoder, "hf_posenc_positions", table)
            install_position_context(decoder, handle, embed_positions=table)
        set_backend(model, handle, backend)

    def native_config(self, model: nn.Module, scheme: SchemeConfig) -> dict[str, Any]:
        native = getattr(scheme, "native_rope_parameters", None)
        rope_parameters = native(self.model_info(model).head_dim) if native else None
        if rope_parameters is None:
            return {}
        out: dict[str, Any] = {"rope_parameters": rope_parameters}
        max_positions = scheme.native_max_position_embeddings()
        if max_positions is not None:
            out["max_position_embeddings"] = max_positions
        return out
