"""The record of one patch: every change it made, replayed in reverse by ``undo``.

Every change is kept as data (the object, the name, the original value), never as a closure, so a
``copy.deepcopy`` of a patched model carries a handle that undoes the *copy*, and a patched model
pickles. Originals taken out of the module tree are held by the module they were taken from, which
applies ``.to()`` / ``.half()`` to them too, so ``unpatch`` after a dtype or device change restores
modules in the model's current dtype and device.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import NotPatchedError

if TYPE_CHECKING:
    from ..schemes.base import SchemeConfig
    from .base import ArchitectureAdapter


class _Missing:
    """The original had no such attribute (a singleton that survives deepcopy and pickling)."""

    def __repr__(self) -> str:
        return "MISSING"

    def __reduce__(self) -> str:
        return "MISSING"

    def __deepcopy__(self, memo: dict) -> _Missing:
        return self


MISSING = _Missing()


@dataclass
class SetAttr:
    """``obj.name`` was ``old`` (or MISSING)."""

    obj: Any
    name: str
    old: Any

    def undo(self) -> None:
        if self.old is MISSING:
            stores = (
                (self.obj._modules, self.obj._parameters, self.obj._buffers) if isinstance(self.obj, nn.Module) else ()
            )
            if self.name in self.obj.__dict__ or any(self.name in store for store in stores):
                delattr(self.obj, self.name)
        else:
            setattr(self.obj, self.name, self.old)


@dataclass
class SetConfig:
    """``config.key`` was ``old`` (a deep copy, or MISSING); ``is_property`` for attributes such as
    ``_attn_implementation`` that the config class implements as properties."""

    config: Any
    key: str
    old: Any
    is_property: bool = False

    def undo(self) -> None:
        if self.is_property:
            setattr(self.config, self.key, self.old)
        elif self.old is MISSING:
            self.config.__dict__.pop(self.key, None)
        else:
            setattr(self.config, self.key, copy.deepcopy(self.old))


@dataclass
class AddedBuffer:
    module: nn.Module
    name: str

    def undo(self) -> None:
        if hasattr(self.module, self.name):
            delattr(self.module, self.name)


@dataclass
class UndoCall:
    """Any other reversal: ``target.undo()`` (an object that knows how to remove itself)."""

    target: Any

    def undo(self) -> None:
        self.target.undo()


class OriginalsFollowApply:
    """Installed as ``module._apply`` (this instance only): runs the module's own ``_apply`` (what
    ``.to()``, ``.half()``, ``.cuda()`` call) and applies the same function to the originals the patch
    took out of this module, so they are restored in the model's current dtype and device."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.originals: list[nn.Module] = []

    def __call__(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        result = type(self.module)._apply(self.module, fn, recurse)
        for original in self.originals:
            original._apply(fn, recurse)
        return result


class PatchHandle:
    """Returned by :func:`hf_posenc.patch`; knows the scheme and how to restore the model.

    Every change an adapter makes goes through this handle, so unpatching cannot forget one. Changes
    touch the model instance only, never a class or module global.
    """

    def __init__(self, model: nn.Module, scheme: SchemeConfig, adapter: ArchitectureAdapter) -> None:
        self.model = model
        self.scheme = scheme
        self.adapter = adapter
        self._undo: list[Any] = []
        self.active = True
        #: state-dict keys whose tensors the patch created (saved with the model, restored on load)
        self.owned_keys: list[str] = []
        #: run by ``from_pretrained`` after the owned tensors are loaded (e.g. to refill an original table)
        self.after_load: list[Any] = []

    @property
    def architecture(self) -> str:
        return self.adapter.name

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name`` (a submodule, buffer or instance-level callable) and remember the original."""
        old = obj.__dict__.get(name, MISSING)
        if old is MISSING and isinstance(obj, nn.Module):
            for store in (obj._modules, obj._parameters, obj._buffers):
                if name in store:
                    old = store[name]
                    break
        if isinstance(obj, nn.Module) and isinstance(old, nn.Module) and old is not value:
            self.hold_original(obj, old)
        setattr(obj, name, value)
        self._undo.append(SetAttr(obj, name, old))

    def hold_original(self, parent: nn.Module, original: nn.Module) -> None:
        """Keep ``original`` (taken out of ``parent``) in step with ``parent``'s ``.to()``/``.half()``."""
        follower = parent.__dict__.get("_apply")
        if not isinstance(follower, OriginalsFollowApply):
            follower = OriginalsFollowApply(parent)
            self.set_attr(parent, "_apply", follower)
        follower.originals.append(original)

    def set_config(self, config: Any, key: str, value: Any) -> None:
        """Set ``config.key`` and remember the original value (or its absence)."""
        if isinstance(getattr(type(config), key, None), property):  # e.g. _attn_implementation
            old = getattr(config, key)
            setattr(config, key, value)
            self._undo.append(SetConfig(config, key, old, is_property=True))
            return
        old = copy.deepcopy(config.__dict__[key]) if key in config.__dict__ else MISSING
        setattr(config, key, value)
        self._undo.append(SetConfig(config, key, old))

    def add_buffer(self, module: nn.Module, name: str, tensor: torch.Tensor) -> None:
        """Register a non-persistent buffer (follows ``.to()``, not saved) and remove it on undo."""
        if hasattr(module, name):
            raise RuntimeError(f"{type(module).__name__} already has an attribute {name!r}")
        module.register_buffer(name, tensor, persistent=False)
        self._undo.append(AddedBuffer(module, name))

    def on_undo(self, target: Any) -> None:
        """Register any other reversal: ``target.undo()`` runs in LIFO order with the rest."""
        self._undo.append(UndoCall(target))

    def undo(self) -> None:
        """Restore everything, newest change first. Idempotent."""
        while self._undo:
            self._undo.pop().undo()
        self.active = False

    def unpatch(self) -> None:
        """Undo this patch; refuses when the model is no longer patched by this handle."""
        from ..api import get_handle, unpatch

        if get_handle(self.model) is not self:
            raise NotPatchedError(
                f"{self!r} is no longer the model's patch (it was undone, or the model was patched again); "
                "call hf_posenc.unpatch(model) to undo the current patch."
            )
        unpatch(self.model)

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return f"PatchHandle({self.scheme.name!r} on {self.architecture}, {state})"
