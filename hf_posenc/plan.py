"""``hf-posenc plan``: the peak memory per device of a fine-tuning recipe, before running it.

An estimate from the model's config (its parameters counted exactly on the meta device) and the
recipe's options, part by part:

- **weights**: every parameter at ``weight_bytes``, divided across devices when sharded (FSDP/ZeRO-3);
- **gradients + optimizer**: fp32 gradients and AdamW's two fp32 moments of the trainable parameters
  (LoRA factors, and embeddings/norms when trained), sharded alike;
- **activations**: what autograd keeps per token and layer for a LLaMA-shaped block (the layer inputs
  only with checkpointing, plus one layer recomputed in the backward pass), with host offload moving
  the kept layer inputs off the device; the sequence is split ``cp``/``sp`` ways under context or
  sequence parallelism (ring attention and Ulysses keep O(tokens / devices) activations per device);
- **logits**: ``tokens x vocab`` fp32 three times over (log-softmax output, its gradient, the logits'
  gradient) for the plain loss; one chunk's worth for ``loss: chunked``; none for the fused kernels.
  The loss's backward finishes before the last layer's starts, so the peak holds the larger of the
  logits and one layer's backward, not both.

Attention is assumed memory-efficient (sdpa/flash/flex: O(tokens)); ``eager`` adds the
``heads x tokens x tokens`` probabilities. ``benchmarks/train_memory.py`` holds the estimate against a
measured step (figures in docs/scaling.md); a test holds it within :data:`MARGIN` on a small model.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .errors import InvalidParameterError, did_you_mean

GIB = 2**30
#: the planner's stated accuracy against a measured step (relative, either way)
MARGIN = 0.20
#: share of a device's memory the advice leaves free (CUDA context, allocator fragmentation, buffers)
HEADROOM = 0.10
#: LoRA's default targets in the recipes ("all-linear": every projection of the decoder blocks)
LORA_TARGETS = "all-linear"
#: model shapes to plan without their weights (hub configs, written out: nothing is downloaded)
PRESETS: dict[str, dict[str, Any]] = {
    "llama3-1b": dict(  # Llama-3.2-1B
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
    ),
    "llama3-8b": dict(  # Llama-3.1-8B
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
    ),
}  # fmt: skip
PARALLEL = ("none", "cp", "sp")
LOSSES = ("plain", "chunked", "fused")
ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class PlanOptions:
    """One recipe's memory-relevant choices (the names follow the recipe keys)."""

    seq_len: int
    batch_size: int = 1
    lora: bool = True
    lora_r: int = 16
    trainable_embeddings: bool = False
    trainable_norms: bool = False
    checkpointing: bool = True
    offload: bool = False
    loss: str = "plain"
    loss_chunk_size: int = 1024
    gpus: int = 1
    parallel: str = "none"  # how the sequence is split across the gpus
    shard: bool = True  # weights, gradients and optimizer sharded across the gpus (FSDP / ZeRO-3)
    weight_bytes: int = 2  # bf16 weights (4: fp32)
    activation_bytes: int = 2
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        for key in ("seq_len", "batch_size", "lora_r", "loss_chunk_size", "gpus"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise InvalidParameterError(f"{key} must be a positive int, got {getattr(self, key)!r}.")
        for key, valid in (("loss", LOSSES), ("parallel", PARALLEL), ("attention", ATTENTION)):
            if getattr(self, key) not in valid:
                raise InvalidParameterError(
                    f"{key} must be one of {', '.join(valid)}, got {getattr(self, key)!r}."
                    + did_you_mean(str(getattr(self, key)), valid)
                )
        for key in ("weight_bytes", "activation_bytes"):
            if getattr(self, key) not in (2, 4):
                raise InvalidParameterError(f"{key} must be 2 (bf16/fp16) or 4 (fp32), got {getattr(self, key)!r}.")
        if self.parallel != "none" and self.seq_len % self.gpus:
            raise InvalidParameterError(
                f"parallel={self.parallel} splits the sequence across {self.gpus} devices: seq_len ({self.seq_len}) "
                "must be a multiple of gpus."
            )

    @property
    def label(self) -> str:
        parts = [f"loss {self.loss}", "checkpointing" if self.checkpointing else "no checkpointing"]
        if self.offload:
            parts.append("offload")
        if self.gpus > 1:
            parts.append(
                f"{self.parallel} x{self.gpus}" if self.parallel != "none" else f"whole sequence on each of {self.gpus}"
            )
        return ", ".join(parts)


@dataclass
class ModelShape:
    """What the estimate reads from a config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int  # key/value width per token and layer (kv heads x head dim)
    vocab: int
    params: int
    embedding_params: int
    norm_params: int
    lora_params_per_rank: int  # LoRA parameters for r = 1 on every decoder-block linear layer


@dataclass
class Plan:
    """Bytes per device, part by part; ``host`` is what offload moves to host memory."""

    options: PlanOptions
    parts: dict[str, int] = field(default_factory=dict)
    host: int = 0

    @property
    def transient_bytes(self) -> int:
        """The backward pass's peak beyond what is kept: the loss's logits first, then one layer at a
        time (never both at once), so the larger of the two."""
        return max(self.parts["logits"], self.parts["layer activations"] + self.parts["attention"])

    @property
    def total_bytes(self) -> int:
        kept = ("weights", "gradients", "optimizer", "layer inputs")
        return sum(self.parts[k] for k in kept) + self.transient_bytes

    @property
    def step_bytes(self) -> int:
        """What a training step adds to the loaded model and its optimizer state (what
        ``benchmarks/train_memory.py`` measures)."""
        return self.total_bytes - self.parts["weights"] - self.parts["optimizer"]

    def to_dict(self) -> dict:
        return {"options": asdict(self.options), "parts": self.parts, "host": self.host, "total": self.total_bytes}


def load_shape(model: str) -> ModelShape:
    """The shape of ``model``: a preset (:data:`PRESETS`), ``smollm2``, a local folder or a hub id."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    if model in PRESETS:
        config = LlamaConfig(**PRESETS[model])
    else:
        source = model
        if model == "smollm2":
            from .real_model import smollm2_path

            source = str(smollm2_path())
        try:
            config = AutoConfig.from_pretrained(source)
        except OSError as exc:
            raise InvalidParameterError(
                f"No config for {model!r} ({exc.__class__.__name__}): give a local folder, a reachable hub id, "
                f"smollm2, or a preset ({', '.join(PRESETS)})."
            ) from None
    text = config.get_text_config()
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in {id(p): p for p in net.parameters()}.values())
    embedding_ids = {id(p) for m in (net.get_input_embeddings(), net.get_output_embeddings()) for p in m.parameters()}
    embedding = sum(p.numel() for p in net.parameters() if id(p) in embedding_ids)
    norms = sum(p.numel() for n, p in net.named_parameters() if "norm" in n.lower())
    head = net.get_output_embeddings()
    lora = sum(
        m.in_features + m.out_features for m in net.modules() if isinstance(m, torch.nn.Linear) and m is not head
    )
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return ModelShape(
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
        heads=heads,
        kv_dim=kv_heads * head_dim,
        vocab=text.vocab_size,
        params=params,
        embedding_params=embedding,
        norm_params=norms,
        lora_params_per_rank=lora,
    )


