"""Every family whose decoder owns one ``rotary_emb`` following transformers' rotary contract.

The decoder computes ``(cos, sin) = rotary_emb(x, position_ids[, layer_type])`` once per forward and
hands them to every layer. Every frequency scheme (and NoPE, as zero frequencies) is installed by
swapping that one module for hf_posenc's on the instance. What a family's tables look like (the
``cat`` / ``interleave`` / ``half`` layout, partial width, the head size the frequencies are computed
against, one table or one per layer type) is not hard-coded per family: :meth:`RotaryFamilyAdapter.probe`
calls the model's own module and finds the configuration of hf_posenc's module that reproduces it
exactly from the model's own ``rope_parameters``. A model whose tables cannot be reproduced is refused,
never patched approximately. ALiBi and absolute schemes (on the families listed for them) install zero
frequencies and add their own signal: ALiBi through hf_posenc's attention backends, absolute
embeddings added to the input embeddings by the decoder's position context.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import PosencError, UnsupportedSchemeError
from ..schemes.base import ModelInfo, SchemeConfig
from ..schemes.nope import NoPEConfig
from ..schemes.rope import RotaryScheme, scheme_from_rope_parameters
from .backends import base_backend
from .base import ArchitectureAdapter, register_architecture
from .common import (
    POSITIONS_ATTR,
    absolute_module,
    add_alibi_slopes,
    add_attention_term,
    choose_backend,
    set_backend,
)
from .context import install_position_context
from .handle import PatchHandle
from .refresh import install_cache_refresh, needs_cache_refresh
from .rotary import LAYOUTS, LayerTypeRotary, PosencRotaryEmbedding
from .windowed import WindowedRotaryTerm

#: scheme kinds that act inside attention (through hf_posenc's registered backends)
ATTENTION_LEVEL_KINDS = ("alibi", "windowed")

#: positions at which a family's own tables are compared with hf_posenc's (inside the original context,
#: where no length-dependent scheme changes anything)
PROBE_POSITIONS = 48
#: how close hf_posenc's tables must come to the family's own (float32)
PROBE_TOLERANCE = 1e-6
#: attention features hf_posenc's ALiBi backends do not implement (logit soft-capping, attention sinks)
UNSUPPORTED_ATTENTION = ("softcap", "s_aux", "sinks")
#: names under which families keep a layer's attention module
ATTENTION_NAMES = ("self_attn", "attention", "attn", "self_attention")


@dataclass(frozen=True)
class TableLayout:
    """One layer type's rotary tables, as the family lays them out (found by :meth:`RotaryFamilyAdapter.probe`)."""

    layer_type: str | None
    head_dim: int  # the head size the frequencies are computed against
    rotary_dim: int | None  # channels the tables cover when fewer than head_dim (a rotated prefix)
    layout: str
    native: RotaryScheme  # the model's own scheme for this type, resolved
    sin_first: bool = False  # the module returns (sin, cos) (GPT-J, CodeGen)

    def info(self, base: ModelInfo) -> ModelInfo:
        return dataclasses.replace(
            base,
            head_dim=self.head_dim,
            rope_theta=self.native.rope_theta,
            original_max_position_embeddings=getattr(self.native, "original_max_position_embeddings", None),
            partial_rotary_factor=self.native.partial_rotary_factor,
            native_partial_rotary=self.rotary_dim is not None,
        )

    def module(self, scheme: Any, device: torch.device | None) -> PosencRotaryEmbedding:
        return PosencRotaryEmbedding(
            scheme, self.head_dim, device, rotary_dim=self.rotary_dim, layout=self.layout, sin_first=self.sin_first
        )


def config_head_dim(config: Any) -> int | None:
    """The head size transformers' rope functions use, or None where the config has no single one."""
    try:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    except Exception:  # e.g. a per-layer attribute (Gemma-4's per_layer_config)
        return None


def rotary_owner(model: nn.Module) -> nn.Module | None:
    """The shallowest module that owns a ``rotary_emb`` submodule, or None."""
    return next((m for m in model.modules() if isinstance(m._modules.get("rotary_emb"), nn.Module)), None)


def text_config(model: nn.Module, decoder: nn.Module) -> Any:
    """The config the decoder was built from (a multimodal model's text config)."""
    return getattr(decoder, "config", None) or model.config


