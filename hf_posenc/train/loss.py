"""The causal-LM loss without the full ``L x vocab`` logits.

``model(**batch).loss`` makes the output head return every position's logits, and autograd keeps them
(and their gradient) until the backward pass: at 32k tokens and a 49k vocabulary that is 6.4 GB in fp32
before any activation. :class:`LossHead` instead takes over the model's output head for a run. While a
loss is pending, the head receives the final hidden states inside the model's own forward (so DDP,
FSDP and accelerate hooks see an ordinary forward), computes the loss over chunks of positions, each
chunk checkpointed (its logits are recomputed in the backward pass rather than kept), and hands the
model an empty ``(batch, length, 0)`` tensor in place of the logits.

Kernels (``loss: liger`` / ``loss: cce``) fuse the projection and the cross-entropy on CUDA instead of
chunking in Python: Liger-Kernel's fused linear cross-entropy or Apple's cut-cross-entropy, when
installed (``pip install hf_posenc[kernels]``).

Every implementation equals the plain loss (mean token cross-entropy over labels shifted by one,
``-100`` ignored, as transformers computes it), gradients included; :meth:`LossHead.check` proves it
on the run's own model and first batch before training starts.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..api import unwrapped_model
from ..errors import InvalidParameterError

IGNORE_INDEX = -100
#: ``loss`` recipe values: what each computes the causal-LM loss with
LOSSES = {
    "plain": "the model's own loss (full logits)",
    "chunked": "chunks of positions, each checkpointed (pure torch, any device)",
    "liger": "Liger-Kernel's fused linear cross-entropy (CUDA, pip install liger-kernel)",
    "cce": "cut-cross-entropy's fused linear cross-entropy (CUDA, pip install cut-cross-entropy)",
}
#: packages the fused kernels come from (import name, pip name)
KERNEL_PACKAGES = {"liger": ("liger_kernel", "liger-kernel"), "cce": ("cut_cross_entropy", "cut-cross-entropy")}
#: relative difference allowed between this loss and the model's own in :meth:`LossHead.check`
CHECK_TOLERANCE = {"chunked": 1e-5, "liger": 2e-3, "cce": 2e-3}


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """``targets[:, i] = labels[:, i + 1]``; the last position predicts nothing (``-100``)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def output_head(model: nn.Module) -> nn.Module:
    """The module producing the logits, through peft and accelerate wrappers."""
    head = unwrapped_model(model).get_output_embeddings()
    if head is None:
        raise InvalidParameterError(
            f"{type(model).__name__} has no output head (get_output_embeddings()), so the loss cannot be "
            "computed without its full logits; use loss: plain."
        )
    return head