def estimate(shape: ModelShape, options: PlanOptions) -> Plan:
    """Peak bytes per device of one training step of ``shape`` under ``options``."""
    o = options
    shards = o.gpus if (o.shard and o.gpus > 1) else 1
    split = o.gpus if o.parallel != "none" else 1
    tokens = o.batch_size * o.seq_len // split  # tokens each device holds activations for
    trainable = shape.lora_params_per_rank * o.lora_r if o.lora else shape.params
    if o.lora and o.trainable_embeddings:
        trainable += shape.embedding_params
    if o.lora and o.trainable_norms:
        trainable += shape.norm_params
    a = o.activation_bytes
    # per token, what a LLaMA-shaped block keeps for its backward pass: x, normed x, q, rotated q,
    # attention output, the second residual and its norm (7 x hidden); k, v, rotated k; gate, up,
    # activation, product (4 x intermediate); each LoRA factor's r-wide intermediate (7 of them)
    per_layer = 7 * shape.hidden + 3 * shape.kv_dim + 4 * shape.intermediate + (7 * o.lora_r if o.lora else 0)
    kept_inputs = shape.layers * tokens * shape.hidden * a if o.checkpointing else 0
    # with checkpointing: one layer recomputed, and its gradients; without: every layer, and one's gradients
    layers_kept = (2 if o.checkpointing else shape.layers + 1) * tokens * per_layer * a
    attention = 0
    if o.attention == "eager":
        attention = 2 * o.batch_size * shape.heads * tokens * o.seq_len * a * (1 if o.checkpointing else shape.layers)
    if o.loss == "plain":
        logits = 3 * tokens * shape.vocab * 4
    elif o.loss == "chunked":
        logits = 3 * min(tokens, o.batch_size * o.loss_chunk_size) * shape.vocab * 4
    else:
        logits = 0
    plan = Plan(o)
    plan.parts = {
        "weights": shape.params * o.weight_bytes // shards,
        "gradients": trainable * 4 // shards,
        "optimizer": trainable * 8 // shards,
        "layer inputs": 0 if o.offload else kept_inputs,
        "layer activations": layers_kept,
        "attention": attention,
        "logits": logits,
    }
    plan.host = kept_inputs if o.offload else 0
    return plan


