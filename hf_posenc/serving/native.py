"""What a checkpoint says about its positions in the form serving engines read: transformers' own config
(``rope_parameters``, ``max_position_embeddings``), never hf_posenc's record. A patched model has such a
form only when its scheme is native to its family; otherwise no engine can compute it and export refuses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..api import get_handle, patch_target
from ..errors import UnsupportedSchemeError
from ..record import read_record

#: what each hf_posenc scheme kind means to an engine that reads only the config
_NOT_SERVABLE_HINT = {
    "windowed": "llama.cpp's own Self-Extend is a run-time option of its CLI (--grp-attn-n G --grp-attn-w W), "
    "not a file setting, and was not checked against hf_posenc",
}


class ExportRefusedError(UnsupportedSchemeError):
    """The serving engine would compute something else than the patched transformers model."""


@dataclass(frozen=True)
class NativeForm:
    """The positions of a model as its config states them."""

    model_type: str
    label: str  # the scheme as hf_posenc names it ("none" for a plain model)
    kind: str  # "rotary", "alibi", "absolute", ... or "native" for a plain model's own handling
    rope_parameters: dict[str, Any] | None  # None where the family has no rotary positions
    max_position_embeddings: int | None

    @property
    def rope_type(self) -> str | None:
        if not self.rope_parameters:
            return None
        return self.rope_parameters.get("rope_type", self.rope_parameters.get("type", "default"))

    @property
    def context(self) -> int | None:
        """The context to serve: ``max_position_embeddings``, or original x factor where the rope says more."""
        params = self.rope_parameters if self.rope_parameters and not self.per_layer_type else {}
        original, factor = params.get("original_max_position_embeddings"), params.get("factor")
        extended = int(original * factor) if original and factor else None
        return max(filter(None, (self.max_position_embeddings, extended)), default=None)

    @property
    def per_layer_type(self) -> bool:
        """Per-layer-type rope (Gemma-3, ...): ``{layer_type: {...}}`` instead of one dict."""
        return per_layer_type(self.rope_parameters)


def per_layer_type(rope: dict[str, Any] | None) -> bool:
    """``{layer_type: {...}}`` rope parameters (Gemma-3, ...) instead of one dict."""
    return bool(rope) and all(isinstance(v, dict) for v in rope.values())


def native_form(model: nn.Module, engine: str) -> NativeForm:
    """The config-level form of ``model``'s positions, or :class:`ExportRefusedError` when the patch has
    none (the engine would load the weights with the family's own positions and serve another model)."""
    target = patch_target(model)
    config = target.config
    handle = get_handle(target)
    label, kind = "none", "native"
    if handle is not None:
        record = read_record(config)
        label = record.label if record is not None else handle.scheme.name
        kind = handle.scheme.kind
        if not handle.adapter.loads_natively(target, handle.scheme):
            rope = getattr(config, "rope_parameters", None)  # a non-native patch leaves the config as it was
            flat = isinstance(rope, dict) and bool(rope) and not per_layer_type(rope)
            own = f"its own {rope.get('rope_type', 'default')} rope" if flat else "the family's own"
            hint = _NOT_SERVABLE_HINT.get(kind)
            raise ExportRefusedError(
                f"{label} on {config.model_type} has no form {engine} reads: {engine} would load these weights "
                f"with {own} position handling and serve a different model than the patched one."
                + (f" ({hint}.)" if hint else "")
                + " Export a scheme native to the family (rope, linear, ntk, yarn, llama3, ...), or serve with "
                "transformers and hf_posenc.from_pretrained."
            )
    rope = getattr(config, "rope_parameters", None)
    return NativeForm(
        model_type=config.model_type,
        label=label,
        kind=kind,
        rope_parameters=dict(rope) if isinstance(rope, dict) else None,
        max_position_embeddings=getattr(config, "max_position_embeddings", None),
    )
