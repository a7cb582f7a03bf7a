"""Pieces every cross-family adapter shares: the attention backend switch, ALiBi slopes, absolute
position modules and learned-table resizing. No architecture names appear here."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import UnsupportedSchemeError
from ..schemes.absolute import LearnedConfig, SinusoidalConfig, extend_table
from ..schemes.alibi import AlibiConfig
from ..schemes.base import ModelInfo, SchemeConfig
from . import backends
from .backends import FLASH, TERM_ATTR, term_class
from .context import DecoderPositions, install_position_context
from .embeddings import LearnedPositions, RotaryAttention, SinusoidalPositions, ZeroPositions
from .flash import flash_available
from .handle import PatchHandle
from .refresh import install_cache_refresh, needs_cache_refresh
from .rotary import PosencRotaryEmbedding

#: rope_theta for families that have no rotary embedding of their own (GPT-2, OPT, BLOOM)
DEFAULT_ROPE_THETA = 10000.0
#: decoder attributes of the modules hf_posenc adds (state-dict prefixes of the tensors it owns)
ROTARY_ATTR = "hf_posenc_rotary"
POSITIONS_ATTR = "hf_posenc_positions"
PLAIN_BACKENDS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")


def positional_family_info(config, max_positions: int | None) -> ModelInfo:
    """ModelInfo for a family with no rotary embedding of its own (GPT-2, OPT, BLOOM): geometry from the
    config's standard attribute names (their attribute maps cover n_embd / n_head), default rope theta."""
    return ModelInfo(
        head_dim=config.hidden_size // config.num_attention_heads,
        num_attention_heads=config.num_attention_heads,
        max_position_embeddings=max_positions,
        rope_theta=DEFAULT_ROPE_THETA,
    )


def current_backend(config) -> str:
    return backends.base_backend(getattr(config, "_attn_implementation", None) or "eager")


def choose_backend(config, requested: str | None, *, needs_hook: bool) -> str | None:
    """The backend to run: ``requested`` or the model's own. Returns the name to set on the config, or
    None to leave it. ``needs_hook``: the scheme needs hf_posenc's registered functions (ALiBi, or a
    family whose attention hf_posenc computes itself)."""
    backend = requested or current_backend(config)
    hosts = (*backends.BACKENDS, FLASH)
    if needs_hook:
        if backend not in hosts:
            raise UnsupportedSchemeError(
                f"attn_implementation={backend!r} cannot host this scheme here; choose one of {', '.join(hosts)}."
            )
        if backend == FLASH and not flash_available():
            raise UnsupportedSchemeError(
                f"attn_implementation={FLASH!r} needs the flash-attn package (pip install flash-attn, on a "
                f"GPU); or choose one of {', '.join(backends.BACKENDS)}."
            )
        backends.register_backends()
        return backends.registered_name(backend)
    if requested is None:
        return None
    if backend in backends.BACKENDS:  # registered names also serve families whose built-in flex is refused
        backends.register_backends()
        return backends.registered_name(backend)
    if backend not in PLAIN_BACKENDS:
        raise UnsupportedSchemeError(
            f"Unknown attn_implementation {backend!r}; choose one of {', '.join(PLAIN_BACKENDS)}."
        )
    return backend


def set_backend(model: nn.Module, handle: PatchHandle, name: str | None) -> None:
    if name is not None and name != getattr(model.config, "_attn_implementation", None):
        handle.set_config(model.config, "_attn_implementation", name)


def is_flash(name: str | None) -> bool:
    return name is not None and backends.base_backend(name) == FLASH


def add_alibi_slopes(
    modules: Iterable[nn.Module], scheme: AlibiConfig, num_heads: int, handle: PatchHandle, device=None
) -> None:
    slopes = scheme.slopes(num_heads).to(device)
    for module in modules:
        add_attention_term(module, term_class("alibi")(slopes.clone()), handle)


def add_attention_term(module: nn.Module, term: nn.Module, handle: PatchHandle) -> None:
    """Install an attention-level scheme's term on one attention module (removed on unpatch)."""
    if TERM_ATTR in module._modules:
        raise RuntimeError(f"{type(module).__name__} already has an hf_posenc attention term")
    handle.set_attr(module, TERM_ATTR, term)


def absolute_module(
    scheme: SchemeConfig | None,
    hidden_size: int,
    *,
    dtype: torch.dtype,
    device=None,
    existing: nn.Embedding | None = None,
) -> nn.Module:
    """The module that maps positions to (B, L, hidden) embeddings for an absolute or empty scheme.

    ``existing``: the table being replaced. A learned scheme resizes it; any other keeps its values
    under the same state-dict key, so checkpoints still carry the original model.
    """
    retired = existing.weight if existing is not None else None
    if isinstance(scheme, SinusoidalConfig):
        return SinusoidalPositions(hidden_size, scheme.base, scheme.scale, dtype=dtype, retired=retired).to(device)
    if isinstance(scheme, LearnedConfig):
        if existing is not None and not scheme.new_table:
            weight = extend_table(existing.weight.detach(), scheme.max_positions, scheme.extend, scheme.init_std)
        else:
            weight = torch.empty(scheme.max_positions, hidden_size, dtype=dtype, device=device)
            weight.normal_(0.0, scheme.init_std)
        table = LearnedPositions(weight.shape[0], hidden_size, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            table.weight.copy_(weight)
        return table
    return ZeroPositions(hidden_size, dtype=dtype, retired=retired).to(device)


def install_rotary_context(
    decoder: nn.Module,
    scheme: SchemeConfig,
    head_dim: int,
    handle: PatchHandle,
    *,
    from_mask: bool,
    device=None,
    attentions: Iterable[nn.Module] = (),
    projections: tuple[str, ...] = (),
    num_heads: int = 0,
    parts: int = 1,
    packed_mask: bool = False,
    outer: nn.Module | None = None,
    explicit_mask: bool = False,
) -> DecoderPositions:
    """RoPE for a family whose attention has no rotary step: a rotary module on the decoder, the
    decoder's position context computing (cos, sin) once per forward, and on each of ``attentions``
    a :class:`RotaryAttention` rotating the outputs of the named q/k ``projections`` (``parts`` rotated
    blocks each); plus the exact cache refresh for length-dependent scalings."""
    rotary = PosencRotaryEmbedding(scheme, head_dim, device)
    handle.set_attr(decoder, ROTARY_ATTR, rotary)
    attentions = list(attentions)
    context = install_position_context(
        decoder,
        handle,
        from_mask=from_mask,
        rotary_attr=ROTARY_ATTR,
        packed_mask=packed_mask,
        outer=outer,
        pass_positions=bool(attentions),
        explicit_mask=explicit_mask,
    )
    for module in attentions:
        wrapper = RotaryAttention(
            module,
            decoder,
            context,
            rotary_attr=ROTARY_ATTR,
            projections=projections,
            num_heads=num_heads,
            head_dim=head_dim,
            parts=parts,
        )
        wrapper.install(handle)
        handle.on_undo(wrapper)
    if needs_cache_refresh(scheme):
        install_cache_refresh(decoder, scheme, handle)
    return context


class RefillOriginalRows:
    """After ``from_pretrained`` loads a resized table, copy its first rows back into the original table
    (whose values the reload could not restore), so ``unpatch`` gives the original model back."""

    def __init__(self, original: torch.Tensor, resized: nn.Module, rows: int) -> None:
        self.original = original
        self.resized = resized
        self.rows = rows

    def __call__(self) -> None:
        with torch.no_grad():
            self.original[: self.rows].copy_(self.resized.weight[: self.rows])