def plan_memory(model: str, options: PlanOptions) -> Plan:
    return estimate(load_shape(model), options)


def fitting_options(shape: ModelShape, base: PlanOptions, budget_bytes: int) -> list[Plan]:
    """Every combination of the memory options (loss, checkpointing, offload, and with several gpus how
    the sequence is split) that fits ``budget_bytes`` less :data:`HEADROOM`, cheapest first in time: the
    first is the advice."""
    plans = []
    splits = ("none", "cp") if base.gpus > 1 else ("none",)
    for parallel, loss, checkpointing, offload in itertools.product(
        splits, ("plain", "chunked"), (False, True), (False, True)
    ):
        if offload and not checkpointing:
            continue
        if parallel != "none" and base.seq_len % base.gpus:
            continue
        options = replace(base, parallel=parallel, loss=loss, checkpointing=checkpointing, offload=offload)
        plans.append(estimate(shape, options))
    # cheapest in time first: no extra work < chunked loss < recompute < offload < splitting the sequence
    plans.sort(
        key=lambda p: (
            p.options.parallel != "none",
            p.options.offload,
            p.options.checkpointing,
            p.options.loss != "plain",
        )
    )
    return [p for p in plans if p.total_bytes <= budget_bytes * (1 - HEADROOM)]


def plan_markdown(model: str, shape: ModelShape, plan: Plan, budget_gib: float, fits: list[Plan]) -> str:
    """The planner's answer as a table and one line of advice."""
    o = plan.options
    lines = [
        f"{model}: {shape.params / 1e9:.2f}B parameters, {shape.layers} layers, vocabulary {shape.vocab:,}; "
        f"{o.batch_size} x {o.seq_len:,} tokens, {'LoRA r=' + str(o.lora_r) if o.lora else 'full fine-tuning'}, "
        f"{o.gpus} device(s); {o.label}",
        "",
        "| part | GiB per device |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {value / GIB:.2f} |" for name, value in plan.parts.items()]
    lines.append(f"| **total** (logits, one layer's backward: the larger counts) | **{plan.total_bytes / GIB:.2f}** |")
    if plan.host:
        lines.append(f"| (host memory, offloaded layer inputs) | {plan.host / GIB:.2f} |")
    lines.append("")
    verdict = "fits" if plan.total_bytes <= budget_gib * GIB * (1 - HEADROOM) else "does not fit"
    lines.append(f"This recipe {verdict} in {budget_gib:g} GiB per device (keeping {HEADROOM:.0%} free).")
    if fits:
        best = fits[0]
        lines.append(f"Cheapest options that fit: {best.options.label} ({best.total_bytes / GIB:.2f} GiB).")
    else:
        lines.append(
            "No combination of loss, checkpointing, offload"
            + (" and context parallelism" if o.gpus > 1 else "")
            + " fits: use more devices (--gpus), a shorter sequence, or a smaller batch."
        )
    return "\n".join(lines) + "\n"
