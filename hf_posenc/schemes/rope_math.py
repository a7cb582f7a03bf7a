"""Inverse-frequency math for RoPE and its scalings, written from the papers.

Each function returns the inverse frequencies of the ``dim`` rotated channels (``dim // 2`` values)
and, where the method has one, the attention factor applied to cos and sin. Operation order follows
transformers' ``modeling_rope_utils`` so fp32 results agree to the last bit or two.

References: RoFormer (Su et al. 2021); Position Interpolation (Chen et al. 2023); NTK-aware scaling
(bloc97, 2023); dynamic NTK (emozilla, 2023); YaRN (Peng et al. 2023); LongRoPE (Ding et al. 2024);
Llama 3.1 frequency smoothing (Meta, 2024).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _exponents(dim: int) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim


def default_inv_freq(dim: int, base: float) -> torch.Tensor:
    """RoFormer: ``theta_i = base^(-2i/dim)``."""
    return 1.0 / (base ** _exponents(dim))


def linear_inv_freq(dim: int, base: float, factor: float) -> torch.Tensor:
    """Position interpolation: every frequency divided by ``factor`` (positions squeezed)."""
    inv_freq = default_inv_freq(dim, base)
    inv_freq /= factor
    return inv_freq


def ntk_base(dim: int, base: float, alpha: float) -> float:
    """NTK-aware base: ``base * alpha^(dim / (dim - 2))`` keeps the highest frequency fixed."""
    return base * alpha ** (dim / (dim - 2))


def dynamic_ntk_inv_freq(dim: int, base: float, factor: float, seq_len: int, original_length: int) -> torch.Tensor:
    """Dynamic NTK: the NTK alpha grows with the current length; identity up to ``original_length``."""
    seq_len = max(seq_len, original_length)
    scaled = base * ((factor * seq_len / original_length) - (factor - 1)) ** (dim / (dim - 2))
    return default_inv_freq(dim, scaled)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature ``0.1 * mscale * ln(s) + 1`` (1 when s <= 1)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(
    factor: float,
    attention_factor: float | None = None,
    mscale: float | None = None,
    mscale_all_dim: float | None = None,
) -> float:
    if attention_factor is not None:
        return float(attention_factor)
    if mscale and mscale_all_dim:
        return float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim))
    return yarn_mscale(factor)


def _yarn_correction_dim(rotations: float, dim: int, base: float, length: int) -> float:
    """Channel index whose wavelength completes ``rotations`` turns over ``length`` tokens."""
    return (dim * math.log(length / (rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_inv_freq(
    dim: int,
    base: float,
    factor: float,
    original_length: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    truncate: bool = True,
) -> torch.Tensor:
    """YaRN "NTK-by-parts": interpolate low frequencies, keep high ones, linear ramp between."""
    low = _yarn_correction_dim(beta_fast, dim, base, original_length)
    high = _yarn_correction_dim(beta_slow, dim, base, original_length)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep


def longrope_attention_factor(factor: float, original_length: int) -> float:
    """LongRoPE / Phi-3 default: ``sqrt(1 + ln(s) / ln(L_orig))``."""
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original_length))


def longrope_inv_freq(dim: int, base: float, rescale: Sequence[float]) -> torch.Tensor:
    """LongRoPE: a searched per-channel rescale factor divides each frequency."""
    ext = torch.tensor(list(rescale), dtype=torch.float32)
    return 1.0 / (ext * base ** _exponents(dim))


def llama3_inv_freq(
    dim: int,
    base: float,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_length: int,
) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by ``factor``, short kept, smooth blend in between."""
    inv_freq = default_inv_freq(dim, base)
    low_freq_wavelen = original_length / low_freq_factor
    high_freq_wavelen = original_length / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_length / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotary_dim(head_dim: int, partial_rotary_factor: float) -> int:
    """Number of rotated channels, as transformers computes it."""
    return int(head_dim * partial_rotary_factor)


def pad_to_head(inv_freq: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Pad with zero frequencies (cos 1, sin 0: identity) so the table covers ``head_dim // 2`` pairs."""
    missing = head_dim // 2 - inv_freq.numel()
    if missing <= 0:
        return inv_freq
    return torch.cat([inv_freq, inv_freq.new_zeros(missing)])
