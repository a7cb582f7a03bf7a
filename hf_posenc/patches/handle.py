"""The record of one patch: every swap it made, replayed in reverse by ``undo``."""

from __future__ import annotations

import copy
import inspect
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from ..schemes.base import SchemeConfig
    from .base import ArchitectureAdapter

_MISSING = object()


class PatchHandle:
    """Returned by :func:`hf_posenc.patch`; knows the scheme and how to restore the model.

    Every change an adapter makes goes through :meth:`set_attr` or :meth:`set_config`, so unpatching
    cannot forget one. Changes touch the model instance only, never a class or module global.
    """

    def __init__(self, model: nn.Module, scheme: SchemeConfig, adapter: ArchitectureAdapter) -> None:
        self.model = model
        self.scheme = scheme
        self.adapter = adapter
        self._undo: list[Callable[[], None]] = []
        self.active = True
        #: state-dict keys whose tensors the patch created (saved with the model, restored on load)
        self.owned_keys: list[str] = []
        #: run by ``from_pretrained`` after the owned tensors are loaded (e.g. to refill an original table)
        self.after_load: list[Callable[[], None]] = []

    @property
    def architecture(self) -> str:
        return self.adapter.name

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name`` (a submodule, buffer or bound method) and remember the original."""
        old = obj.__dict__.get(name, _MISSING)
        if old is _MISSING and isinstance(obj, nn.Module):
            for store in (obj._modules, obj._parameters, obj._buffers):
                if name in store:
                    old = store[name]
                    break
        setattr(obj, name, value)

        def restore() -> None:
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)

        self._undo.append(restore)

    def set_config(self, config: Any, key: str, value: Any) -> None:
        """Set ``config.key`` and remember the original value (or its absence)."""
        if isinstance(getattr(type(config), key, None), property):  # e.g. _attn_implementation
            old = getattr(config, key)
            setattr(config, key, value)
            self._undo.append(lambda: setattr(config, key, old))
            return
        old = copy.deepcopy(config.__dict__[key]) if key in config.__dict__ else _MISSING
        setattr(config, key, value)

        def restore() -> None:
            if old is _MISSING:
                if key in config.__dict__:
                    delattr(config, key)
            else:
                setattr(config, key, copy.deepcopy(old))

        self._undo.append(restore)

    def replace_forward(self, module: nn.Module, forward: Callable[..., Any], signature: inspect.Signature) -> None:
        """Bind ``forward(self, ...)`` as ``module.forward`` on this instance, advertising ``signature``
        (the signature of the forward it wraps) so later wrappers can bind arguments by name."""
        params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *signature.parameters.values()]
        forward.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        self.set_attr(module, "forward", types.MethodType(forward, module))

    def add_buffer(self, module: nn.Module, name: str, tensor: Any) -> None:
        """Register a non-persistent buffer (follows ``.to()``, not saved) and remove it on undo."""
        if hasattr(module, name):
            raise RuntimeError(f"{type(module).__name__} already has an attribute {name!r}")
        module.register_buffer(name, tensor, persistent=False)
        self._undo.append(lambda: delattr(module, name))

    def add_hook(self, hook_handle: Any) -> None:
        """Keep a torch hook handle and remove the hook on undo."""
        self._undo.append(hook_handle.remove)

    def on_undo(self, fn: Callable[[], None]) -> None:
        """Register any other reversal (kept in the same LIFO order)."""
        self._undo.append(fn)

    def undo(self) -> None:
        """Restore everything, newest change first. Idempotent."""
        while self._undo:
            self._undo.pop()()
        self.active = False

    def unpatch(self) -> None:
        from ..api import unpatch

        unpatch(self.model)

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return f"PatchHandle({self.scheme.name!r} on {self.architecture}, {state})"
