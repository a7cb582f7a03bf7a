"""Parse scheme specs written on a command line: ``yarn:factor=2:beta_fast=16``, ``none`` for baseline."""

from __future__ import annotations

import json
from typing import Any

from .errors import InvalidParameterError

BASELINE = ("none", "baseline", "unpatched")


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_scheme_spec(spec: str) -> tuple[str, dict[str, Any]] | None:
    """``"yarn:factor=2"`` -> ``("yarn", {"factor": 2})``; a baseline name -> None."""
    name, *parts = [p.strip() for p in spec.strip().split(":")]
    if not name:
        raise InvalidParameterError(f"Empty scheme name in spec {spec!r}.")
    if name.lower() in BASELINE:
        if parts:
            raise InvalidParameterError(f"The baseline {name!r} takes no parameters (got {spec!r}).")
        return None
    params: dict[str, Any] = {}
    for part in parts:
        key, sep, raw = part.partition("=")
        if not sep or not key:
            raise InvalidParameterError(f"Expected key=value after the scheme name, got {part!r} in {spec!r}.")
        params[key.strip()] = _value(raw.strip())
    return name, params


def format_scheme_spec(parsed: tuple[str, dict[str, Any]] | None) -> str:
    if parsed is None:
        return "none"
    name, params = parsed
    return ":".join([name, *(f"{k}={json.dumps(v)}" for k, v in params.items())])
