"""Per-architecture adapters. Importing this package registers every adapter."""

from .base import ArchitectureAdapter, get_adapter, list_architectures, register_architecture
from .handle import PatchHandle
from .llama import LlamaFamilyAdapter
from .refresh import refresh_count

__all__ = [
    "ArchitectureAdapter",
    "LlamaFamilyAdapter",
    "PatchHandle",
    "get_adapter",
    "list_architectures",
    "refresh_count",
    "register_architecture",
]
