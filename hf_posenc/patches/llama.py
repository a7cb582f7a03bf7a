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
from .common import POSITIONS_ATTR, absolute_module, add_alibi_slopes, choose_backend, set_backend
from .context import install_position_context
from .handle import PatchHandle
from .refresh import install_cache_refresh, needs_cache_refresh
from .rotary import PosencRotaryEmbedding


@register_architecture
class LlamaFamilyAdapter(ArchitectureAdapter):
    """LLaMA, Mistral, Qwen2 (GQA included): swap ``model.model.rotary_emb``."""

    name: ClassVar[str] = "llama"
    model_types: ClassVar[tuple[str, ...]] = ("llama", "mistral", "qwen2")
    kinds: ClassVar[tuple[str, ...]] = ("rotary", "none", "alibi", "absolute")
    #: where the decoder sits in the CausalLM, and the attention module in each layer
    decoder_attr: ClassVar[str] = "model"
    attention_attr: ClassVar[str] = "self_attn"
    #: True where attention rotates only the first ``len(cos)`` channels (GPT-NeoX); False where it
    #: rotates every channel, so partial rotary becomes zero-frequency pairs (LLaMA)
    rotary_prefix: ClassVar[bool] = False

    def decoder(self, model: nn.Module) -> nn.Module:
        """The module that owns ``rotary_emb`` (``model.<decoder_attr>`` for a CausalLM, else the model)."""
        return model if hasattr(model, "rotary_emb") else self.require(model, self.decoder_attr)

    def model_info(self, model: nn.Module) -> ModelInfo:
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rope = getattr(config, "rope_parameters", None) or {}
        partial = float(rope.get("partial_rotary_factor") or 1.0) if self.rotary_prefix else 1.0
        return ModelInfo(
            head_dim=head_dim,
            num_attention_heads=config.num_attention_heads,
            max_position_embeddings=getattr(config, "max_position_embeddings", None),
            rope_theta=rope.get("rope_theta"),
            original_max_position_embeddings=rope.get("original_max_position_embeddings"),
            partial_rotary_factor=partial,
            native_partial_rotary=self.rotary_prefix,
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
        partial = getattr(scheme, "partial_rotary_factor", None) or info.partial_rotary_factor
        rotary_dim = int(info.head_dim * partial) if self.rotary_prefix else None
        rotary = PosencRotaryEmbedding(frequencies, info.head_dim, device, rotary_dim=rotary_dim)
        handle.set_attr(decoder, "rotary_emb", rotary)
        if needs_cache_refresh(scheme):
            install_cache_refresh(decoder, scheme, handle)
        if scheme.kind == "alibi":
            attns = [self.require(layer, self.attention_attr) for layer in layers]
            add_alibi_slopes(attns, scheme, info.num_attention_heads, handle, device)
        if scheme.kind == "absolute":
            weight = decoder.get_input_embeddings().weight
            table = absolute_module(scheme, model.config.hidden_size, dtype=weight.dtype, device=weight.device)
            handle.set_attr(decoder, POSITIONS_ATTR, table)
            install_position_context(decoder, handle, embed_attr=POSITIONS_ATTR)
        set_backend(model, handle, backend)

    def native_config(self, model: nn.Module, scheme: SchemeConfig) -> dict[str, Any]:
        native = getattr(scheme, "native_rope_parameters", None)
        rope_parameters = native(self.model_info(model)) if native else None
        if rope_parameters is None:
            return {}
        out: dict[str, Any] = {"rope_parameters": rope_parameters}
        max_positions = scheme.native_max_position_embeddings()
        if max_positions is not None:
            out["max_position_embeddings"] = max_positions
        return out
