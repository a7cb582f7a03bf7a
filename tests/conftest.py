"""Tiny models built from configs (no downloads) and helpers shared by the tests."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hf_posenc

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
ORIGINAL_LENGTH = 64  # tiny max_position_embeddings, so "past the original context" is cheap
VOCAB = 97


GRID_ARCHS = ("gpt2", "llama", "bloom", "gpt_neox", "opt")


def tiny_config(model_type: str = "llama", **overrides):
    """A 2-layer, 4-head, 64-wide model of the given family (GQA 2 kv heads where the family has it)."""
    if model_type == "gpt2":
        params = dict(n_embd=64, n_layer=2, n_head=4, n_positions=ORIGINAL_LENGTH, bos_token_id=0, eos_token_id=0)
    elif model_type == "gpt_neox":
        params = dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=ORIGINAL_LENGTH,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        )
    elif model_type == "opt":
        params = dict(
            hidden_size=64,
            ffn_dim=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=ORIGINAL_LENGTH,
            word_embed_proj_dim=64,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=1,
        )
    elif model_type == "bloom":
        params = dict(hidden_size=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    else:
        params = dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,  # GQA
            max_position_embeddings=ORIGINAL_LENGTH,
        )
    params.update(vocab_size=VOCAB, tie_word_embeddings=False)
    params.update(overrides)
    return AutoConfig.for_model(model_type, **params)


def tiny_model(model_type: str = "llama", *, seed: int = 0, attn: str = "eager", **overrides):
    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


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


def char_tokenizer():
    """A character-level fast tokenizer over printable ASCII (97 ids: fits the tiny models' vocab)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)]
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


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
