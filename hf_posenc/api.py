"""The public entry points: patch, unpatch, patched, from_pretrained, is_patched, get_handle."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .errors import AlreadyPatchedError, InvalidParameterError, NotPatchedError
from .patches.base import get_adapter
from .patches.handle import PatchHandle
from .schemes.base import SchemeConfig, get_scheme_class

CONFIG_KEY = "posenc"
_HANDLE_ATTR = "_hf_posenc_handle"
_ABSENT = "__absent__"
# from_pretrained keywords that also apply to loading the config.
_CONFIG_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "subfolder", "trust_remote_code")


def make_scheme(scheme: str | SchemeConfig, **params: Any) -> SchemeConfig:
    """A scheme config from a name (or alias) and parameters, or a config object as is."""
    if isinstance(scheme, SchemeConfig):
        if params:
            raise InvalidParameterError(
                f"Pass parameters either in the {type(scheme).__name__} or as keywords, not both "
                f"(got {sorted(params)})."
            )
        return scheme
    if not isinstance(scheme, str):
        raise InvalidParameterError(f"scheme must be a name or a SchemeConfig, got {type(scheme).__name__}.")
    return get_scheme_class(scheme).from_params(**params)


def get_handle(model: nn.Module) -> PatchHandle | None:
    """The active handle of a patched model, or None."""
    return model.__dict__.get(_HANDLE_ATTR)


def is_patched(model: nn.Module) -> bool:
    return get_handle(model) is not None


def patch(
    model: nn.Module,
    scheme: str | SchemeConfig,
    *,
    replace: bool = False,
    attn_implementation: str | None = None,
    **params: Any,
) -> PatchHandle:
    """Replace the position handling of ``model`` in place, on this instance only.

    Args:
        model: a loaded transformers causal LM (or its base model) of a supported architecture.
        scheme: a scheme name or alias (see :func:`list_schemes`) or a scheme config object.
        replace: unpatch first if the model is already patched (otherwise that is an error).
        attn_implementation: ``"eager"``, ``"sdpa"`` or ``"flex_attention"`` (``"flash_attention_2"``
            where installed and the scheme allows): the backend to run; None keeps the model's own.
        **params: the scheme's parameters, with transformers' ``rope_parameters`` key names.

    Returns:
        The :class:`PatchHandle`; ``unpatch(model)`` or ``handle.unpatch()`` restores the original.
    """
    if is_patched(model):
        if not replace:
            raise AlreadyPatchedError(
                f"This model is already patched with {get_handle(model).scheme.name!r}; "
                "call hf_posenc.unpatch(model) first or pass replace=True."
            )
        unpatch(model)
    config = make_scheme(scheme, **params)
    adapter = get_adapter(model)
    adapter.check_supported(config)
    resolved = config.resolve(adapter.model_info(model))
    handle = PatchHandle(model, resolved, adapter)
    before = {k: id(v) for k, v in model.state_dict(keep_vars=True).items()}
    try:
        adapter.install(model, resolved, handle, attn_implementation)
        after = model.state_dict(keep_vars=True)
        handle.owned_keys = sorted(k for k, v in after.items() if before.get(k) != id(v))
        native = adapter.native_config(model, resolved)
        original = {key: model.config.__dict__.get(key, _ABSENT) for key in native}
        for key, value in native.items():
            handle.set_config(model.config, key, value)
        record = {
            "spec": resolved.to_dict(),
            "architecture": adapter.name,
            "original_config": original,
            "owned_keys": handle.owned_keys,
            # the backend asked for, so hf_posenc.from_pretrained can choose it again (BLOOM, for one,
            # refuses sdpa at load time: only the patch can give it)
            "attn_implementation": attn_implementation,
        }
        handle.set_config(model.config, CONFIG_KEY, record)
    except BaseException:
        handle.undo()
        raise
    model.__dict__[_HANDLE_ATTR] = handle
    return handle


def unpatch(model: nn.Module) -> None:
    """Restore the model exactly as it was before :func:`patch` (modules, config, parameters)."""
    handle = get_handle(model)
    if handle is None:
        raise NotPatchedError("This model is not patched by hf_posenc; nothing to unpatch.")
    handle.undo()
    del model.__dict__[_HANDLE_ATTR]


@contextlib.contextmanager
def patched(model: nn.Module, scheme: str | SchemeConfig, **params: Any) -> Iterator[PatchHandle]:
    """Context manager: patch on entry, unpatch on exit (also on error)."""
    handle = patch(model, scheme, **params)
    try:
        yield handle
    finally:
        if get_handle(model) is handle:
            unpatch(model)


def from_pretrained(
    path_or_hub_id: str,
    *,
    scheme: str | SchemeConfig | None = None,
    scheme_params: dict[str, Any] | None = None,
    model_class: Any = None,
    **hf_kwargs: Any,
) -> nn.Module:
    """Load a checkpoint saved after :func:`patch` and re-apply its recorded scheme.

    The base model is rebuilt from the config as it was before patching, then patched, so
    :func:`unpatch` on the result gives the original model. For a checkpoint without a record, pass
    ``scheme`` (and ``scheme_params``) to patch it on load. ``attn_implementation`` goes to the patch
    (default: the backend recorded at patch time), so every backend the patch can host is available
    whatever the family accepts at load time. Other ``hf_kwargs`` go to transformers'
    ``from_pretrained`` (``dtype``, ``revision``, ...).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config_kwargs = {k: hf_kwargs[k] for k in _CONFIG_KWARGS if k in hf_kwargs}
    config = hf_kwargs.pop("config", None) or AutoConfig.from_pretrained(path_or_hub_id, **config_kwargs)
    record = getattr(config, CONFIG_KEY, None)
    if record is not None and scheme is not None:
        raise InvalidParameterError(
            f"{path_or_hub_id} already records scheme {record['spec']['scheme']!r}; do not pass scheme=."
        )
    if record is None and scheme is None:
        raise NotPatchedError(
            f"{path_or_hub_id} has no '{CONFIG_KEY}' record in its config (it was not saved after "
            "hf_posenc.patch). Pass scheme=... to patch it on load, or use transformers directly."
        )
    backend = hf_kwargs.pop("attn_implementation", None)
    if record is not None:
        backend = backend or record.get("attn_implementation")
        for key, value in record.get("original_config", {}).items():
            if value == _ABSENT:
                config.__dict__.pop(key, None)
            else:
                setattr(config, key, value)
        delattr(config, CONFIG_KEY)
        spec: str | SchemeConfig = SchemeConfig.from_dict(record["spec"])
        params: dict[str, Any] = {}
    else:
        spec, params = scheme, dict(scheme_params or {})
    owned = list(record.get("owned_keys", [])) if record is not None else []
    if owned:  # e.g. a resized learned table: its saved shape differs from the base model's
        hf_kwargs.setdefault("ignore_mismatched_sizes", True)
    loader = model_class or AutoModelForCausalLM
    if owned:  # the patch's own tensors are expected to be "unexpected" to the base model: load them below
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = loader.from_pretrained(path_or_hub_id, config=config, **hf_kwargs)
        finally:
            hf_logging.set_verbosity(level)
    else:
        model = loader.from_pretrained(path_or_hub_id, config=config, **hf_kwargs)
    handle = patch(model, spec, attn_implementation=backend, **params)
    if owned:
        load_owned_tensors(model, path_or_hub_id, owned, config_kwargs)
        for callback in handle.after_load:
            callback()
    return model


def load_owned_tensors(model: nn.Module, path_or_hub_id: str, keys: list[str], hub_kwargs: dict[str, Any]) -> None:
    """Copy the tensors a patch created (``keys``) from the checkpoint's safetensors files."""
    import json

    from safetensors import safe_open
    from transformers.utils import cached_file

    index = cached_file(
        path_or_hub_id, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs
    )
    if index is not None:
        with open(index) as fh:
            weight_map = json.load(fh)["weight_map"]
        files = {key: weight_map[key] for key in keys if key in weight_map}
    else:
        files = dict.fromkeys(keys, "model.safetensors")
    missing = sorted(set(keys) - set(files))
    state = model.state_dict()
    for filename in sorted(set(files.values())):
        with safe_open(cached_file(path_or_hub_id, filename, **hub_kwargs), framework="pt") as fh:
            present = set(fh.keys())
            for key in (k for k, f in files.items() if f == filename):
                if key not in present:
                    missing.append(key)
                    continue
                with torch.no_grad():
                    state[key].copy_(fh.get_tensor(key))
    if missing:
        raise NotPatchedError(f"{path_or_hub_id} lacks tensors its hf_posenc patch created: {', '.join(missing)}.")
