"""The attention backends hf_posenc registers with transformers, and the one extension point for
attention-level schemes.

Backends: ``eager``, ``sdpa``, ``flex_attention`` and ``flash_attention_2``, registered once as
``hf_posenc_<name>`` with the mask function of the base backend (a custom name without one would
receive no mask at all). A model uses them only after an adapter points *its own* config at one.

An attention-level scheme takes part in attention through an :class:`AttentionTerm`: a module an
adapter installs on each attention module (at :data:`TERM_ATTR`, through the patch handle). Each
registered backend asks the module's term to attend (``term.attend(backend, module, query, key,
value, attention_mask, scaling=..., dropout=..., **kwargs)``); without a term it runs plain attention.
ALiBi's term adds a bias (:mod:`.attention`); the windowed rotary term (Self-Extend, ReRoPE) merges
two position sets (:mod:`.windowed`). A new attention-level scheme writes its term and one line in
:data:`TERMS`.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import torch
from torch import nn

#: the backends hf_posenc implements (flash-attn only where installed)
BACKENDS = ("eager", "sdpa", "flex_attention")
FLASH = "flash_attention_2"
PREFIX = "hf_posenc_"
#: attribute of an attention module holding its term
TERM_ATTR = "hf_posenc_attention_term"


def registered_name(backend: str) -> str:
    return PREFIX + backend


def base_backend(name: str) -> str:
    return name[len(PREFIX) :] if name.startswith(PREFIX) else name


class AttentionTerm(nn.Module):
    """An attention-level scheme's part in attention (installed per attention module)."""

    #: the backends this term implements
    backends: ClassVar[tuple[str, ...]] = (*BACKENDS, FLASH)

    def attend(
        self,
        backend: str,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of ``query`` (B, H, q, D) over ``key``/``value`` (B, Hkv, kv, D); returns
        (B, q, H, D) and the probabilities where the backend has them."""
        raise NotImplementedError


#: scheme kind -> the term class hosting it (the one registration line per attention-level scheme)
TERMS: dict[str, str] = {
    "alibi": "hf_posenc.patches.attention:AlibiTerm",
    "windowed": "hf_posenc.patches.windowed:WindowedRotaryTerm",
}


def term_class(kind: str) -> type[AttentionTerm]:
    import importlib

    module, name = TERMS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def term_of(module: nn.Module) -> AttentionTerm | None:
    return module._modules.get(TERM_ATTR)


def _dispatcher(backend: str):
    """The function registered for ``backend``: the module's term, or plain attention."""

    def attention_function(
        module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, **kw: Any
    ):
        term = term_of(module)
        if term is None:
            from .attention import PLAIN_FUNCTIONS

            return PLAIN_FUNCTIONS[backend](module, query, key, value, attention_mask, **kw)
        return term.attend(backend, module, query, key, value, attention_mask, **kw)

    attention_function.__name__ = f"hf_posenc_{backend}_attention"
    return attention_function


@functools.cache
def register_backends() -> None:
    """Register the dispatchers and their mask functions with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        AttentionMaskInterface,
        eager_mask,
        flash_attention_mask,
        flex_attention_mask,
        sdpa_mask,
    )

    masks = {"eager": eager_mask, "sdpa": sdpa_mask, "flex_attention": flex_attention_mask, FLASH: flash_attention_mask}
    for backend, mask in masks.items():
        AttentionInterface.register(registered_name(backend), _dispatcher(backend))
        AttentionMaskInterface.register(registered_name(backend), mask)
