"""Tiny models and a character tokenizer built in code: for tests, CPU recipes and experiments.

``tiny:<model_type>`` anywhere a model name is accepted (recipes, ``hf-posenc eval``, ``hf-posenc patch``)
builds one of these: a 2-layer, 64-wide model of that family (context 64) with random weights (seed 0)
and a 97-symbol ASCII vocabulary.
"""

from __future__ import annotations

from typing import Any

from .errors import InvalidParameterError

TINY_PREFIX = "tiny:"
CHAR_VOCAB = 97  # <unk>, <eos> and printable ASCII
TINY_FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "bloom", "gpt_neox", "opt")


def char_tokenizer():
    """A character-level fast tokenizer over printable ASCII (ids 0..96; 1 is EOS and padding)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)]
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def tiny_config(model_type: str = "llama", *, context: int = 64, width: int = 64, layers: int = 2, **overrides: Any):
    """A small config of the given family (GQA with 2 kv heads where the family has it)."""
    from transformers import AutoConfig

    if model_type not in TINY_FAMILIES:
        raise InvalidParameterError(f"No tiny config for {model_type!r}; choose from {', '.join(TINY_FAMILIES)}.")
    heads = max(1, width // 16)
    if model_type == "gpt2":
        params = dict(n_embd=width, n_layer=layers, n_head=heads, n_positions=context, bos_token_id=1, eos_token_id=1)
    elif model_type == "bloom":
        params = dict(hidden_size=width, n_layer=layers, n_head=heads, bos_token_id=1, eos_token_id=1)
    elif model_type == "opt":
        params = dict(
            hidden_size=width,
            ffn_dim=width * 3 // 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=context,
            word_embed_proj_dim=width,
            bos_token_id=1,
            eos_token_id=1,
            pad_token_id=1,
        )
    elif model_type == "gpt_neox":
        params = dict(
            hidden_size=width,
            intermediate_size=width * 3 // 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=context,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        )
    else:
        params = dict(
            hidden_size=width,
            intermediate_size=width * 3 // 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=context,
        )
    params.update(vocab_size=CHAR_VOCAB, tie_word_embeddings=False)
    params.update(overrides)
    return AutoConfig.for_model(model_type, **params)


def tiny_model(model_type: str = "llama", *, seed: int = 0, attn: str = "eager", **overrides: Any):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def byte_bpe_tokenizer(vocab_size: int = 320, text: str | None = None):
    """A byte-level BPE tokenizer (GPT-2 style, as SmolLM2's) trained on ``text`` (default: the embedded
    corpus): 256 byte symbols, ``vocab_size - 257`` merges and ``<eos>`` (id 0). Deterministic; for tiny
    models that need a real subword tokenizer (``tiny_model(..., vocab_size=vocab_size)``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .eval.data import load_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text if text is not None else load_texts("kjv")[0][:200_000]], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
