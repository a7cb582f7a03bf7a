"""GPT-NeoX (Pythia): LLaMA's structure with partial rotary on the first channels of each head.

It shows what adding a family costs: the LLaMA adapter serves it once told where the decoder and
attention live and that attention rotates a channel prefix (so partial rotary is native here).
"""

from __future__ import annotations

from typing import ClassVar

from .base import register_architecture
from .llama import LlamaFamilyAdapter


@register_architecture
class GPTNeoXAdapter(LlamaFamilyAdapter):
    name: ClassVar[str] = "gpt_neox"
    model_types: ClassVar[tuple[str, ...]] = ("gpt_neox",)
    decoder_attr: ClassVar[str] = "gpt_neox"
    attention_attr: ClassVar[str] = "attention"
    rotary_prefix: ClassVar[bool] = True
