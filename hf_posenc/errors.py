"""Exceptions raised by hf_posenc, each naming what went wrong and what would be valid."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PosencError(Exception):
    """Base class of every error hf_posenc raises on purpose."""


class UnknownSchemeError(PosencError, KeyError):
    """The scheme name is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class UnknownArchitectureError(PosencError, KeyError):
    """No adapter is registered for the model's ``model_type``."""

    def __str__(self) -> str:
        return str(self.args[0])


class InvalidParameterError(PosencError, ValueError):
    """A scheme parameter is unknown, missing, of the wrong type or out of range."""


class UnsupportedSchemeError(PosencError, ValueError):
    """The architecture's adapter cannot host this scheme."""


class AlreadyPatchedError(PosencError, RuntimeError):
    """``patch`` was called on a model that is already patched (pass ``replace=True``)."""


class NotPatchedError(PosencError, RuntimeError):
    """``unpatch`` was called on a model that hf_posenc did not patch."""


class HookPointMissingError(PosencError, RuntimeError):
    """The module or attribute an adapter patches is absent: the installed transformers changed."""


class InvalidRecordError(PosencError, ValueError):
    """A checkpoint's ``posenc`` record is malformed, from a newer release, or does not match its weights."""


class CheckpointNotFoundError(PosencError, FileNotFoundError):
    """A local checkpoint path does not exist or is not a saved model folder."""


class CacheRefreshError(PosencError, RuntimeError):
    """A length-dependent scheme must re-encode the cache but has no record of its tokens."""


class PosencWarning(UserWarning):
    """A patched model will behave differently somewhere the user may not expect (e.g. plain loading)."""


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """Return a sentence listing close matches (if any) and all valid names."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"{hint} Valid: {', '.join(valid)}."


class SourceNotFoundError(PosencError, FileNotFoundError):
    """A text source the user named (a ``.txt`` file or a folder of them) does not exist or holds no text."""
