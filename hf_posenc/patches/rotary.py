"""The rotary module installed in place of a model's own ``rotary_emb``.

It computes ``(cos, sin)`` from ``position_ids`` exactly as transformers' rotary modules do, from the
frequencies of any rotary scheme (NoPE included: zero frequencies rotate by the identity).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn


class FrequencySource(Protocol):
    """What the rotary module needs from a scheme config."""

    name: str
    length_dependent: bool

    def frequencies(self, head_dim: int, seq_len: int | None = None) -> tuple[torch.Tensor, float]: ...

    def length_bucket(self, seq_len: int) -> int: ...


LAYOUTS = ("cat", "interleave", "half")
#: length buckets whose tables a rotary module keeps (bucketed schemes need a handful)
_MAX_TABLES = 64


def sequence_length(position_ids: torch.Tensor, pinned: int | None = None) -> int:
    """The length a length-dependent scheme scales for: the largest position plus one, or ``pinned``
    (the global length of a batch whose sequence is sharded across devices, which one shard's positions
    do not show; see :func:`hf_posenc.train.parallel.pin_global_length`)."""
    local = int(position_ids.max()) + 1
    if pinned is None:
        return local
    if local > pinned:
        raise ValueError(
            f"position {local - 1} is past the pinned global length {pinned}: pin the length of the whole "
            "(unsharded) batch, max(position_ids) + 1."
        )
    return pinned


class PosencRotaryEmbedding(nn.Module):
    """Drop-in ``rotary_emb``: ``forward(x, position_ids) -> (cos, sin)`` of shape (B, L, head_dim).

    Static schemes keep one frequency buffer. Length-dependent ones (dynamic NTK, LongRoPE) recompute
    it only when :meth:`FrequencySource.length_bucket` of the current length changes; ``pinned_length``
    (None unless a sharded step set it) stands in for the length the positions show.
    """

    pinned_length: int | None = None

    def __init__(
        self,
        scheme: FrequencySource,
        head_dim: int,
        device: torch.device | None = None,
        *,
        rotary_dim: int | None = None,
        layout: str = "cat",
        sin_first: bool = False,
    ) -> None:
        """``rotary_dim``: emit tables only for the first ``rotary_dim`` channels (families whose attention
        rotates a prefix, such as GPT-NeoX); None pads to ``head_dim`` with identity pairs (LLaMA).
        ``layout``: how the family lays out its tables: ``cat`` (frequencies twice, transformers'
        default), ``interleave`` (each frequency twice in a row, Cohere/GLM) or ``half`` (each once,
        GPT-OSS and GPT-J apply them to channel pairs themselves). ``sin_first``: return ``(sin, cos)``,
        the order GPT-J's and CodeGen's modules return."""
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.scheme = scheme
        self.head_dim = head_dim
        self.layout = layout
        self.sin_first = sin_first
        self.pairs = (rotary_dim or head_dim) // 2
        inv_freq, scaling = self._frequencies(None)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self.attention_scaling = scaling
        #: length-dependent schemes: (inv_freq, scaling) per length bucket, computed once each. Filled,
        #: never mutated, so threads running different lengths never see each other's frequencies.
        self._tables: dict[Any, tuple[torch.Tensor, float]] = {}
        # Channels past the rotary part (partial rotary) pass through unscaled, as in transformers.
        rotated = inv_freq != 0
        self.register_buffer("_rotated", self._lay_out(rotated), persistent=False)
        self._partial = bool((~rotated).any())

    def tables_for(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Inverse frequencies and attention scaling for this call's positions."""
        if not self.scheme.length_dependent:
            return self.inv_freq, self.attention_scaling
        seq_len = sequence_length(position_ids, self.pinned_length)
        bucket = self.scheme.length_bucket(seq_len)
        if bucket == self.scheme.length_bucket(0):
            return self.inv_freq, self.attention_scaling
        found = self._tables.get(bucket)
        if found is None:
            found = self._frequencies(seq_len)
            if len(self._tables) >= _MAX_TABLES:
                self._tables.clear()
            self._tables[bucket] = found
        return found

    def _frequencies(self, seq_len: int | None) -> tuple[torch.Tensor, float]:
        inv_freq, scaling = self.scheme.frequencies(self.head_dim, seq_len)
        return inv_freq[: self.pairs], scaling

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None):
        return self.cos_sin(x, position_ids, *self.tables_for(position_ids))

    def cos_sin(self, x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float):
        """The tables at ``position_ids`` from the given frequencies (:meth:`tables_for` picks them from
        the positions themselves; the windowed term rotates remapped positions with the frequencies of the
        ordinary ones)."""
        device_type = x.device.type if x.device.type != "mps" else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            freqs = position_ids[..., None].float() * inv_freq.to(device=x.device, dtype=torch.float)
            emb = self._lay_out(freqs)
            cos, sin = emb.cos(), emb.sin()
            if scaling != 1.0 and self._partial:
                scale = torch.where(self._rotated.to(x.device), scaling, 1.0)
                cos, sin = cos * scale, sin * scale
            else:
                cos, sin = cos * scaling, sin * scaling
        cos, sin = cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)
        return (sin, cos) if self.sin_first else (cos, sin)

    def _lay_out(self, freqs: torch.Tensor) -> torch.Tensor:
        if self.layout == "cat":
            return torch.cat((freqs, freqs), dim=-1)
        if self.layout == "interleave":
            return freqs.repeat_interleave(2, dim=-1)
        return freqs

    def extra_repr(self) -> str:
        order = ", sin_first=True" if self.sin_first else ""
        return f"scheme={self.scheme.name}, head_dim={self.head_dim}, layout={self.layout}{order}"


class LayerTypeRotary(nn.Module):
    """Drop-in ``rotary_emb`` for per-layer-type families (Gemma-3, OLMo-3, ...):
    ``forward(x, position_ids, layer_type) -> (cos, sin)`` from one :class:`PosencRotaryEmbedding` per
    layer type (``sliding_attention``, ``full_attention``, ...)."""

    def __init__(self, tables: dict[str, PosencRotaryEmbedding]) -> None:
        super().__init__()
        self.tables = nn.ModuleDict(tables)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None):
        if layer_type is None or layer_type not in self.tables:
            raise KeyError(
                f"per-layer-type rotary called with layer_type={layer_type!r}; it serves {', '.join(self.tables)}"
            )
        return self.tables[layer_type](x, position_ids)
