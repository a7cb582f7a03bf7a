"""``hf_posenc.from_pretrained``: load a checkpoint saved after :func:`hf_posenc.patch` and re-apply its
recorded scheme, checking that the record belongs to the weights beside it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .api import owned_fingerprint, patch
from .errors import CheckpointNotFoundError, InvalidParameterError, InvalidRecordError, NotPatchedError
from .patches.base import adapter_for_model_type
from .record import ABSENT, RECORD_KEY, read_record
from .schemes.base import SchemeConfig

# from_pretrained keywords that also apply to loading the config.
_CONFIG_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "subfolder", "trust_remote_code")


def check_local_path(path_or_hub_id: str) -> None:
    """A path that is meant to be local (exists, or starts with ``.``, ``/`` or ``~``) must be a folder
    holding a config.json; say so instead of letting the hub client report a bad repo id."""
    path = Path(path_or_hub_id).expanduser()
    looks_local = path.exists() or str(path_or_hub_id).startswith((".", "/", "~", os.sep))
    if not looks_local:
        return
    if not path.exists():
        raise CheckpointNotFoundError(f"No such folder: {path_or_hub_id}.")
    if not path.is_dir():
        raise CheckpointNotFoundError(f"{path_or_hub_id} is a file; pass the folder that holds config.json.")
    if not (path / "config.json").exists():
        raise CheckpointNotFoundError(
            f"{path_or_hub_id} has no config.json: it is not a saved transformers model folder."
        )


def from_pretrained(
    path_or_hub_id: str,
    *,
    scheme: str | SchemeConfig | None = None,
    scheme_params: dict[str, Any] | None = None,
    model_class: Any = None,
    **hf_kwargs: Any,
) -> nn.Module:
    """Load a checkpoint saved after :func:`hf_posenc.patch` and re-apply its recorded scheme.

    The base model is rebuilt from the config as it was before patching, then patched, so
    :func:`hf_posenc.unpatch` on the result gives the original model. For a checkpoint without a
    record, pass ``scheme`` (and ``scheme_params``) to patch it on load. ``attn_implementation`` goes
    to the patch (default: the backend recorded at patch time), so every backend the patch can host is
    available whatever the family accepts at load time. Other ``hf_kwargs`` go to transformers'
    ``from_pretrained`` (``dtype``, ``revision``, ...).

    Raises :class:`InvalidRecordError` when the record is malformed, from a newer hf_posenc, written
    for another architecture, or does not match the tensors saved beside it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path_or_hub_id = str(path_or_hub_id)
    check_local_path(path_or_hub_id)
    config_kwargs = {k: hf_kwargs[k] for k in _CONFIG_KWARGS if k in hf_kwargs}
    config = hf_kwargs.pop("config", None) or AutoConfig.from_pretrained(path_or_hub_id, **config_kwargs)
    record = read_record(config, path_or_hub_id)
    if record is not None and scheme is not None:
        raise InvalidParameterError(f"{path_or_hub_id} already records scheme {record.label!r}; do not pass scheme=.")
    if record is None and scheme is None:
        raise NotPatchedError(
            f"{path_or_hub_id} has no '{RECORD_KEY}' record in its config (it was not saved after "
            "hf_posenc.patch). Pass scheme=... to patch it on load, or use transformers directly."
        )
    backend = hf_kwargs.pop("attn_implementation", None)
    if record is not None:
        adapter = adapter_for_model_type(getattr(config, "model_type", None))
        if adapter is not None and adapter.name != record.architecture:
            raise InvalidRecordError(
                f"{path_or_hub_id}: the '{RECORD_KEY}' record was written for the {record.architecture} adapter, "
                f"but this config's model_type {config.model_type!r} is served by {adapter.name}."
            )
        backend = backend or record.attn_implementation
        for key, value in record.original_config.items():
            if value == ABSENT:
                config.__dict__.pop(key, None)
            else:
                setattr(config, key, value)
        delattr(config, RECORD_KEY)
        spec: str | SchemeConfig = record.scheme()
        params: dict[str, Any] = {}
    else:
        spec, params = scheme, dict(scheme_params or {})
    owned = list(record.owned_keys) if record is not None else []
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
        loaded = owned_fingerprint(model, owned)
        if record.fingerprint is not None and loaded != record.fingerprint:
            raise InvalidRecordError(
                f"{path_or_hub_id}: the tensors the '{RECORD_KEY}' record describes ({', '.join(owned)}) are not "
                "the ones it was written for: the checkpoint was saved again without hf_posenc (for example after "
                "loading it with plain transformers), so the record is stale. Re-patch the model and save it "
                "with hf_posenc, or delete the record from config.json to load the plain model."
            )
        getattr(model.config, RECORD_KEY)["fingerprint"] = loaded
        for callback in handle.after_load:
            callback()
    return model


def load_owned_tensors(model: nn.Module, path_or_hub_id: str, keys: list[str], hub_kwargs: dict[str, Any]) -> None:
    """Copy the tensors a patch created (``keys``) from the checkpoint's safetensors files."""
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
                saved = fh.get_tensor(key)
                if key not in state or state[key].shape != saved.shape:
                    expected = tuple(state[key].shape) if key in state else "no such tensor"
                    raise InvalidRecordError(
                        f"{path_or_hub_id}: {key} is saved with shape {tuple(saved.shape)}, but the recorded patch "
                        f"creates {expected}: the weights or the '{RECORD_KEY}' record were edited after saving."
                    )
                with torch.no_grad():
                    state[key].copy_(saved)
    if missing:
        raise InvalidRecordError(f"{path_or_hub_id} lacks tensors its hf_posenc patch created: {', '.join(missing)}.")
