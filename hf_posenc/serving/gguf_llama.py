"""Write a LLaMA-architecture model (LLaMA, Mistral) as a GGUF file llama.cpp loads: f32 or f16 tensors
(never quantised), the hyper-parameters, the tokenizer, and the rope metadata of :mod:`.rope_gguf`.

llama.cpp's LLaMA graph rotates adjacent channel pairs (2i, 2i+1); transformers' LLaMA rotates the two
halves of each head (i, i + d/2). The q and k projections are re-ordered per head so both compute the
same attention scores: output row i + (d/2)·h of each head goes to row 2i + h (h = 0, 1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UnsupportedSchemeError

#: transformers model types whose decoder is LLaMA's, as llama.cpp's "llama" architecture reads it
GGUF_LLAMA_MODEL_TYPES = ("llama", "mistral")
#: llama.cpp pre-tokenizers tried, in order, for a byte-level BPE tokenizer (see :func:`choose_tokenizer_pre`)
PRE_TOKENIZERS = ("default", "gpt-2", "smollm", "llama-bpe", "qwen2", "deepseek-llm", "starcoder", "olmo", "falcon")
#: text that tells pre-tokenizers apart (digits, runs of spaces, newlines, contractions, punctuation, unicode)
PRE_TOKENIZER_PROBE = "It's 2024: 12345 + 678 = 13023.\n\n  Indented   spaces\ttab don't WON'T über café ☃ ---?!"
DTYPES = {"f32": (np.float32, 0), "f16": (np.float16, 1)}  # numpy dtype, general.file_type


def interleave_halves(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection (or bias) re-ordered per head from halves to adjacent pairs."""
    rows = weight.shape[0]
    head_dim = rows // n_heads
    rest = weight.shape[1:]
    return weight.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(rows, *rest)


