"""Everything that differs between supported transformers 5.x releases, in one place.

Landmarks (see README "Supported versions"): the forward keyword for the KV cache is
``past_key_values`` up to 5.23 and ``cache`` from 5.24; ``Cache.reset`` zeroes dynamic layers in place
before 5.24 (their length stays) and drops them from 5.24.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from .errors import CacheRefreshError

_CACHE_KEYWORDS = ("cache", "past_key_values")


def cache_keyword(forward: Callable[..., Any]) -> str:
    """The name under which ``forward`` takes the KV cache (``cache`` or ``past_key_values``)."""
    params = inspect.signature(forward).parameters
    for name in _CACHE_KEYWORDS:
        if name in params:
            return name
    raise CacheRefreshError(
        f"{getattr(forward, '__qualname__', forward)} takes neither of {_CACHE_KEYWORDS}; "
        "this transformers release is not supported by hf_posenc's cache refresh."
    )


def output_cache(output: Any) -> Any:
    """The cache object of a model output, under either attribute name."""
    for name in _CACHE_KEYWORDS:
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def empty_cache(cache: Any) -> None:
    """Empty ``cache`` in place (same object, zero tokens), on every supported release."""
    from transformers.cache_utils import DynamicLayer

    cache.reset()
    # Before 5.24, reset() zeroed dynamic layers in place and kept their length (sliding-window layers
    # even report 0 while still holding keys), so drop their contents explicitly.
    for layer in getattr(cache, "layers", ()):
        keys = getattr(layer, "keys", None)
        if isinstance(layer, DynamicLayer) and isinstance(keys, torch.Tensor) and keys.dim() >= 2:
            layer.keys = keys[..., :0, :]
            layer.values = layer.values[..., :0, :]
    if cache.get_seq_length() != 0:
        raise CacheRefreshError(f"Cannot empty a {type(cache).__name__} in place for a cache refresh.")


def enable_activation_checkpointing(model: Any) -> None:
    """Gradient (activation) checkpointing, non-reentrant; the method was renamed in newer 5.x."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


#: compilations allowed for hf_posenc's flex frame, however many the process already holds
FLEX_RECOMPILE_LIMIT = 64


def recompile_headroom():
    """A context raising dynamo's per-function recompile limit (``recompile_limit``, formerly
    ``cache_size_limit``) while hf_posenc's compiled flex attention runs. Past the limit dynamo
    silently runs the function uncompiled, and uncompiled flex attention materialises every score."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{name: max(getattr(config, name), FLEX_RECOMPILE_LIMIT)})
