"""Tiny models built from configs (no downloads) and helpers shared by the tests."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_posenc
from hf_posenc import tiny as hf_tiny

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
ORIGINAL_LENGTH = 64  # tiny max_position_embeddings, so "past the original context" is cheap
VOCAB = 97


GRID_ARCHS = ("gpt2", "llama", "bloom", "gpt_neox", "opt")
#: dynamic NTK measured against the tiny models' original context
DYNAMIC = {"factor": 2.0, "original_max_position_embeddings": ORIGINAL_LENGTH}
#: one scheme of every kind: the schemes of the common grid (every family x every kind)
GRID_SCHEMES = [
    ("nope", {}),
    ("sinusoidal", {}),
    ("learned", {"max_positions": 256}),
    ("rope", {}),
    ("yarn", {"factor": 4.0}),
    ("dynamic_ntk", DYNAMIC),
    ("alibi", {}),
]

HALF = 8  # rotary pairs of the tiny LLaMA heads (head_dim 16)
#: every frequency scheme, partial rotary and bucketed dynamic NTK included (the common tester's second set)
FREQUENCY_SCHEMES = [
    ("nope", {}),
    ("rope", {"partial_rotary_factor": 0.5}),
    ("linear", {"factor": 2.0}),
    ("ntk", {"factor": 2.0}),
    ("dynamic_ntk", {"factor": 2.0}),
    ("dynamic_ntk", {"factor": 2.0, "bucket_ratio": 1.25}),
    ("yarn", {"factor": 4.0}),
    ("longrope", {"short_factor": [1.0] * HALF, "long_factor": [1.0 + i for i in range(HALF)], "factor": 4.0}),
    ("llama3", {"factor": 4.0}),
]
#: the attention-level windowed schemes (W % G != 0 included; leaky ReRoPE; Self-Extend over YaRN)
WINDOWED_SCHEMES = [
    ("self_extend", {"group_size": 4, "window_size": 16}),
    ("self_extend", {"group_size": 3, "window_size": 8, "rope": {"scheme": "yarn", "factor": 2.0}}),
    ("rerope", {"window_size": 16}),
    ("rerope", {"window_size": 16, "leak": 4.0}),
    # a length-dependent scheme underneath: frequencies from the sequence length, the cache refreshed exactly
    ("self_extend", {"group_size": 4, "window_size": 16, "rope": {"scheme": "dynamic_ntk", **DYNAMIC}}),
]


def tiny_config(model_type: str = "llama", **overrides):
    """A 2-layer, 4-head, 64-wide model of the given family (GQA 2 kv heads where the family has it)."""
    return hf_tiny.tiny_config(model_type, context=ORIGINAL_LENGTH, **overrides)


def tiny_model(model_type: str = "llama", *, seed: int = 0, attn: str = "eager", **overrides):
    return hf_tiny.tiny_model(model_type, seed=seed, attn=attn, context=ORIGINAL_LENGTH, **overrides)


def native_twin(model, patched_config, attn: str = "eager"):
    """The same weights in a model configured natively with the patched config's rope settings."""
    overrides = {
        "rope_parameters": dict(patched_config.rope_parameters),
        "max_position_embeddings": patched_config.max_position_embeddings,
    }
    config = tiny_config(model.config.model_type, **overrides)
    twin = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def cache_kwargs(model, cache) -> dict:
    """Pass a cache under the keyword this transformers release uses (cache / past_key_values)."""
    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def out_cache(output):
    return getattr(output, "cache", None) or getattr(output, "past_key_values", None)


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


char_tokenizer = hf_tiny.char_tokenizer


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture
def unpatch_all():
    """Models registered here are unpatched after the test, if still patched."""
    models = []
    yield models.append
    for m in models:
        if hf_posenc.is_patched(m):
            hf_posenc.unpatch(m)


@pytest.fixture
def fake_flash(monkeypatch):
    """flash-attn replaced by the CPU stand-in in ``flash_reference`` for the test's duration."""
    import sys

    import flash_reference

    fake = flash_reference.module()
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    return fake


def failing_compile():
    """A stand-in for a compiled flex function whose compile fails (torch 2.13's CPU dynamic-shape bug)."""

    def fail(*args, **kwargs):
        raise torch._dynamo.exc.BackendCompilerFailed(lambda *a: None, RuntimeError("C++ compile error"), None)

    return fail


@pytest.fixture
def flex_compile_fails(monkeypatch):
    """hf_posenc's dynamic-shape flex compile fails for the test's duration (no kind failed before it);
    returns the attention module, whose ``_static_flex`` the test may replace too."""
    from hf_posenc.patches import attention

    monkeypatch.setattr(attention, "_compiled_flex", failing_compile)
    monkeypatch.setattr(attention, "_FLEX_FAILED", set())
    return attention
