"""Long sequences split across devices: what a training step must do so every position scheme
computes on its shard exactly what it computes on the whole sequence.

Two modes, as accelerate 1.15 names them in ``ParallelismConfig``:

- ``cp`` (``cp_size``, torch's context parallelism; accelerate requires FSDP2): every tensor of the
  batch is cut along the sequence in a load-balanced layout (rank ``r`` of ``n`` holds chunks ``r``
  and ``2n - 1 - r`` of ``2n``), so a rank holds non-contiguous tokens; attention is torch's ring
  attention, which takes over ``F.scaled_dot_product_attention`` with ``is_causal`` and no mask or bias.
- ``sp`` (``sp_size``, DeepSpeed Ulysses): each rank holds a contiguous slice of the sequence; inside
  attention an all-to-all gives every rank the whole sequence for ``heads / n`` of the heads.

What breaks silently, and what this module does about it:

- positions: a shard fed without ``position_ids`` restarts at 0. :func:`prepare_batch` always writes the
  global ``position_ids`` (PoSE's are kept), and ``shift_labels`` (labels shifted by one over the whole
  sequence), so that both travel with the tokens.
- length-dependent schemes (dynamic NTK, LongRoPE) pick their scale from the largest position id a call
  sees (:func:`hf_posenc.patches.rotary.sequence_length`): one shard sees less than the whole sequence,
  and each rank would scale differently. :func:`pin_global_length` makes every rotary module (and the
  cache refresh) use the global length instead.
- ALiBi under head sharding: a rank attends with ``heads / n`` heads, whose slopes are a slice of the
  full set (not the slopes of a smaller model). :func:`shard_alibi_heads` gives each attention term the
  heads its rank holds.
- what cannot be sharded is refused by :func:`check_parallel`, naming what is accepted.

The engine calls :func:`sharded_step` around each micro-batch's forward *and* backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..api import unwrapped_model
from ..errors import InvalidParameterError, UnsupportedSchemeError, did_you_mean

MODES = ("cp", "sp")
#: attention implementations torch's context parallelism runs (its ring attention replaces SDPA)
CP_BACKENDS = ("sdpa", "hf_posenc_sdpa")
#: attention implementations DeepSpeed Ulysses can wrap: accelerate 1.15 accepts the plain names as
#: ``sp_attn_implementation``; hf_posenc's registered names go through :func:`ulysses_handler`
SP_BACKENDS = ("sdpa", "flash_attention_2", "flash_attention_3", "hf_posenc_sdpa", "hf_posenc_flash_attention_2")
#: the batch keys that carry a sequence dimension (dim 1)
SEQUENCE_KEYS = ("input_ids", "labels", "shift_labels", "position_ids", "attention_mask")
#: native transformers rope types that pick their scale from the largest position id
NATIVE_LENGTH_DEPENDENT = ("dynamic", "longrope")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class ShardPlan:
    """How a step's sequence is split: ``mode`` (``cp`` or ``sp``), over ``size`` ranks; ``rank`` is
    this process's place in that group (what :func:`shard_batch` and :func:`shard_alibi_heads` use)."""

    mode: str
    size: int
    rank: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidParameterError(f"parallel mode {self.mode!r} is not known." + did_you_mean(self.mode, MODES))
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 2:
            raise InvalidParameterError(
                f"{self.mode}: size must be an int >= 2 (ranks sharing a sequence), got {self.size!r}."
            )
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 0 <= self.rank < self.size:
            raise InvalidParameterError(f"{self.mode}: rank must be an int in [0, {self.size}), got {self.rank!r}.")


def accelerator_mode(accelerator: Any) -> tuple[str, int] | None:
    """``(mode, size)`` of an accelerate ``Accelerator``'s ``ParallelismConfig`` (None without one, or
    with ``cp_size`` and ``sp_size`` both 1)."""
    config = getattr(accelerator, "parallelism_config", None)
    if config is None:
        return None
    if (config.cp_size or 1) > 1:
        return "cp", config.cp_size
    if (config.sp_size or 1) > 1:
        return "sp", config.sp_size
    return None


def check_accelerator(accelerator: Any, model: nn.Module) -> None:
    """Before ``accelerator.prepare``: :func:`check_parallel` for the accelerator's mode and, under
    ``sp``, Ulysses pointed at the model's own attention implementation (see :func:`ulysses_handler`)."""
    mode = accelerator_mode(accelerator)
    if mode is None:
        return
    check_parallel(model, ShardPlan(*mode))
    if mode[0] == "sp":
        accelerator.parallelism_config.sp_handler.sp_attn_implementation = attn_implementation(model)


