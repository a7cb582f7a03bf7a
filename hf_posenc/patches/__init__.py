"""Per-architecture adapters. Importing this package registers every adapter."""

from .base import ArchitectureAdapter, get_adapter, list_architectures, register_architecture
from .bloom import BloomAdapter
from .gpt2 import GPT2Adapter
from .gpt_neox import GPTNeoXAdapter
from .gptj import GPTJFamilyAdapter
from .handle import PatchHandle
from .opt import OPTAdapter
from .refresh import refresh_count
from .rotary_family import LlamaFamilyAdapter

__all__ = [
    "ArchitectureAdapter",
    "BloomAdapter",
    "GPT2Adapter",
    "GPTJFamilyAdapter",
    "GPTNeoXAdapter",
    "LlamaFamilyAdapter",
    "OPTAdapter",
    "PatchHandle",
    "get_adapter",
    "list_architectures",
    "refresh_count",
    "register_architecture",
]
