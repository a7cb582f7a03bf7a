"""hf_posenc: retrofit the positional encoding of pretrained transformers causal LMs.

>>> import hf_posenc
>>> handle = hf_posenc.patch(model, "yarn", factor=4)   # in place, this instance only
>>> hf_posenc.unpatch(model)                            # bitwise back to the original
"""

from . import patches as patches
from . import schemes as schemes
from ._version import __version__
from .api import get_handle, is_patched, make_scheme, patch, patched, unpatch
from .errors import (
    AlreadyPatchedError,
    CacheRefreshError,
    CheckpointNotFoundError,
    HookPointMissingError,
    InvalidParameterError,
    InvalidRecordError,
    NotPatchedError,
    PosencError,
    PosencWarning,
    UnknownArchitectureError,
    UnknownSchemeError,
    UnsupportedSchemeError,
)
from .loading import from_pretrained
from .patches import PatchHandle, list_architectures, refresh_count
from .patches.shifted import enable_s2_attn
from .schemes import SchemeConfig, list_schemes
from .serving import export

__all__ = [
    "enable_s2_attn",
    "AlreadyPatchedError",
    "CacheRefreshError",
    "CheckpointNotFoundError",
    "HookPointMissingError",
    "InvalidParameterError",
    "InvalidRecordError",
    "NotPatchedError",
    "PatchHandle",
    "PosencError",
    "PosencWarning",
    "SchemeConfig",
    "UnknownArchitectureError",
    "UnknownSchemeError",
    "UnsupportedSchemeError",
    "__version__",
    "export",
    "from_pretrained",
    "get_handle",
    "is_patched",
    "list_architectures",
    "list_schemes",
    "make_scheme",
    "patch",
    "patched",
    "refresh_count",
    "unpatch",
]
