"""Export a patched (or plain) model for a serving engine, refusing what the engine would compute
differently, and verify it by running the engine: ``hf_posenc.export(model, out, target="llama.cpp",
verify=True)`` or ``hf-posenc export MODEL --target llama.cpp --out DIR --verify``."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from .._version import __version__
from ..errors import InvalidParameterError, PosencError, did_you_mean
from .engines import ACCEPTABLE, ENGINES, EngineMissingError, get_engine, hf_model_logprobs
from .native import ExportRefusedError, NativeForm, native_form

#: max |Δ log-prob| allowed by ``verify`` per written dtype, fp32 model vs engine: 2.5x what llama.cpp gave
#: for SmolLM2 at 8,192 tokens (f32 1.97e-3, f16 3.9e-2; docs/export.md); a wrong rope setting moves it by
#: 0.1-10 (the converter's YaRN attention factor: 1.79)
TOLERANCE = {"f32": 5e-3, "f16": 1e-1, "bf16": 2e-1}
EXPORT_RECORD = "hf_posenc_export.json"

__all__ = [
    "ENGINES",
    "EXPORT_RECORD",
    "EngineMissingError",
    "ExportRefusedError",
    "ExportResult",
    "ExportVerificationError",
    "TOLERANCE",
    "export",
]


class ExportVerificationError(PosencError, RuntimeError):
    """The engine's log-probabilities differ from the patched model's beyond the tolerance."""


@dataclass
class ExportResult:
    """What :func:`export` wrote, checked and measured (also written to ``hf_posenc_export.json``)."""

    target: str
    engine_version: str | None
    scheme: str
    out_dir: str
    written: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    serve: str = ""
    verify: dict[str, Any] | None = None
    hf_posenc_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    target: str = "transformers",
    *,
    tokenizer: Any = None,
    dtype: str = "f32",
    accept: tuple[str, ...] | list[str] = (),
    verify: bool = False,
    verify_text: str = "kjv",
    verify_tokens: int = 512,
) -> ExportResult:
    """Write ``model`` (patched with :func:`hf_posenc.patch`, or plain) for ``target`` ("transformers",
    "vllm" or "llama.cpp") into ``out_dir``.

    Every spec the engine would serve differently is refused with :class:`ExportRefusedError`, naming the
    scheme, the engine and what the engine would do instead; ``accept`` opts into the consequences listed in
    :data:`hf_posenc.serving.engines.ACCEPTABLE`. With ``verify=True`` the engine loads the export and
    scores ``verify_tokens`` tokens of ``verify_text`` (any source :func:`hf_posenc.eval.load_texts`
    reads); its next-token log-probabilities are compared with the patched model's, and a max |Δ| above
    :data:`TOLERANCE` raises :class:`ExportVerificationError` (an engine that is not installed raises
    :class:`EngineMissingError`: never a silent pass). What was checked is written to
    ``hf_posenc_export.json`` either way.
    """
    engine = get_engine(target)
    unknown = [a for a in accept if a not in ACCEPTABLE]
    if unknown:
        raise InvalidParameterError(f"Unknown accept value(s) {unknown}.{did_you_mean(unknown[0], ACCEPTABLE)}")
    if dtype not in TOLERANCE:
        raise InvalidParameterError(f"dtype must be one of {', '.join(TOLERANCE)}, got {dtype!r}.")
    if verify and tokenizer is None:
        raise InvalidParameterError("verify=True needs the tokenizer (to turn verify_text into token ids).")
    if verify and (not isinstance(verify_tokens, int) or verify_tokens < 2):
        raise InvalidParameterError(f"verify_tokens must be an integer >= 2, got {verify_tokens!r}.")
    native = native_form(model, engine.name)
    notes = engine.check(native, frozenset(accept))
    if verify:
        engine.require()  # before anything is written
        limit = engine.max_tokens(native)
        if limit is not None and verify_tokens > limit:
            raise InvalidParameterError(
                f"{engine.name} runs at most {limit} tokens of this export (its context is {native.context}); "
                f"use verify_tokens <= {limit}."
            )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = engine.write(model, tokenizer, out, native, dtype)
    result = ExportResult(
        target=engine.name,
        engine_version=engine.version(),
        scheme=native.label,
        out_dir=str(out),
        written=written,
        notes=notes,
        serve=engine.serve_hint(out, native, written),
    )
    failure = None
    if verify:
        result.verify = _verify(model, tokenizer, engine, out, written, native, dtype, verify_text, verify_tokens)
        if result.verify["tokenizes_alike"] is False:
            failure = (
                f"{engine.name} tokenizes {verify_text} differently from the model's tokenizer "
                f"({written.get('tokenizer_note', '')}): served text would give other token ids."
            )
        elif not result.verify["passed"]:
            failure = (
                f"{engine.name} {result.engine_version} differs from the patched model on {verify_tokens} tokens of "
                f"{verify_text}: max |Δ log-prob| {result.verify['max_abs_diff']:.3g} > {result.verify['tolerance']:g} "
                f"(perplexity {result.verify['ppl_model']:.4f} vs {result.verify['ppl_engine']:.4f})."
            )
    _write_record(out / EXPORT_RECORD, result)
    if failure:
        raise ExportVerificationError(failure)
    return result


def _verify(
    model: nn.Module,
    tokenizer: Any,
    engine: Any,
    out: Path,
    written: dict,
    native: NativeForm,
    dtype: str,
    text: str,
    n_tokens: int,
) -> dict[str, Any]:
    from ..eval.data import load_texts, token_stream

    ids = [int(i) for i in token_stream(tokenizer, load_texts(text), n_tokens)[:n_tokens]]
    if len(ids) < n_tokens:
        raise InvalidParameterError(f"{text!r} has {len(ids)} tokens, fewer than verify_tokens={n_tokens}.")
    was_training = model.training
    model.eval()
    try:
        reference = hf_model_logprobs(model, ids)
    finally:
        model.train(was_training)
    start = time.perf_counter()
    served = engine.logprobs(out, written, ids)
    diff = np.abs(served - reference)
    alike = engine.tokenizes_alike(out, written, tokenizer, tokenizer.decode(ids))
    return {
        "text": text,
        "tokens": n_tokens,
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "ppl_model": float(np.exp(-reference.mean())),
        "ppl_engine": float(np.exp(-served.mean())),
        "tolerance": TOLERANCE[dtype],
        "tokenizes_alike": alike,
        "passed": bool(diff.max() <= TOLERANCE[dtype]) and alike is not False,
        "engine_seconds": round(time.perf_counter() - start, 2),
    }


def _write_record(path: Path, result: ExportResult) -> None:
    staged = path.with_name(path.name + ".tmp")
    staged.write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    os.replace(staged, path)
