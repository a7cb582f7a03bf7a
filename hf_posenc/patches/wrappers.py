"""Instance-level forwards and per-call state that survive what users do to a model.

- :class:`ForwardWrapper`: installed as ``module.forward`` on one instance. It is an object, not a
  closure: it holds the module it wraps and the forward that was there before, so ``copy.deepcopy`` of
  the model gives a wrapper bound to the copy, and the model pickles.
- :func:`call_with_state` / :func:`current_state`: state that lives for one call only, kept in a
  :class:`contextvars.ContextVar`, so the same model used from several threads never shares it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import Any

import torch
from torch import nn

_STATE: ContextVar[dict[int, Any] | None] = ContextVar("hf_posenc_call_state", default=None)


@torch.compiler.disable
def push_state(owner: object, state: Any) -> Token:
    """Make ``state`` the current state of ``owner`` (this thread / task only); undo with :func:`pop_state`.
    Runs outside torch.compile's tracing (context variables are not traceable)."""
    current = _STATE.get() or {}
    return _STATE.set({**current, id(owner): state})


@torch.compiler.disable
def pop_state(token: Token) -> None:
    _STATE.reset(token)


@torch.compiler.disable
def current_state(owner: object) -> Any:
    """The state ``owner`` set for the call in progress in this thread, or None."""
    return (_STATE.get() or {}).get(id(owner))


def call_with_state(owner: object, state: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with ``state`` as ``owner``'s state for the duration of the call."""
    token = push_state(owner, state)
    try:
        return fn(*args, **kwargs)
    finally:
        pop_state(token)


def bound_call(obj: Any) -> Any:
    """``obj.__call__`` as a bound method: what hf_posenc installs as an instance attribute. A bound
    method (not the object) is what torch.compile traces like any forward; ``copy.deepcopy`` rebinds
    it to the copied object, and it pickles as ``getattr(obj, "__call__")``."""
    return obj.__call__


class ForwardWrapper:
    """Base of hf_posenc's instance-level forwards. ``install`` puts it at ``module.forward`` through a
    handle; :meth:`call_inner` runs what was there before (an earlier instance-level forward, or the
    class's own)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        inner = module.__dict__.get("forward")
        # an earlier hf_posenc forward is installed as its bound __call__: keep the object itself
        self.inner = inner.__self__ if isinstance(getattr(inner, "__self__", None), ForwardWrapper) else inner

    def inner_forward(self) -> Any:
        return self.inner if self.inner is not None else type(self.module).forward.__get__(self.module)

    @property
    def __signature__(self) -> inspect.Signature:
        """The wrapped forward's signature, so callers (and later wrappers) bind arguments by name.
        Computed once per wrapper (not per call: torch.compile traces the call), and left out of
        copies and pickles, which compute it again."""
        signature = self.__dict__.get("_signature")
        if signature is None:
            signature = self.__dict__["_signature"] = inspect.signature(self.inner_forward())
        return signature

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_signature"}

    def call_inner(self, *args: Any, **kwargs: Any) -> Any:
        if self.inner is not None:
            return self.inner(*args, **kwargs)
        # the class's forward called with the module, not looked up on it: torch.compile resolves a
        # bound lookup to the instance attribute, which is this wrapper
        return type(self.module).forward(self.module, *args, **kwargs)

    def install(self, handle: Any) -> None:
        handle.set_attr(self.module, "forward", bound_call(self))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


class BoundCall:
    """A call to a wrapped forward, bound by name: ``arguments`` (named parameters) and ``extra`` (what
    goes to its ``**kwargs``), both editable; :meth:`kwargs` gives the call back as keywords only (some
    forwards are decorated to rename keywords, so positional replays are not safe)."""

    def __init__(self, wrapper: ForwardWrapper, args: tuple, kwargs: dict) -> None:
        signature = wrapper.__signature__
        self.parameters = signature.parameters
        self.arguments = dict(signature.bind(*args, **kwargs).arguments)
        var_kw = next((p.name for p in self.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        self.extra: dict[str, Any] = dict(self.arguments.pop(var_kw, {})) if var_kw is not None else {}

    def get(self, name: str) -> Any:
        """A named parameter, or the same name among the ``**kwargs``."""
        value = self.arguments.get(name)
        return self.extra.get(name) if value is None else value

    def set(self, name: str, value: Any) -> None:
        """Set a parameter by name: a named one if the forward has it, else through ``**kwargs``."""
        (self.arguments if name in self.parameters else self.extra)[name] = value

    def kwargs(self) -> dict[str, Any]:
        return {**self.arguments, **self.extra}
