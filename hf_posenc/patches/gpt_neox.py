"""GPT-NeoX (Pythia): LLaMA's structure with partial rotary on the first channels of each head.

The generic rotary adapter finds the partial width by probing; this row adds ALiBi and absolute
schemes, whose attention runs through transformers' attention interface (``layer.attention``).
"""

from __future__ import annotations

from typing import ClassVar

from .base import register_architecture
from .rotary_family import LlamaFamilyAdapter


@register_architecture
class GPTNeoXAdapter(LlamaFamilyAdapter):
    name: ClassVar[str] = "gpt_neox"
    model_types: ClassVar[tuple[str, ...]] = ("gpt_neox",)
