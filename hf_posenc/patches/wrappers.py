"""Instance-level forwards and per-call state that survive what users do to a model.

- :class:`ForwardWrapper`: installed as ``module.forward`` on one instance. It is an object, not a
  closure: it holds the module it wraps and the forward that was there before, so ``copy.deepcopy`` of
  the model gives a wrapper bound to the copy, and the model pickles.
- :func:`call_state` / :func:`current_state`: state that lives for one call only, kept in a
  :class:`contextvars.ContextVar`, so the same model used from several threads never shares it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from torch import nn

_STATE: ContextVar[dict[int, Any] | None] = ContextVar("hf_posenc_call_state", default=None)


@contextlib.contextmanager
def call_state(owner: object, state: Any) -> Iterator[None]:
    """Make ``state`` the current state of ``owner`` for this call (this thread / task only)."""
    current = _STATE.get() or {}
    token = _STATE.set({**current, id(owner): state})
    try:
        yield
    finally:
        _STATE.reset(token)


def current_state(owner: object) -> Any:
    """The state ``owner`` set for the call in progress in this thread, or None."""
    return (_STATE.get() or {}).get(id(owner))


class ForwardWrapper:
    """Base of hf_posenc's instance-level forwards. ``install`` puts it at ``module.forward`` through a
    handle; :meth:`call_inner` runs what was there before (an earlier instance-level forward, or the
    class's own)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.inner = module.__dict__.get("forward")

    def inner_forward(self) -> Any:
        return self.inner if self.inner is not None else type(self.module).forward.__get__(self.module)

    @property
    def __signature__(self) -> inspect.Signature:
        """The wrapped forward's signature, so callers (and later wrappers) bind arguments by name."""
        return inspect.signature(self.inner_forward())

    def call_inner(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner_forward()(*args, **kwargs)

    def install(self, handle: Any) -> None:
        handle.set_attr(self.module, "forward", self)

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
