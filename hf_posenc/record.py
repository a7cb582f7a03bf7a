"""The on-disk record of a patch: ``config.posenc``, typed and versioned, tied to the weights it describes.

``patch`` writes it into the model's config, so ``save_pretrained`` keeps it; the patched model's
``save_pretrained`` refreshes its fingerprint (a hash of the tensors the patch owns) just before saving,
and ``hf_posenc.from_pretrained`` refuses a record whose fingerprint does not match the weights beside it
(a record carried over to other weights, e.g. by a model loaded without hf_posenc and saved again).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ._version import __version__
from .errors import InvalidRecordError
from .schemes.base import SchemeConfig

RECORD_KEY = "posenc"
#: the record layout this release writes; 1 = releases before the fingerprint (read, never written)
FORMAT = 2
#: marks a config attribute the patch added (absent before patching)
ABSENT = "__absent__"
#: fields of a resolved spec that come from the model, left out of a short label
_MODEL_FIELDS = ("rope_theta", "partial_rotary_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class PatchRecord:
    """What ``hf_posenc.from_pretrained`` needs to rebuild a patched model from its checkpoint."""

    spec: dict[str, Any]
    architecture: str
    original_config: dict[str, Any]
    owned_keys: tuple[str, ...] = ()
    attn_implementation: str | None = None
    fingerprint: str | None = None
    library_version: str = __version__
    format: int = FORMAT

    def scheme(self) -> SchemeConfig:
        return SchemeConfig.from_dict(self.spec)

    @property
    def scheme_name(self) -> str:
        return str(self.spec["scheme"])

    @property
    def label(self) -> str:
        """A short spec string (``yarn:factor=2.0``): the scheme and the parameters the user chose."""
        from .specs import format_scheme_spec

        params = {
            key: value
            for key, value in self.spec.items()
            if key not in ("scheme", "version", *_MODEL_FIELDS) and value is not None
        }
        defaults = _defaults(self.scheme_name)
        params = {k: v for k, v in params.items() if defaults.get(k, object()) != v}
        for key, value in list(params.items()):  # a nested scheme (Self-Extend's rope=...) by its name
            if isinstance(value, Mapping) and "scheme" in value:
                if value["scheme"] == "rope":
                    del params[key]  # plain RoPE underneath: the default
                else:
                    params[key] = str(value["scheme"])
        return format_scheme_spec((self.scheme_name, params))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["owned_keys"] = list(self.owned_keys)
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str = "the config") -> PatchRecord:
        """Validate a record read from a config; every defect is an :class:`InvalidRecordError`."""
        where = f"{source}: the '{RECORD_KEY}' record"
        if not isinstance(data, Mapping):
            raise InvalidRecordError(f"{where} must be a mapping, got {type(data).__name__}.")
        fmt = data.get("format", 1)
        if not isinstance(fmt, int) or fmt < 1:
            raise InvalidRecordError(f"{where} has an invalid format {fmt!r}.")
        if fmt > FORMAT:
            raise InvalidRecordError(
                f"{where} has format {fmt}, written by hf_posenc {data.get('library_version', '?')}; this is "
                f"hf_posenc {__version__} (reads formats up to {FORMAT}). Upgrade hf_posenc to load it."
            )
        missing = [key for key in ("spec", "architecture") if key not in data]
        if missing:
            raise InvalidRecordError(
                f"{where} lacks {', '.join(map(repr, missing))} (keys present: {sorted(data)}); it was not "
                "written by hf_posenc or was edited by hand. Delete it from config.json to load the plain model."
            )
        spec = data["spec"]
        if not isinstance(spec, Mapping) or "scheme" not in spec:
            raise InvalidRecordError(f"{where} has a malformed 'spec' (needs a mapping with a 'scheme' key): {spec!r}.")
        owned = data.get("owned_keys") or []
        original = data.get("original_config") or {}
        if not isinstance(owned, list | tuple) or not all(isinstance(k, str) for k in owned):
            raise InvalidRecordError(f"{where} has malformed 'owned_keys' (a list of tensor names): {owned!r}.")
        if not isinstance(original, Mapping):
            raise InvalidRecordError(f"{where} has a malformed 'original_config': {original!r}.")
        record = cls(
            spec=dict(spec),
            architecture=str(data["architecture"]),
            original_config=dict(original),
            owned_keys=tuple(owned),
            attn_implementation=data.get("attn_implementation"),
            fingerprint=data.get("fingerprint"),
            library_version=str(data.get("library_version") or spec.get("version") or "unknown"),
            format=fmt,
        )
        record.scheme()  # unknown scheme or parameter: the registry's error, naming the valid ones
        return record


def _defaults(scheme_name: str) -> dict[str, Any]:
    from .schemes.base import get_scheme_class

    cls = get_scheme_class(scheme_name)
    return {
        f.name: f.default
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING and f.default is not None
    }


def read_record(config: Any, source: str = "the config") -> PatchRecord | None:
    """The validated record on a transformers config, or None when the config has none."""
    data = getattr(config, RECORD_KEY, None)
    return None if data is None else PatchRecord.from_dict(data, source)


def fingerprint(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """A hash of named tensors (names, shapes, dtypes, values), or None when there are none."""
    if not tensors:
        return None
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:32]