def plan_from_accelerator(accelerator: Any) -> ShardPlan | None:
    """This process's :class:`ShardPlan` under an ``Accelerator`` (None when nothing is sharded). Call
    after ``prepare``: the cp mesh, or DeepSpeed's sequence-parallel group, exists then."""
    mode = accelerator_mode(accelerator)
    if mode is None:
        return None
    if mode[0] == "cp":
        return ShardPlan("cp", mode[1], accelerator.torch_device_mesh["cp"].get_local_rank())
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

    return ShardPlan("sp", mode[1], mpu.get_sequence_parallel_rank())


# ----------------------------------------------------------------------------- positions and labels


def global_position_ids(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``(B, L)`` positions of the whole sequence: the batch's own (PoSE, packing) or ``0..L-1``."""
    ids = batch["input_ids"]
    given = batch.get("position_ids")
    if given is None:
        return torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1).contiguous()
    if given.shape[-1] != ids.shape[1]:
        raise InvalidParameterError(
            f"position_ids cover {given.shape[-1]} tokens but input_ids has {ids.shape[1]}: "
            "give one position per token."
        )
    return given.to(torch.long).expand(ids.shape[0], -1).contiguous()


def global_length(position_ids: torch.Tensor) -> int:
    """The length a length-dependent scheme scales the whole batch for (as on one device): the largest
    position plus one."""
    return int(position_ids.max()) + 1


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets over the whole sequence (``labels[:, 1:]``, then ``-100``): sharded with the
    tokens, each shard's loss needs no neighbour (transformers' loss takes them as ``shift_labels``)."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def prepare_batch(batch: Mapping[str, torch.Tensor], plan: ShardPlan) -> dict[str, torch.Tensor]:
    """The batch a sharded step needs, built *before* it is sharded: global ``position_ids``,
    ``shift_labels`` (and ``labels``, kept for the model to compute a loss at all: with
    ``shift_labels`` given, transformers does not shift them), an all-ones ``attention_mask`` (so the
    jumps in a load-balanced shard's positions are not read as packed documents). Refuses what the mode
    cannot express: padding, lengths that do not divide, position jumps under ``sp``. Every tensor is
    new (accelerate's ``maybe_context_parallel`` shards its buffers in place)."""
    ids = batch["input_ids"]
    length = ids.shape[1]
    step = 2 * plan.size if plan.mode == "cp" else plan.size
    if length % step:
        layout = f"2 x cp_size = {step} load-balanced chunks" if plan.mode == "cp" else f"sp_size = {step} ranks"
        raise InvalidParameterError(
            f"{plan.mode}: sequence length {length} does not split into {layout}; use a seq_len divisible by {step}."
        )
    mask = batch.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise InvalidParameterError(
            f"{plan.mode}: the batch has padding (attention_mask has zeros); sharded attention is causal over the "
            "whole row and takes no padding mask. Train on packed full-length blocks."
        )
    positions = global_position_ids(batch)
    if plan.mode == "sp" and bool((positions.diff(dim=-1) != 1).any()):
        raise InvalidParameterError(
            "sp: position_ids jump (PoSE or packed documents); DeepSpeed's current Ulysses code reads every jump in "
            "the gathered position_ids as a document boundary (refused under sdpa, attention cut at the jump under "
            "flash), so these positions would not train as on one device. Use cp (torch), or contiguous positions."
        )
    out = {"input_ids": ids.clone(), "position_ids": positions.clone(), "attention_mask": torch.ones_like(ids)}
    targets = batch.get("shift_labels")
    if targets is None and batch.get("labels") is not None:
        targets = shifted_labels(batch["labels"])
    if targets is not None:
        out["shift_labels"] = out["labels"] = targets.clone()
    return out