def check_llama_layout(config: Any) -> None:
    """Refuse what llama.cpp's "llama" graph would compute differently from transformers."""
    if config.model_type not in GGUF_LLAMA_MODEL_TYPES:
        raise UnsupportedSchemeError(
            f"GGUF export covers the LLaMA architecture ({', '.join(GGUF_LLAMA_MODEL_TYPES)}); this model is "
            f"{config.model_type!r}. Export it for transformers or vllm, or convert it with llama.cpp's "
            "convert_hf_to_gguf.py and check it with hf-posenc export --verify."
        )
    problems = []
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("attention or MLP biases")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config.hidden_act!r} (llama.cpp's LLaMA uses SiLU)")
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings:
        problems.append(f"a sliding window of {window} tokens (llama.cpp's LLaMA attends to the whole context)")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("partial_rotary_factor") not in (None, 1, 1.0):
        problems.append(f"partial rotary ({rope['partial_rotary_factor']})")
    if problems:
        raise UnsupportedSchemeError(
            f"llama.cpp would serve this {config.model_type} differently: {'; '.join(problems)}. "
            "Export it for transformers or vllm instead."
        )


def _tokenizer_spec(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else {}


def is_byte_level_bpe(tokenizer: Any) -> bool:
    """GPT-2-style byte-level BPE (SmolLM2, Llama 3, Qwen2, ...): the tokenizers llama.cpp's "gpt2" reads."""
    spec = _tokenizer_spec(tokenizer)
    return (spec.get("model") or {}).get("type") == "BPE" and "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))


def _tokenizer_metadata(writer: Any, tokenizer: Any, vocab_size: int, pre: str) -> str:
    """Byte-level BPE tokenizers are written with their merges; anything else is written as "no_vocab"
    (the model then runs on token ids only). Returns the model written ("gpt2" or "no_vocab")."""
    import gguf

    spec = _tokenizer_spec(tokenizer) if tokenizer is not None else {}
    model = spec.get("model") or {}
    if tokenizer is None or not is_byte_level_bpe(tokenizer):
        writer.add_tokenizer_model("no_vocab")
        writer.add_vocab_size(vocab_size)
        return "no_vocab"
    vocab = dict(model["vocab"])
    specials = {}
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        specials[added["id"]] = added.get("special", False)
    by_id = {i: token for token, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(
                gguf.TokenType.CONTROL if specials.get(i) else
                gguf.TokenType.USER_DEFINED if i in specials else gguf.TokenType.NORMAL
            )  # fmt: skip
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{name}_token_id")(int(token_id))
    writer.add_add_bos_token(False)
    return "gpt2"


def write_llama_gguf(
    model: torch.nn.Module,
    tokenizer: Any,
    path: str | Path,
    rope: dict[str, Any],
    *,
    dtype: str = "f32",
    tokenizer_pre: str = "default",
    tensors: bool = True,
) -> dict[str, Any]:
    """Write ``model`` (its unpatched weights; positions come from ``rope``, see
    :func:`hf_posenc.serving.engines.gguf_rope`) to ``path``; ``tensors=False`` writes the metadata only
    (enough for llama.cpp's ``vocab_only`` loading). Returns what was written."""
    import gguf

    config = model.config
    check_llama_layout(config)
    np_dtype, file_type = DTYPES[dtype]
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(Path(str(getattr(config, "_name_or_path", "model")) or "model").name or "model")
    writer.add_file_type(file_type)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope["freq_base"]))
    writer.add_rope_scaling_type(gguf.RopeScalingType(rope["type"]))
    if rope.get("factor") is not None:
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if rope.get("original_context_length") is not None:
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_context_length"]))
    if rope.get("attn_factor") is not None:
        writer.add_rope_scaling_attn_factors(float(rope["attn_factor"]))
    vocab = config.vocab_size
    written_tokenizer = _tokenizer_metadata(writer, tokenizer, vocab, tokenizer_pre)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    tied = getattr(config, "tie_word_embeddings", False)
    count = 0
    for key, tensor in state.items() if tensors else ():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output is absent
        stem = key.removesuffix(".weight")
        name = names.get_name(stem)
        if name is None:
            raise UnsupportedSchemeError(f"No GGUF name for the tensor {key!r}: its layout is not LLaMA's.")
        data = tensor.detach().to(torch.float32).cpu()
        if stem.endswith("self_attn.q_proj"):
            data = interleave_halves(data, n_heads)
        elif stem.endswith("self_attn.k_proj"):
            data = interleave_halves(data, n_kv)
        array = data.numpy()
        if data.dim() > 1:  # norms stay f32, as llama.cpp's own converter keeps them
            array = array.astype(np_dtype)
        writer.add_tensor(f"{name}.weight", array)
        count += 1
    if tensors and rope.get("freq_factors") is not None:
        writer.add_tensor("rope_freqs.weight", np.asarray(rope["freq_factors"], dtype=np.float32))
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = {"tokenizer": written_tokenizer, "tensors": count, "dtype": dtype}
    return {**out, "tokenizer_pre": tokenizer_pre} if written_tokenizer == "gpt2" else out


def llama_cpp_tokenize(path: str | Path, text: str) -> list[int]:
    """Token ids of ``text`` as llama.cpp tokenizes it with the GGUF at ``path`` (vocabulary only)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=False, special=False)
    finally:
        llm.close()


def choose_tokenizer_pre(model: torch.nn.Module, tokenizer: Any, folder: Path, text: str) -> str | None:
    """The first of :data:`PRE_TOKENIZERS` with which llama.cpp tokenizes ``text`` (plus a probe of
    digits, spaces and punctuation) exactly as ``tokenizer`` does, or None."""
    import tempfile

    sample = f"{text}\n{PRE_TOKENIZER_PROBE}"
    expected = tokenizer(sample, add_special_tokens=False)["input_ids"]
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        for pre in PRE_TOKENIZERS:
            path = Path(tmp, f"vocab-{pre}.gguf")
            write_llama_gguf(
                model, tokenizer, path, {"type": "none", "freq_base": 1e4}, tokenizer_pre=pre, tensors=False
            )
            try:
                if llama_cpp_tokenize(path, sample) == expected:
                    return pre
            except ValueError:  # a pre-tokenizer this llama.cpp does not know
                continue
    return None
