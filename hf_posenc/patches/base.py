"""Architecture adapters: where each model family keeps its position handling, and the one registry."""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from torch import nn

from ..errors import HookPointMissingError, UnknownArchitectureError, UnsupportedSchemeError, did_you_mean
from ..schemes.base import ModelInfo, SchemeConfig
from .handle import PatchHandle

_ADAPTERS: dict[str, ArchitectureAdapter] = {}
#: adapters tried, in order, for a model_type with no row (each checks the model's structure itself)
_FALLBACKS: list[ArchitectureAdapter] = []

A = TypeVar("A", bound="type[ArchitectureAdapter]")


class ArchitectureAdapter:
    """Installs schemes into one family of models.

    Subclasses name the ``model_types`` they serve and the scheme ``kinds`` they can host, read the
    model's geometry in :meth:`model_info`, and make every change through the handle in :meth:`install`.
    """

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    kinds: ClassVar[tuple[str, ...]] = ()
    #: serve model types that have no row, when :meth:`accepts` the model's structure
    fallback: ClassVar[bool] = False

    def accepts(self, model: nn.Module) -> bool:
        """For a fallback adapter: whether the model has the structure this adapter patches."""
        return False

    def model_info(self, model: nn.Module) -> ModelInfo:
        raise NotImplementedError

    # One registered instance per adapter class: copies of a patched model share it, pickles name it.
    def __deepcopy__(self, memo: dict) -> ArchitectureAdapter:
        return self

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return adapter_named, (self.name,)

    def check_supported(self, scheme: SchemeConfig) -> None:
        if scheme.kind not in self.kinds:
            raise UnsupportedSchemeError(
                f"The {self.name} adapter cannot host scheme {scheme.name!r} (kind {scheme.kind!r}); "
                f"it hosts kinds: {', '.join(self.kinds)}."
            )

    def install(
        self, model: nn.Module, scheme: SchemeConfig, handle: PatchHandle, attn_implementation: str | None = None
    ) -> None:
        """Make every change through ``handle``; ``attn_implementation`` picks the attention backend
        (None: keep the model's own where it can host the scheme)."""
        raise NotImplementedError

    def native_config(self, model: nn.Module, scheme: SchemeConfig) -> dict[str, Any]:
        """Config attributes that make plain transformers load the patched model correctly."""
        return {}

    def loads_natively(self, model: nn.Module, scheme: SchemeConfig) -> bool:
        """True when plain transformers loads a saved patched model as patched (default: when the
        patch has a native config form)."""
        return bool(self.native_config(model, scheme))

    @staticmethod
    def require(obj: Any, path: str) -> Any:
        """Follow a dotted attribute path or raise :class:`HookPointMissingError` naming it."""
        current = obj
        for part in path.split("."):
            if not hasattr(current, part):
                raise HookPointMissingError(
                    f"{type(obj).__name__} has no '{path}' (missing '{part}'): the installed "
                    "transformers moved this model's position handling; hf_posenc cannot patch it."
                )
            current = getattr(current, part)
        return current


def register_architecture(cls: A) -> A:
    """Class decorator: register one adapter instance for each of its model types."""
    adapter = cls()
    if cls.fallback:
        _FALLBACKS.append(adapter)
    for model_type in cls.model_types:
        if model_type in _ADAPTERS:
            raise ValueError(f"model_type {model_type!r} registered twice")
        _ADAPTERS[model_type] = adapter
    return cls


def get_adapter(model: nn.Module) -> ArchitectureAdapter:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnknownArchitectureError(
            f"{type(model).__name__} has no config.model_type; hf_posenc patches transformers models."
        )
    if model_type in _ADAPTERS:
        return _ADAPTERS[model_type]
    for adapter in _FALLBACKS:
        if adapter.accepts(model):
            return adapter
    raise UnknownArchitectureError(
        f"No hf_posenc adapter for model_type {model_type!r}: it has no rotary_emb module following "
        "transformers' rotary contract, and no adapter row." + did_you_mean(model_type, _ADAPTERS)
    )


def adapter_for_model_type(model_type: str | None) -> ArchitectureAdapter | None:
    """The adapter registered for ``model_type``, or None."""
    return _ADAPTERS.get(model_type) if model_type is not None else None


def adapter_named(name: str) -> ArchitectureAdapter:
    """The registered adapter called ``name``."""
    for adapter in [*_ADAPTERS.values(), *_FALLBACKS]:
        if adapter.name == name:
            return adapter
    names = {a.name for a in [*_ADAPTERS.values(), *_FALLBACKS]}
    raise UnknownArchitectureError(f"No hf_posenc adapter named {name!r}." + did_you_mean(name, names))


def list_architectures() -> dict[str, str]:
    """Supported ``model_type`` values mapped to the adapter that serves them."""
    return {model_type: adapter.name for model_type, adapter in sorted(_ADAPTERS.items())}