def cp_buffers(batch: Mapping[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """``(buffers, seq_dims)`` for ``accelerator.maybe_context_parallel``: every sequence tensor of a
    :func:`prepare_batch` batch, so positions and targets are sharded with the tokens."""
    buffers = [batch[k] for k in SEQUENCE_KEYS if k in batch and k != "labels"]
    return buffers, [1] * len(buffers)


# ----------------------------------------------------------------------------- layouts


def cp_layout(seq_len: int, size: int, *, load_balance: bool = True) -> list[torch.Tensor]:
    """The global token indices each rank holds under torch's context parallelism: with load balancing
    (torch's default when ``seq_len`` divides by ``2 x size``), rank ``r`` holds chunks ``r`` and
    ``2 x size - 1 - r`` of ``2 x size``; without, the ``r``-th contiguous slice."""
    if load_balance and seq_len % (2 * size) == 0:
        chunks = torch.arange(seq_len).view(2 * size, -1)
        return [torch.cat((chunks[r], chunks[2 * size - 1 - r])) for r in range(size)]
    if seq_len % size:
        raise InvalidParameterError(f"cp: sequence length {seq_len} does not split over {size} ranks.")
    return list(torch.arange(seq_len).view(size, -1))


def sp_layout(seq_len: int, size: int) -> list[torch.Tensor]:
    """The global token indices each rank holds under Ulysses: contiguous slices."""
    if seq_len % size:
        raise InvalidParameterError(f"sp: sequence length {seq_len} does not split over {size} ranks.")
    return list(torch.arange(seq_len).view(size, -1))


def shard_batch(batch: Mapping[str, torch.Tensor], plan: ShardPlan, rank: int | None = None) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s part (default ``plan.rank``) of a :func:`prepare_batch` batch: every sequence
    tensor cut in the mode's layout (what accelerate does in place under ``cp``; what the step does
    itself under ``sp``, where no DataLoader adapter runs)."""
    rank = plan.rank if rank is None else rank
    length = batch["input_ids"].shape[1]
    layout = cp_layout(length, plan.size) if plan.mode == "cp" else sp_layout(length, plan.size)
    index = layout[rank].to(batch["input_ids"].device)
    return {k: (v.index_select(1, index) if k in SEQUENCE_KEYS else v) for k, v in batch.items()}


def loss_scale(local_shift_labels: torch.Tensor, global_shift_labels: torch.Tensor, size: int) -> float:
    """Factor for one rank's mean loss so the mean over ranks of ``scale x loss`` is the whole
    sequence's mean loss (ranks hold different numbers of targets: the last token has none). Gradients
    averaged across the ranks (FSDP over ``dp_shard_cp``, DeepSpeed over its data-parallel group) are
    then those of the whole sequence."""
    local = int((local_shift_labels != IGNORE_INDEX).sum())
    total = int((global_shift_labels != IGNORE_INDEX).sum())
    return size * local / total if total else 0.0


# ----------------------------------------------------------------------------- scheme hooks


def _length_holders(model: nn.Module) -> list[Any]:
    """Every object that picks a length-dependent scale: hf_posenc's rotary modules and the cache
    refresh wrapped around a decoder's forward."""
    from ..patches.refresh import CacheRefreshForward
    from ..patches.rotary import PosencRotaryEmbedding
    from ..patches.wrappers import ForwardWrapper

    holders: list[Any] = []
    for module in model.modules():
        if isinstance(module, PosencRotaryEmbedding):
            holders.append(module)
        wrapper = getattr(module.__dict__.get("forward"), "__self__", None)
        while isinstance(wrapper, ForwardWrapper):
            if isinstance(wrapper, CacheRefreshForward):
                holders.append(wrapper)
            wrapper = wrapper.inner
    return holders


@contextlib.contextmanager
def pin_global_length(model: nn.Module, length: int) -> Iterator[None]:
    """Length-dependent schemes (dynamic NTK, LongRoPE) of ``model`` scale for ``length`` (the whole
    batch's, :func:`global_length`) whatever positions a shard holds. Wrap forward *and* backward
    (gradient checkpointing may recompute tables there). A no-op for static schemes."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise InvalidParameterError(f"pinned length must be a positive int, got {length!r}.")
    holders = _length_holders(model)
    before = [h.__dict__.get("pinned_length") for h in holders]
    for holder in holders:
        holder.pinned_length = length
    try:
        yield
    finally:
        for holder, old in zip(holders, before, strict=True):
            if old is None:
                holder.__dict__.pop("pinned_length", None)
            else:
                holder.pinned_length = old


def head_slice(num_heads: int, rank: int, size: int) -> slice:
    """The query heads rank ``rank`` of ``size`` attends with under Ulysses (contiguous blocks)."""
    if num_heads % size:
        raise UnsupportedSchemeError(
            f"sp: {num_heads} attention heads do not split over sp_size={size}; choose an sp_size dividing {num_heads}."
        )
    per = num_heads // size
    return slice(rank * per, (rank + 1) * per)


def alibi_slopes_for_rank(slopes: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """The ALiBi slopes of the heads rank ``rank`` of ``size`` holds: a slice of the full set (the
    slopes of a model with ``heads / size`` heads are different numbers)."""
    return slopes[head_slice(slopes.shape[0], rank, size)]


def _alibi_terms(model: nn.Module) -> list[Any]:
    from ..patches.attention import AlibiTerm

    return [m for m in model.modules() if isinstance(m, AlibiTerm)]


@contextlib.contextmanager
def shard_alibi_heads(model: nn.Module, rank: int, size: int) -> Iterator[None]:
    """Each ALiBi term of ``model`` uses the slopes of the heads rank ``rank`` holds under Ulysses
    (its attention then receives ``heads / size`` query heads). A no-op without ALiBi."""
    terms = _alibi_terms(model)
    before = [t.__dict__.get("heads") for t in terms]
    for term in terms:
        term.heads = head_slice(term.slopes.shape[0], rank, size)
    try:
        yield
    finally:
        for term, old in zip(terms, before, strict=True):
            if old is None:
                term.__dict__.pop("heads", None)
            else:
                term.heads = old


@contextlib.contextmanager
def sharded_step(model: nn.Module, batch: Mapping[str, torch.Tensor], plan: ShardPlan) -> Iterator[None]:
    """Everything a step needs while its sequence is sharded: the global length pinned (from the
    global ``position_ids`` of a :func:`prepare_batch` batch, taken before sharding) and, under ``sp``,
    ALiBi slopes sliced to this rank's heads. Wrap the forward and the backward."""
    length = global_length(global_position_ids(batch))
    with contextlib.ExitStack() as stack:
        stack.enter_context(pin_global_length(model, length))
        if plan.mode == "sp":
            stack.enter_context(shard_alibi_heads(model, plan.rank, plan.size))
        yield


# ----------------------------------------------------------------------------- validation


def attn_implementation(model: nn.Module) -> str:
    config = unwrapped_model(model).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "_attn_implementation", None) or "eager"


