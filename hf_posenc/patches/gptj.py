"""GPT-J and CodeGen: rotary positions from a sinusoid table, two layouts of the code across versions.

Both families rotate a prefix of each head (``rotary_dim`` channels) pairwise (``rotate_every_two``),
from a table whose rows are ``cat(sin, cos)`` with one column per frequency. Where that table lives
depends on the transformers version:

- from 5.24 the decoder owns a ``rotary_emb`` returning ``(sin, cos)``: the generic rotary adapter
  patches it (its probe finds the half-width, sin-first layout);
- before, each attention module reads its own ``embed_positions`` buffer (GPT-J through
  ``_get_embed_positions``, CodeGen by indexing it): hf_posenc keeps its rotary module on the decoder
  and puts a lookup in front of every attention that serves the same rows from it.

Neither config has ``rope_parameters``: the tables are default RoPE at theta 10000, which the probe
checks against the model's own table before anything is patched.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import UnsupportedSchemeError
from ..schemes.base import SchemeConfig
from .base import register_architecture
from .handle import PatchHandle
from .refresh import install_cache_refresh, needs_cache_refresh
from .rotary import PosencRotaryEmbedding
from .rotary_family import RotaryFamilyAdapter, TableLayout, rotary_owner, text_config
from .wrappers import bound_call

#: the table both families build (``create_sinusoidal_positions``): default RoPE at theta 10000
SINUSOID_ROPE = {"rope_type": "default", "rope_theta": 10000.0}


class TableAsRotary(nn.Module):
    """An attention's own ``embed_positions`` table, read as a rotary module returns it: ``(sin, cos)``
    at ``position_ids`` (what the probe compares hf_posenc's module against)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.table[position_ids]
        sin, cos = rows.split(rows.shape[-1] // 2, dim=-1)
        return sin, cos


class PositionRows:
    """Stands in for an attention's ``embed_positions`` table (pre-5.24 layout): rows ``cat(sin, cos)``
    computed by hf_posenc's rotary module, on the positions' device, for any position (no table end).

    ``lookup[position_ids]`` serves CodeGen, which indexes the table; ``table_for(position_ids)`` serves
    GPT-J's ``_get_embed_positions``, which gathers rows from a per-sequence table. The rotary module
    lives on the decoder (so ``.to()`` moves it); this object only refers to it.
    """

    def __init__(self, rotary: PosencRotaryEmbedding) -> None:
        self.rotary = rotary

    @property
    def device(self) -> torch.device:
        return self.rotary.inv_freq.device

    def to(self, *args: Any, **kwargs: Any) -> PositionRows:
        return self  # rows are computed on the device of the positions asked for

    def __getitem__(self, position_ids: torch.Tensor) -> torch.Tensor:
        x = torch.zeros((), device=position_ids.device)  # float32: both families rotate in float32
        sin, cos = self.rotary(x, position_ids)
        return torch.cat((sin, cos), dim=-1)

    def table_for(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Rows for positions 0..max(position_ids), once per sequence: (batch, max + 1, rotary_dim)."""
        positions = torch.arange(int(position_ids.max()) + 1, device=position_ids.device)
        return self[positions[None]].expand(position_ids.shape[0], -1, -1)


class EmbedPositionsFor:
    """Installed as GPT-J's ``_get_embed_positions`` (pre-5.24): the table hf_posenc's rows make."""

    def __init__(self, rows: PositionRows) -> None:
        self.rows = rows

    def __call__(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.rows.table_for(position_ids)


class _HeldTable(nn.Module):
    """An attention's original ``embed_positions``, held while patched (follows ``.to()``/``.half()``)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table, persistent=False)


class RestoreTable:
    """Undo: put an attention's ``embed_positions`` buffer back."""

    def __init__(self, attention: nn.Module, held: _HeldTable) -> None:
        self.attention = attention
        self.held = held

    def undo(self) -> None:
        self.attention.__dict__.pop("embed_positions", None)
        self.attention.register_buffer("embed_positions", self.held.table, persistent=False)


@register_architecture
class GPTJFamilyAdapter(RotaryFamilyAdapter):
    """GPT-J and CodeGen: every frequency scheme, NoPE and absolute embeddings on every supported
    transformers version; ALiBi where the attention runs through transformers' attention interface."""

    name: ClassVar[str] = "gptj"
    model_types: ClassVar[tuple[str, ...]] = ("gptj", "codegen")
    kinds: ClassVar[tuple[str, ...]] = ("rotary", "none", "alibi", "absolute")  # half-width: no windowed
    fallback: ClassVar[bool] = False

    def rope_parameters(self, config: Any) -> dict | None:
        return getattr(config, "rope_parameters", None) or dict(SINUSOID_ROPE)

    def decoder(self, model: nn.Module) -> nn.Module:
        return rotary_owner(model) or model.base_model

    @staticmethod
    def per_attention(decoder: nn.Module) -> bool:
        """Whether positions live in each attention's table (transformers before 5.24)."""
        return "rotary_emb" not in decoder._modules

    def attentions(self, decoder: nn.Module) -> list[nn.Module]:
        """Every block's attention module (GPT-J and CodeGen keep their blocks at ``h``)."""
        return [self.attention(block) for block in self.require(decoder, "h")]

    def probe(self, model: nn.Module) -> dict[str | None, TableLayout]:
        decoder = self.decoder(model)
        if not self.per_attention(decoder):
            return super().probe(model)
        config = text_config(model, decoder)
        tables = [getattr(attn, "embed_positions", None) for attn in self.attentions(decoder)]
        if not all(torch.is_tensor(t) for t in tables) or any(not torch.equal(t, tables[0]) for t in tables):
            raise UnsupportedSchemeError(
                f"{config.model_type}: its attention modules do not share one embed_positions table; hf_posenc "
                "cannot reproduce them."
            )
        return {None: self._match(TableAsRotary(tables[0]), self.rope_parameters(config), None, config)}

    def install(
        self, model: nn.Module, scheme: SchemeConfig, handle: PatchHandle, attn_implementation: str | None = None
    ) -> None:
        decoder = self.decoder(model)
        if not self.per_attention(decoder):
            super().install(model, scheme, handle, attn_implementation)
            return
        if scheme.kind == "alibi":
            import transformers

            raise UnsupportedSchemeError(
                f"{model.config.model_type}: ALiBi needs transformers >= 5.24 for this family (installed "
                f"{transformers.__version__} computes its attention scores inline, where hf_posenc's ALiBi backends "
                "never run); every other scheme is supported."
            )
        layout = self.probe(model)[None]
        table = self.attentions(decoder)[0].embed_positions
        rotary = layout.module(self.table_scheme(scheme, layout, layout), table.device)
        rotary.layouts = {None: layout}
        rotary.native_class = None
        handle.set_attr(decoder, "rotary_emb", rotary)
        rows = PositionRows(rotary)
        for attn in self.attentions(decoder):
            if hasattr(type(attn), "_get_embed_positions"):  # GPT-J
                handle.set_attr(attn, "_get_embed_positions", bound_call(EmbedPositionsFor(rows)))
            else:  # CodeGen reads the attribute
                self._replace_table(attn, rows, handle)
        if needs_cache_refresh(scheme):
            install_cache_refresh(decoder, scheme, handle)
        if scheme.kind == "absolute":
            self.install_absolute(decoder, scheme, model.config, handle)

    @staticmethod
    def _replace_table(attention: nn.Module, rows: PositionRows, handle: PatchHandle) -> None:
        held = _HeldTable(attention._buffers["embed_positions"])
        delattr(attention, "embed_positions")
        handle.on_undo(RestoreTable(attention, held))
        handle.hold_original(attention, held)
        attention.embed_positions = rows

    def native_config(self, model: nn.Module, scheme: SchemeConfig) -> dict[str, Any]:
        if self.per_attention(self.decoder(model)) or not getattr(model.config, "rope_parameters", None):
            return {}  # the table is fixed in code: no config key changes it
        return super().native_config(model, scheme)
