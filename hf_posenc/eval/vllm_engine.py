"""``hf-posenc eval --engine vllm``: each scheme exported with :func:`hf_posenc.export` (target "vllm") into a
temporary folder and served by one vLLM process (``vllm_answers.py``, run by the Python with vLLM:
``$HF_POSENC_VLLM_PYTHON``), which answers every retrieval probe of a task in one batch (greedy, token ids
in and out, stopping where transformers' ``generate`` stops) and scores perplexity windows by its prompt
log-probabilities. vLLM is never imported here.

The process starts at the first request a scheme's journal cannot answer, so a resumed run whose answers
are all journaled starts no vLLM."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import InvalidParameterError, PosencError
from ..serving.engines import EngineMissingError, get_engine, vllm_python

if TYPE_CHECKING:
    from .runner import EvalSpec

#: the engines ``EvalSpec(engine=...)`` / ``--engine`` accepts
EVAL_ENGINES = ("transformers", "vllm")
WORKER = Path(__file__).with_name("vllm_answers.py")
#: vLLM dtype and export dtype of each torch dtype the model may be loaded in
DTYPES = {torch.float32: ("float32", "f32"), torch.bfloat16: ("bfloat16", "bf16"), torch.float16: ("float16", "f16")}


class VllmFailedError(PosencError, RuntimeError):
    """The vLLM process failed to start or to answer (its log's tail is in the message)."""


def tokens_needed(tokenizer: Any, spec: EvalSpec) -> int:
    """The longest sequence vLLM must hold for ``spec``: a retrieval prompt (its length, the special tokens
    the tokenizer adds, the tokens generated) or a perplexity window plus the one token vLLM generates."""
    from .tasks import ProbeTask, get_task

    special = len(tokenizer("")["input_ids"])
    need = 0
    for task in map(get_task, spec.tasks):
        if isinstance(task, ProbeTask):
            new = spec.max_new_tokens or task.new_tokens
            need = max(need, max(spec.retrieval_lengths or spec.lengths) + special + new)
        elif task.name == "ppl":
            need = max(need, max(spec.lengths) + 1)
    return need


def check_schemes(model: nn.Module, tokenizer: Any, spec: EvalSpec) -> int:
    """Before any scheme runs: vLLM is installed, every scheme exports for vLLM (else the export's own
    refusal), and vLLM serves the longest request within each export's context. Returns that length
    (vLLM's ``max_model_len``)."""
    from ..api import patched
    from ..serving.native import native_form
    from ..specs import parse_scheme_spec

    vllm_python(required=True)
    if next(model.parameters()).dtype not in DTYPES:
        raise InvalidParameterError(f"--engine vllm serves float32, bfloat16 or float16 weights, not {model.dtype}.")
    engine, need = get_engine("vllm"), tokens_needed(tokenizer, spec)
    for scheme in spec.schemes:
        parsed = parse_scheme_spec(scheme)
        scope = patched(model, parsed[0], **parsed[1]) if parsed is not None else contextlib.nullcontext()
        with scope:
            native = native_form(model, engine.name)  # a scheme with no form vLLM reads is refused here
            engine.check(native, frozenset(spec.accept))
        if native.context is not None and need > native.context:
            raise InvalidParameterError(
                f"{native.label}: vLLM serves at most {native.context} tokens of this export (its context), and the "
                f"longest request needs {need} (the longest length, plus the special tokens and the tokens generated "
                "for retrieval). Use shorter lengths, a scheme that extends the context (e.g. yarn:factor=4), or "
                "--engine transformers."
            )
    return need


class VllmSession:
    """One vLLM process serving one exported folder: JSON lines on its stdin, answers on a pipe."""

    def __init__(self, folder: Path, max_model_len: int, dtype: str, python: str) -> None:
        self.folder, self.log = folder, folder.parent / "vllm.log"
        config = {
            "model": str(folder),
            "max_model_len": max_model_len,
            "dtype": dtype,
            "memory_fraction": float(os.environ.get("HF_POSENC_VLLM_MEMORY", "0.25")),
        }
        (folder.parent / "config.json").write_text(json.dumps(config))
        read, write = os.pipe()
        try:
            with self.log.open("w") as output:  # a file, not a pipe: vLLM's engine processes may outlive it
                self.process = subprocess.Popen(
                    [python, str(WORKER), str(folder.parent / "config.json"), str(write)],
                    stdin=subprocess.PIPE,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    pass_fds=(write,),
                    start_new_session=True,
                    text=True,
                )
        except OSError as err:
            os.close(read)
            raise EngineMissingError(f"HF_POSENC_VLLM_PYTHON={python} cannot be run ({err}); `make vllm`.") from err
        finally:
            os.close(write)
        self._reply, self._buffer = read, b""
        try:
            self.version = self._read()["version"]
        except BaseException:
            self.close()
            raise

    def _failed(self, what: str) -> VllmFailedError:
        tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
        return VllmFailedError(f"vLLM {what} (log {self.log}):\n{tail}")

    def _read(self) -> dict:
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([self._reply], [], [], 1.0)
            chunk = os.read(self._reply, 1 << 20) if ready else b""
            if (ready and not chunk) or (not ready and self.process.poll() is not None):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=10)
                raise self._failed(f"exited (code {self.process.poll()}) before answering")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        reply = json.loads(line)
        if "error" in reply:
            raise self._failed(f"failed: {reply['error']}\n{reply.get('traceback', '')}")
        return reply

    def request(self, message: dict) -> dict:
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise self._failed("exited before the request") from None
        return self._read()

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError, ValueError):
            self.process.stdin.write('{"op": "quit"}\n')
            self.process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # the engine core and workers it started
        self.process.wait()
        os.close(self._reply)