def _native_rope_types(config: Any) -> list[str]:
    params = getattr(config, "rope_parameters", None) or {}
    if "rope_type" in params or "type" in params:
        return [params.get("rope_type", params.get("type"))]
    return [p.get("rope_type") for p in params.values() if isinstance(p, dict)]


def check_parallel(model: nn.Module, plan: ShardPlan) -> None:
    """Refuse a model (and its hf_posenc scheme) that ``plan`` would not shard exactly, naming what is
    accepted. Call before ``accelerator.prepare``."""
    import hf_posenc

    inner = unwrapped_model(model)
    backend = attn_implementation(inner)
    handle = hf_posenc.get_handle(inner)
    scheme = handle.scheme if handle is not None else None
    kind = getattr(scheme, "kind", None)
    if plan.mode == "cp":
        if backend not in CP_BACKENDS:
            raise UnsupportedSchemeError(
                f"cp: torch's context parallelism shards attention only through SDPA with a causal mask; this "
                f"model runs attn_implementation={backend!r}. Accepted: {', '.join(CP_BACKENDS)} (load the model "
                "with attn_implementation='sdpa'), or use sp (DeepSpeed Ulysses)."
            )
        if kind == "alibi":
            raise UnsupportedSchemeError(
                "cp: ALiBi adds a bias to the attention scores, and torch's ring attention takes none (with a bias "
                "it raises 'attn_bias is not supported yet'; the bias of a load-balanced shard would also be "
                "computed from local indices). Use sp (DeepSpeed Ulysses), which shards heads and keeps every "
                "rank's slopes (shard_alibi_heads)."
            )
        if kind == "windowed":
            raise UnsupportedSchemeError(
                f"cp: {scheme.name} computes attention itself from two materialised score matrices, which torch's "
                "ring attention never sees: each rank would attend to its own shard only. Use sp (DeepSpeed Ulysses), "
                "where attention sees the whole sequence."
            )
    else:
        if backend not in SP_BACKENDS:
            raise UnsupportedSchemeError(
                f"sp: DeepSpeed Ulysses runs attention on the whole gathered sequence through a causal kernel, and "
                f"rejects eager and flex attention (eager needs a 4D mask; accelerate 1.15 refuses both); this model "
                f"runs attn_implementation={backend!r}. Accepted: {', '.join(SP_BACKENDS)}."
            )
        config = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
        head_slice(config.num_attention_heads, 0, plan.size)
    if handle is None:
        native = [t for t in _native_rope_types(inner.config) if t in NATIVE_LENGTH_DEPENDENT]
        if native:
            raise UnsupportedSchemeError(
                f"{plan.mode}: the model's own rope_type {native[0]!r} picks its scale from the largest position id "
                "a call sees, which differs between shards; patch it with hf_posenc (dynamic_ntk or longrope, e.g. "
                "hf_posenc.patch(model, 'dynamic_ntk', factor=...)) so sharded_step can pin the global length."
            )


def ulysses_handler(model: nn.Module, *, seq_length: int | None = None) -> Any:
    """accelerate's ``DeepSpeedSequenceParallelConfig`` wrapping this model's own attention
    implementation. accelerate 1.15 accepts only sdpa / flash-attention names at construction, while
    DeepSpeed requires the name to equal the model's (``hf_posenc_sdpa`` for an attention-level
    scheme), so the name is set after construction; DeepSpeed accepts any registered one but eager."""
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    backend = attn_implementation(model)
    if backend not in SP_BACKENDS:
        raise UnsupportedSchemeError(f"sp: attn_implementation {backend!r} is not one of {', '.join(SP_BACKENDS)}.")
    handler = DeepSpeedSequenceParallelConfig(
        sp_seq_length=seq_length, sp_seq_length_is_variable=seq_length is None, sp_attn_implementation="sdpa"
    )
    handler.sp_attn_implementation = backend
    return handler
