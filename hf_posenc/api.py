"""The public entry points: patch, unpatch, patched, is_patched, get_handle (loading: :mod:`.loading`)."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import Any

from torch import nn

from .errors import (
    AlreadyPatchedError,
    InvalidParameterError,
    InvalidRecordError,
    NotPatchedError,
    PosencWarning,
)
from .patches.base import get_adapter
from .patches.handle import PatchHandle
from .record import ABSENT, RECORD_KEY, PatchRecord, fingerprint, read_record
from .schemes.base import SchemeConfig, get_scheme_class

_HANDLE_ATTR = "_hf_posenc_handle"


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


def patch_target(model: nn.Module) -> nn.Module:
    """The transformers model a call patches: ``model`` itself, or a peft ``PeftModel``'s base model
    (so patching before or after ``get_peft_model`` reaches the same modules)."""
    if type(model).__module__.startswith("peft") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def unwrapped_model(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / DeepSpeed (``.module``) and peft wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module) and not hasattr(model, "config"):
        model = model.module
    return patch_target(model)


def get_handle(model: nn.Module) -> PatchHandle | None:
    """The active handle of a patched model (or of the base model of a peft model), or None."""
    return patch_target(model).__dict__.get(_HANDLE_ATTR)


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
        model: a loaded transformers causal LM (or its base model, or a peft model wrapping one) of a
            supported architecture.
        scheme: a scheme name or alias (see :func:`list_schemes`) or a scheme config object.
        replace: unpatch first if the model is already patched (otherwise that is an error).
        attn_implementation: ``"eager"``, ``"sdpa"`` or ``"flex_attention"`` (``"flash_attention_2"``
            where installed and the scheme allows): the backend to run; None keeps the model's own.
        **params: the scheme's parameters, with transformers' ``rope_parameters`` key names.

    Returns:
        The :class:`PatchHandle`; ``unpatch(model)`` or ``handle.unpatch()`` restores the original.
    """
    target = patch_target(model)
    if is_patched(target):
        if not replace:
            raise AlreadyPatchedError(
                f"This model is already patched with {get_handle(target).scheme.name!r}; "
                "call hf_posenc.unpatch(model) first or pass replace=True."
            )
        unpatch(target)
    stale = read_record(getattr(target, "config", None), "this model's config")
    if stale is not None:
        raise InvalidRecordError(
            f"This model's config carries an hf_posenc record ({stale.label}) but the model is not patched: it "
            "was loaded from a patched checkpoint without hf_posenc, so its position handling is not what the "
            "record says. Load it with hf_posenc.from_pretrained(path); or, to treat it as a plain model, "
            f"delete the record first (del model.config.{RECORD_KEY})."
        )
    config = make_scheme(scheme, **params)
    adapter = get_adapter(target)
    adapter.check_supported(config)
    resolved = config.resolve(adapter.model_info(target))
    handle = PatchHandle(target, resolved, adapter)
    try:
        own_config(target, handle)
        before = {k: id(v) for k, v in target.state_dict(keep_vars=True).items()}
        adapter.install(target, resolved, handle, attn_implementation)
        after = target.state_dict(keep_vars=True)
        handle.owned_keys = sorted(k for k, v in after.items() if before.get(k) != id(v))
        native = adapter.native_config(target, resolved)
        original = {key: target.config.__dict__.get(key, ABSENT) for key in native}
        for key, value in native.items():
            handle.set_config(target.config, key, value)
        record = PatchRecord(
            spec=resolved.to_dict(),
            architecture=adapter.name,
            original_config=original,
            owned_keys=tuple(handle.owned_keys),
            # the backend asked for, so hf_posenc.from_pretrained can choose it again (BLOOM, for one,
            # refuses sdpa at load time: only the patch can give it)
            attn_implementation=attn_implementation,
            fingerprint=owned_fingerprint(target, handle.owned_keys),
        )
        handle.set_config(target.config, RECORD_KEY, record.to_dict())
        handle.set_attr(target, "save_pretrained", SaveWithRecord(target))
    except BaseException:
        handle.undo()
        raise
    target.__dict__[_HANDLE_ATTR] = handle
    return handle


def own_config(model: nn.Module, handle: PatchHandle) -> None:
    """Give the model (and each of its modules that shares it) its own copy of the config, so a patch
    never changes another model built from the same config object."""
    shared = model.config
    mine = copy.deepcopy(shared)
    for module in model.modules():
        if module.__dict__.get("config") is shared:
            handle.set_attr(module, "config", mine)


def owned_fingerprint(model: nn.Module, keys: list[str] | tuple[str, ...]) -> str | None:
    state = model.state_dict()
    return fingerprint({key: state[key] for key in keys if key in state})


class SaveWithRecord:
    """``save_pretrained`` of a patched model (this instance only): refreshes the record's fingerprint
    of the tensors the patch owns, warns when plain transformers would load a different model, then
    saves as usual."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self.model
        handle = get_handle(model)
        if handle is not None and isinstance(getattr(model.config, RECORD_KEY, None), dict):
            record = dict(getattr(model.config, RECORD_KEY))
            record["fingerprint"] = owned_fingerprint(model, handle.owned_keys)
            setattr(model.config, RECORD_KEY, record)
            if not handle.adapter.loads_natively(model, handle.scheme):
                warnings.warn(
                    f"{handle.scheme.name} on {handle.architecture} has no equivalent in transformers' own config: "
                    "this checkpoint loads as patched only with hf_posenc.from_pretrained(path); plain "
                    "AutoModelForCausalLM.from_pretrained(path) would load the model as it was before patching.",
                    PosencWarning,
                    stacklevel=2,
                )
        return type(model).save_pretrained(model, *args, **kwargs)


def unpatch(model: nn.Module) -> None:
    """Restore the model exactly as it was before :func:`patch` (modules, config, parameters)."""
    target = patch_target(model)
    handle = get_handle(target)
    if handle is None:
        raise NotPatchedError("This model is not patched by hf_posenc; nothing to unpatch.")
    handle.undo()
    del target.__dict__[_HANDLE_ATTR]


@contextlib.contextmanager
def patched(model: nn.Module, scheme: str | SchemeConfig, **params: Any) -> Iterator[PatchHandle]:
    """Context manager: patch on entry, unpatch on exit (also on error)."""
    handle = patch(model, scheme, **params)
    try:
        yield handle
    finally:
        if get_handle(model) is handle:
            unpatch(model)