def logit_transform(config) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the model's forward does to the head's output before the loss (scaling, soft-capping), as
    the transformers families that do it declare it in their config."""
    scale = getattr(config, "logit_scale", None)  # Cohere: logits * logit_scale
    divisor = getattr(config, "logits_scaling", None)  # Granite: logits / logits_scaling
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3: cap * tanh(logits / cap)

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if divisor is not None:
            logits = logits / divisor
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


class LossHead:
    """Takes over ``model``'s output head for a run (see the module docstring); :meth:`remove` gives
    it back. Use :meth:`loss` in place of ``model(**batch).loss``."""

    def __init__(self, model: nn.Module, kind: str = "chunked", chunk_size: int = 1024) -> None:
        if kind not in LOSSES or kind == "plain":
            valid = ", ".join(k for k in LOSSES if k != "plain")
            raise InvalidParameterError(f"LossHead computes one of {valid}, got {kind!r}.")
        if chunk_size < 1:
            raise InvalidParameterError(f"loss_chunk_size must be >= 1, got {chunk_size}.")
        if kind in KERNEL_PACKAGES:
            require_kernel(kind)
        self.kind, self.chunk_size = kind, chunk_size
        self.head = output_head(model)
        self.transform = logit_transform(unwrapped_model(model).config)
        self._head_forward = self.head.forward
        self._targets: torch.Tensor | None = None
        self._result: torch.Tensor | None = None
        self.head.forward = self._forward  # this instance only; its state dict and tied weights are untouched

    def remove(self) -> None:
        """Give the head its own forward back."""
        if self.head.__dict__.get("forward") == self._forward:
            del self.head.forward

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
        """The mean next-token loss of ``batch``: its ``shift_labels`` when given, else its ``labels``
        shifted, as transformers reads them."""
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels")}
        given = batch.get("shift_labels")  # already shifted (a sharded sequence: hf_posenc.train.parallel)
        self._targets = given if given is not None else shifted_targets(batch["labels"])
        try:
            model(**inputs, **kwargs)
            result = self._result
        finally:
            self._targets, self._result = None, None
        if result is None:
            raise RuntimeError(f"{type(model).__name__}'s forward never called its output head.")
        return result

    def check(self, model: nn.Module, batch: dict[str, torch.Tensor], tokens: int = 64) -> tuple[float, float]:
        """Compare this loss with the model's own on the first ``tokens`` positions of ``batch``
        (eval mode, no gradient); raise if they differ beyond :data:`CHECK_TOLERANCE`. Returns both."""
        short = {k: v[:, :tokens] for k, v in batch.items()}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                mine = self.loss(model, short, use_cache=False).item()
                reference = model(**short, use_cache=False).loss.item()
        finally:
            model.train(was_training)
        if not math.isclose(mine, reference, rel_tol=CHECK_TOLERANCE[self.kind], abs_tol=1e-6):
            raise InvalidParameterError(
                f"loss: {self.kind} gives {mine:.6f} where the model's own loss is {reference:.6f} on the same "
                "tokens: its forward changes the logits in a way hf_posenc does not reproduce. Use loss: plain."
            )
        return mine, reference

    def _forward(self, hidden: torch.Tensor) -> torch.Tensor:
        targets = self._targets
        if targets is None:  # generation, evaluation outside a loss: the ordinary head
            return self._head_forward(hidden)
        if hidden.shape[:2] != targets.shape:
            raise InvalidParameterError(
                f"The head received hidden states {tuple(hidden.shape)} for labels {tuple(targets.shape)}: the "
                "model kept only some positions' logits (logits_to_keep?), which a loss over every position "
                "cannot use."
            )
        targets = targets.to(hidden.device)
        count = (targets != IGNORE_INDEX).sum()
        if self.kind == "chunked":
            total = hidden.new_zeros((), dtype=torch.float32)
            for start in range(0, hidden.shape[1], self.chunk_size):
                part = slice(start, start + self.chunk_size)
                total = total + checkpoint(self._chunk_nll, hidden[:, part], targets[:, part], use_reentrant=False)
            self._result = total / count.clamp(min=1)
        else:
            self._result = fused_loss(self.kind, self.head, hidden, targets, self.transform)
        return hidden.new_empty(*hidden.shape[:-1], 0)

    def _chunk_nll(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.transform(self._head_forward(hidden)).float()
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def require_kernel(kind: str) -> None:
    """Raise with the install command when the fused kernel's package or a CUDA device is missing."""
    module, package = KERNEL_PACKAGES[kind]
    if importlib.util.find_spec(module) is None:
        raise InvalidParameterError(
            f"loss: {kind} needs {package} (pip install {package}, or pip install hf_posenc[kernels]); "
            "loss: chunked computes the same loss in pure torch on any device."
        )
    if not torch.cuda.is_available():
        raise InvalidParameterError(f"loss: {kind} runs on CUDA only; on this machine use loss: chunked.")


def fused_loss(kind: str, head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, transform) -> torch.Tensor:
    """The mean loss through a fused linear cross-entropy kernel (CUDA). The head must be a plain
    projection (``weight``, optional ``bias``), soft-capping aside."""
    weight, bias = getattr(head, "weight", None), getattr(head, "bias", None)
    if not isinstance(weight, torch.Tensor) or type(head) is not nn.Linear:
        raise InvalidParameterError(
            f"loss: {kind} needs a plain nn.Linear output head, got {type(head).__name__} (a LoRA-wrapped head?); "
            "use loss: chunked."
        )
    probe = torch.ones(1)
    if not torch.equal(transform(probe), probe):
        raise InvalidParameterError(f"loss: {kind} does not apply this model's logit scaling; use loss: chunked.")
    flat, labels = hidden.flatten(0, 1), targets.flatten()
    if kind == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        out = liger_fused_linear_cross_entropy(flat, weight, labels, bias, ignore_index=IGNORE_INDEX)
        return out[0] if isinstance(out, tuple) else out
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(flat, weight, labels, bias=bias, ignore_index=IGNORE_INDEX, reduction="mean")