class VllmScheme:
    """vLLM for the scheme the model is patched with now: exported and started at the first request,
    closed (and its temporary folder removed) on exit."""

    def __init__(self, model: nn.Module, tokenizer: Any, spec: EvalSpec, max_model_len: int, log=print) -> None:
        self.model, self.tokenizer, self.spec, self.max_model_len, self.log = model, tokenizer, spec, max_model_len, log
        self.session: VllmSession | None = None
        self._tmp: str | None = None
        eos = model.generation_config.eos_token_id
        self.stop_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def __enter__(self) -> VllmScheme:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.session is not None:
            self.session.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _start(self) -> VllmSession:
        if self.session is None:
            from ..serving import export

            vllm_dtype, export_dtype = DTYPES[next(self.model.parameters()).dtype]
            self._tmp = tempfile.mkdtemp(prefix="hf_posenc_vllm_")
            folder = Path(self._tmp, "model")
            start = time.perf_counter()
            result = export(
                self.model, folder, "vllm", tokenizer=self.tokenizer, dtype=export_dtype, accept=self.spec.accept
            )
            self.session = VllmSession(folder, self.max_model_len, vllm_dtype, vllm_python())
            self.log(
                f"  vLLM {self.session.version} serving {result.scheme} ({vllm_dtype}, max_model_len "
                f"{self.max_model_len}): ready in {time.perf_counter() - start:.0f} s"
            )
        return self.session

    @property
    def version(self) -> str | None:
        return self.session.version if self.session is not None else None

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy continuations of ``prompts``, all in one vLLM batch, decoded as transformers' are."""
        ids = [self.tokenizer(p)["input_ids"] for p in prompts]
        reply = self._start().request(
            {"op": "generate", "prompts": ids, "max_new_tokens": max_new_tokens, "stop_token_ids": self.stop_token_ids}
        )
        return [self.tokenizer.decode(out, skip_special_tokens=True) for out in reply["outputs"]]

    def window_nll(self, windows: torch.Tensor) -> torch.Tensor:
        """NLL of tokens 1..L-1 of each window (B, L) from vLLM's prompt log-probabilities: (B, L-1)."""
        reply = self._start().request({"op": "logprobs", "windows": windows.tolist()})
        return -torch.tensor(reply["logprobs"], dtype=torch.float32)
