"""Scheme configs and their pure-torch math. Importing this package registers every scheme."""

from .absolute import LearnedConfig, SinusoidalConfig
from .alibi import AlibiConfig
from .base import (
    ModelInfo,
    SchemeConfig,
    canonical_scheme_name,
    get_scheme_class,
    list_schemes,
    register_scheme,
)
from .nope import NoPEConfig
from .rope import (
    DynamicNTKConfig,
    LinearConfig,
    Llama3Config,
    LongRoPEConfig,
    NTKConfig,
    RoPEConfig,
    RotaryScheme,
    YarnConfig,
)
from .windowed import ReRoPEConfig, SelfExtendConfig, WindowedScheme

__all__ = [
    "ReRoPEConfig",
    "SelfExtendConfig",
    "WindowedScheme",
    "AlibiConfig",
    "LearnedConfig",
    "SinusoidalConfig",
    "DynamicNTKConfig",
    "Llama3Config",
    "LinearConfig",
    "LongRoPEConfig",
    "ModelInfo",
    "NTKConfig",
    "NoPEConfig",
    "RoPEConfig",
    "RotaryScheme",
    "SchemeConfig",
    "YarnConfig",
    "canonical_scheme_name",
    "get_scheme_class",
    "list_schemes",
    "register_scheme",
]