@register_architecture
class RotaryFamilyAdapter(ArchitectureAdapter):
    """Any causal LM whose decoder owns a standard ``rotary_emb`` (also the fallback for model types
    hf_posenc has no row for: they are patched only if :meth:`probe` reproduces their tables)."""

    name: ClassVar[str] = "rotary"
    model_types: ClassVar[tuple[str, ...]] = ()
    kinds: ClassVar[tuple[str, ...]] = ("rotary", "none", "alibi", "absolute", "windowed")
    fallback: ClassVar[bool] = True

    def accepts(self, model: nn.Module) -> bool:
        return rotary_owner(model) is not None

    def decoder(self, model: nn.Module) -> nn.Module:
        """The module that owns ``rotary_emb`` (the shallowest one)."""
        return rotary_owner(model) or self.require(model, "rotary_emb")  # raises, naming the missing hook point

    # -- probing ------------------------------------------------------------------------------
    def probe(self, model: nn.Module) -> dict[str | None, TableLayout]:
        """Each layer type's :class:`TableLayout` (key None for a family with one table), found by calling
        the model's own ``rotary_emb``; raises :class:`UnsupportedSchemeError` saying why when hf_posenc's
        module cannot reproduce it exactly."""
        decoder = self.decoder(model)
        original = decoder.rotary_emb
        if isinstance(original, PosencRotaryEmbedding | LayerTypeRotary):
            return original.layouts
        config = text_config(model, decoder)
        self._check_single_rotary(model, decoder, config)
        rope = self.rope_parameters(config)
        if not isinstance(rope, dict) or not rope:
            raise UnsupportedSchemeError(f"{config.model_type}: the config has no rope_parameters to reproduce.")
        per_type = "layer_type" in inspect.signature(original.forward).parameters
        if per_type:
            types = sorted(t for t in set(getattr(config, "layer_types", None) or rope) if rope.get(t) is not None)
            if not types or not all(isinstance(rope[t], dict) for t in types):
                raise UnsupportedSchemeError(
                    f"{config.model_type}: its rotary module takes a layer_type but rope_parameters is not keyed by "
                    f"the config's layer types ({sorted(rope)})."
                )
            return {t: self._match(original, rope[t], t, config) for t in types}
        return {None: self._match(original, rope, None, config)}

    def rope_parameters(self, config: Any) -> dict | None:
        """The rope parameters the family's tables are computed from (its config's)."""
        return getattr(config, "rope_parameters", None)

    @staticmethod
    def _check_single_rotary(model: nn.Module, decoder: nn.Module, config: Any) -> None:
        """Refuse structures where swapping ``decoder.rotary_emb`` would not reach every rotary table:
        other rotary modules (one per theta, or one inside each attention) or multimodal RoPE."""
        others = [
            name
            for name, module in model.named_modules()
            if "rotary" in type(module).__name__.lower() and module is not decoder.rotary_emb
        ]
        if others:
            raise UnsupportedSchemeError(
                f"{config.model_type}: besides {type(decoder.rotary_emb).__name__} at rotary_emb it has other rotary "
                f"modules ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); swapping one would leave "
                "the others unpatched, so hf_posenc refuses it."
            )
        mrope = [k for k in (*vars(decoder.rotary_emb), *vars(config)) if "mrope" in k.lower()]
        if mrope:
            raise UnsupportedSchemeError(
                f"{config.model_type}: multimodal RoPE ({', '.join(sorted(set(mrope)))}) is not supported by hf_posenc."
            )

    def _match(self, original: nn.Module, params: dict, layer_type: str | None, config: Any) -> TableLayout:
        where = f"{config.model_type}" + (f" ({layer_type} layers)" if layer_type else "")
        native = scheme_from_rope_parameters(params)  # refuses rope types and keys hf_posenc does not model
        buffers = [b for b in original.buffers() if b.device.type != "meta"]
        device = buffers[0].device if buffers else None
        # A model cast after it was built (``model.to(torch.bfloat16)``) carries a rounded inv_freq: its tables are
        # compared with ours computed from frequencies rounded the same way (the patched module keeps fp32 ones).
        rounded = next(
            (b.dtype for n, b in original.named_buffers() if n.endswith("inv_freq") and b.dtype.itemsize < 4), None
        )
        length = min(PROBE_POSITIONS, getattr(config, "max_position_embeddings", None) or PROBE_POSITIONS)
        positions = torch.arange(length, device=device)[None]
        x = torch.zeros(1, 1, 1, device=device)
        with torch.no_grad():
            out = original(x, positions, layer_type) if layer_type else original(x, positions)
        if not (
            isinstance(out, tuple) and len(out) == 2 and all(torch.is_tensor(t) and not t.is_complex() for t in out)
        ):
            raise UnsupportedSchemeError(
                f"{where}: its rotary module does not return real (cos, sin) tables (complex-number rotary, as in "
                "Llama-4 and DeepSeek-V2); hf_posenc does not patch it."
            )
        first, second = (t.float() for t in out)
        width = first.shape[-1]
        head_dim = config_head_dim(config)
        base = self._base_info(config)
        for layout, sin_first in itertools.product(LAYOUTS, (False, True)):
            cos, sin = (second, first) if sin_first else (first, second)
            pairs = width if layout == "half" else width // 2
            for dim in dict.fromkeys(d for d in (head_dim, 2 * pairs) if d):
                if 2 * pairs > dim:
                    continue
                rotary_dim = 2 * pairs if 2 * pairs < dim else None
                info = dataclasses.replace(
                    base,
                    head_dim=dim,
                    rope_theta=params.get("rope_theta"),
                    original_max_position_embeddings=params.get("original_max_position_embeddings"),
                    partial_rotary_factor=float(params.get("partial_rotary_factor") or 1.0),
                    native_partial_rotary=rotary_dim is not None,
                )
                try:
                    resolved = native.resolve(info)
                    mine = PosencRotaryEmbedding(resolved, dim, device, rotary_dim=rotary_dim, layout=layout)
                    if rounded is not None:
                        mine.inv_freq = mine.inv_freq.to(rounded).float()
                    my_cos, my_sin = mine(x, positions)
                except (PosencError, RuntimeError, ValueError):
                    continue
                if my_cos.shape == cos.shape and _close(my_cos, cos) and _close(my_sin, sin):
                    return TableLayout(layer_type, dim, rotary_dim, layout, resolved, sin_first)
        raise UnsupportedSchemeError(
            f"{where}: hf_posenc's rotary module cannot reproduce the model's own {type(original).__name__} tables "
            f"from its rope_parameters (checked the cat, interleaved and half-width layouts, either order, at {length} "
            "positions), "
            "so it refuses to patch it rather than change it silently."
        )

    @staticmethod
    def _base_info(config: Any) -> ModelInfo:
        return ModelInfo(
            head_dim=config_head_dim(config) or 0,  # each table sets its own (TableLayout.info)
            num_attention_heads=config.num_attention_heads,
            max_position_embeddings=getattr(config, "max_position_embeddings", None),
        )

    @staticmethod
    def primary(layouts: dict[str | None, TableLayout]) -> TableLayout:
        """The table a scheme is resolved against: the only one, or the full-attention one."""
        if None in layouts:
            return layouts[None]
        return layouts.get("full_attention") or next(iter(layouts.values()))

    def model_info(self, model: nn.Module) -> ModelInfo:
        layouts = self.probe(model)
        decoder = self.decoder(model)
        info = self.primary(layouts).info(self._base_info(text_config(model, decoder)))
        types = tuple(t for t in layouts if t is not None)
        scaled = ("full_attention",) if "full_attention" in types else types
        return dataclasses.replace(info, layer_types=types, scaled_layer_types=scaled)

    # -- installing ---------------------------------------------------------------------------
    def table_scheme(self, scheme: SchemeConfig, layout: TableLayout, primary: TableLayout) -> Any:
        """The scheme serving one layer type: the patch's (with the type's own theta and rotary
        fraction unless the user set them), the type's native scheme, or zero frequencies."""
        if scheme.kind != "rotary":
            return NoPEConfig()
        if layout.layer_type is not None and layout.layer_type not in scheme.layer_types:
            return layout.native
        if layout is primary:
            return scheme
        own = {}
        if scheme.rope_theta == primary.native.rope_theta:
            own["rope_theta"] = layout.native.rope_theta
        if scheme.partial_rotary_factor == primary.native.partial_rotary_factor:
            own["partial_rotary_factor"] = layout.native.partial_rotary_factor
        return dataclasses.replace(scheme, **own)

    def install(
        self, model: nn.Module, scheme: SchemeConfig, handle: PatchHandle, attn_implementation: str | None = None
    ) -> None:
        layouts = self.probe(model)
        decoder = self.decoder(model)
        attention_level = scheme.kind in ATTENTION_LEVEL_KINDS
        if attention_level:
            self.interface_attentions(decoder, model.config)  # refuse before changing anything
        original = decoder.rotary_emb
        device = next((b.device for b in original.buffers() if b.device.type != "meta"), None)
        primary = self.primary(layouts)
        backend = choose_backend(model.config, attn_implementation, needs_hook=attention_level)
        if scheme.kind == "windowed":
            self._check_windowed(scheme, layouts, backend, model.config)
        tables = {t: layout.module(self.table_scheme(scheme, layout, primary), device) for t, layout in layouts.items()}
        rotary: nn.Module = tables[None] if None in tables else LayerTypeRotary(tables)
        rotary.layouts = layouts
        rotary.native_class = type(original)
        if isinstance(getattr(original, "layer_types", None), list | tuple):  # some decoders read it
            rotary.layer_types = original.layer_types
        handle.set_attr(decoder, "rotary_emb", rotary)
        if scheme.kind == "alibi":
            attns = self.interface_attentions(decoder, model.config)
            add_alibi_slopes(attns, scheme, model.config.num_attention_heads, handle, device)
        if scheme.kind == "absolute":
            self.install_absolute(decoder, scheme, model.config, handle)
        if scheme.kind == "windowed":
            context = install_position_context(decoder, handle, from_mask=True, pass_positions=True)
            term = WindowedRotaryTerm(scheme, primary.module(scheme.frequency_scheme(), device), context)
            for attn in self.interface_attentions(decoder, model.config):
                add_attention_term(attn, term, handle)
        if needs_cache_refresh(scheme):  # outermost: a re-encoding call passes through the position context
            install_cache_refresh(decoder, scheme, handle)
        set_backend(model, handle, backend)

    @staticmethod
    def _check_windowed(scheme: SchemeConfig, layouts: dict, backend: str | None, config: Any) -> None:
        """Refuse what the windowed term cannot run: per-layer-type tables, layouts it does not rotate,
        backends it has no path for."""
        if None not in layouts:
            raise UnsupportedSchemeError(
                f"{config.model_type}: {scheme.name} on a per-layer-type rotary family (layer types "
                f"{', '.join(t for t in layouts if t)}) is not supported."
            )
        if layouts[None].layout not in ("cat", "interleave"):
            raise UnsupportedSchemeError(
                f"{config.model_type}: {scheme.name} rotates queries and keys itself; it knows the cat and "
                f"interleaved layouts, not this family's {layouts[None].layout!r} tables."
            )
        chosen = base_backend(backend or getattr(config, "_attn_implementation", None) or "eager")
        if chosen not in WindowedRotaryTerm.backends:
            raise UnsupportedSchemeError(
                f"{scheme.name} runs on attn_implementation {', '.join(WindowedRotaryTerm.backends)}, not {chosen!r}."
            )

    @staticmethod
    def install_absolute(decoder: nn.Module, scheme: SchemeConfig, config: Any, handle: PatchHandle) -> None:
        """An absolute scheme's table on the decoder, added to the input embeddings by its position context."""
        weight = decoder.get_input_embeddings().weight
        table = absolute_module(scheme, config.hidden_size, dtype=weight.dtype, device=weight.device)
        handle.set_attr(decoder, POSITIONS_ATTR, table)
        install_position_context(decoder, handle, embed_attr=POSITIONS_ATTR)

    def interface_attentions(self, decoder: nn.Module, config: Any) -> list[nn.Module]:
        """Every layer's attention module, when each computes attention through transformers' attention
        interface (so hf_posenc's registered ALiBi backends run) and uses nothing they do not implement;
        else :class:`UnsupportedSchemeError` saying which."""
        try:
            attns = self.attentions(decoder)
        except PosencError as exc:
            raise UnsupportedSchemeError(
                f"{config.model_type}: ALiBi needs an attention module in every layer ({exc})"
            ) from exc
        for cls in dict.fromkeys(type(a) for a in attns):
            source = inspect.getsource(cls.forward)
            if "ALL_ATTENTION_FUNCTIONS" not in source:
                raise UnsupportedSchemeError(
                    f"{config.model_type}: {cls.__name__} does not compute attention through transformers' attention "
                    "interface, so hf_posenc's ALiBi backends would never run; ALiBi is refused here."
                )
            used = [feature for feature in UNSUPPORTED_ATTENTION if feature in source]
            if used:
                raise UnsupportedSchemeError(
                    f"{config.model_type}: {cls.__name__} uses {', '.join(used)}, which hf_posenc's ALiBi backends do "
                    "not implement; ALiBi is refused here."
                )
        return attns

    def attentions(self, decoder: nn.Module) -> list[nn.Module]:
        """Every layer's attention module."""
        return [self.attention(layer) for layer in self.require(decoder, "layers")]

    def attention(self, layer: nn.Module) -> nn.Module:
        for name in ATTENTION_NAMES:
            module = getattr(layer, name, None)
            if isinstance(module, nn.Module):
                return module
        return self.require(layer, ATTENTION_NAMES[0])

    def native_config(self, model: nn.Module, scheme: SchemeConfig) -> dict[str, Any]:
        if not isinstance(scheme, RotaryScheme):
            return {}
        decoder = self.decoder(model)
        layouts = self.probe(model)
        base = self._base_info(text_config(model, decoder))
        primary = self.primary(layouts)
        if None in layouts:
            rope_parameters = scheme.native_rope_parameters(primary.info(base))
        else:
            rope_parameters = dict(text_config(model, decoder).rope_parameters)
            for layer_type in scheme.layer_types or ():
                layout = layouts[layer_type]
                native = self.table_scheme(scheme, layout, primary).native_rope_parameters(layout.info(base))
                if native is None:
                    return {}
                rope_parameters[layer_type] = native
        if rope_parameters is None:
            return {}
        out: dict[str, Any] = {"rope_parameters": rope_parameters}
        max_positions = scheme.native_max_position_embeddings()
        if max_positions is not None:
            out["max_position_embeddings"] = max_positions
        config = _config_with(model.config, out)
        if text_config(model, decoder) is not model.config:  # a multimodal wrapper: its text config holds rope
            return {}
        if config is None or not self._native_reproduces(decoder, config):
            return {}
        return out

    @staticmethod
    def _native_reproduces(decoder: nn.Module, native: Any) -> bool:
        """Whether the family's own rotary module, built from the native config, computes the patched
        tables (some families read more than the rope parameters, e.g. their own mscale keys): only
        then does a saved checkpoint load in plain transformers as the model hf_posenc patched."""
        ours = decoder.rotary_emb
        try:
            theirs = ours.native_class(config=native)
        except Exception:
            return False
        length = min(4 * PROBE_POSITIONS, 2 * (getattr(native, "max_position_embeddings", None) or PROBE_POSITIONS))
        positions = torch.arange(length)[None]
        x = torch.zeros(1, 1, 1)
        with torch.no_grad():
            for layer_type in ours.layouts:
                args = (layer_type,) if layer_type is not None else ()
                try:
                    want = theirs(x, positions, *args)
                except Exception:
                    return False
                got = ours(x, positions, *args)
                same = want[0].shape == got[0].shape and _close(want[0].float(), got[0])
                if not (same and _close(want[1].float(), got[1])):
                    return False
        return True


def _config_with(config: Any, changes: dict[str, Any]) -> Any:
    """The family's config with ``changes``, or None where its config class rejects them (some allow
    only their own rope types, e.g. Phi-3 only longrope): a checkpoint saved with a native form the
    class rejects would not load."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return type(config).from_dict({**config.to_dict(), **changes})
    except Exception:
        return None
    finally:
        hf_logging.set_verbosity(level)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= PROBE_TOLERANCE) if a.numel() else True


@register_architecture
class LlamaFamilyAdapter(RotaryFamilyAdapter):
    """LLaMA, Mistral, Qwen2 (GQA included): the generic rotary adapter, plus ALiBi and absolute schemes
    (their attention runs through transformers' attention interface)."""

    name: ClassVar[str] = "llama"
    model_types: ClassVar[tuple[str, ...]] = ("llama", "mistral", "qwen2")
    kinds: ClassVar[tuple[str, ...]] = ("rotary", "none", "alibi", "absolute", "windowed")
    fallback: ClassVar[bool] = False
