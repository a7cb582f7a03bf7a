"""GPU benchmark (run by hand on one H100/H200; no internet needed): writes docs/gpu_benchmarks.md.

1. A 1B-class LLaMA built from config in bf16, YaRN x8 patched, LoRA (r=16) + gradient checkpointing:
   training tokens/s, MFU against the card's bf16 dense peak, and peak memory at 4k / 16k / 32k tokens,
   for sdpa, flex attention and flash-attention-2 (if importable).
2. ALiBi: a BLOOM-1B-shaped model, forward at 4k / 8k / 16k, native BLOOM (eager) vs hf_posenc ALiBi on
   flex attention (score_mod, no L x L bias) and sdpa: time and peak memory.

    python benchmarks/gpu.py                 # on the GPU machine, < 10 minutes
    python benchmarks/gpu.py --toy --out X   # CPU, toy sizes: exercises every code path (a test runs it)

MFU uses the usual estimate: training FLOPs per token = 6 N (4 N with frozen base weights under LoRA:
no weight gradients) + 12 * layers * hidden * seq for attention scores, +1 forward for recomputation
under gradient checkpointing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hf_posenc
from hf_posenc._compat import enable_activation_checkpointing

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
LLAMA_1B = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=4096,
)
BLOOM_1B = dict(vocab_size=32000, hidden_size=2048, n_layer=16, n_head=16)
TOY_LLAMA = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
TOY_BLOOM = dict(vocab_size=512, hidden_size=64, n_layer=2, n_head=4)


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def backends(toy: bool) -> list[str]:
    out = ["sdpa", "flex_attention"] if not toy else ["sdpa", "eager"]
    if not toy and importlib.util.find_spec("flash_attn") is not None:
        out.append("flash_attention_2")
    return out


def lora_training(device, dtype, config: dict, lengths: list[int], steps: int, toy: bool) -> list[dict]:
    from peft import LoraConfig, get_peft_model

    rows = []
    for attn in backends(toy):
        for length in lengths:
            reset_memory(device)
            try:
                torch.manual_seed(0)
                model = AutoModelForCausalLM.from_config(
                    AutoConfig.for_model("llama", **config), attn_implementation=attn, dtype=dtype
                ).to(device)
                n_params = sum(p.numel() for p in model.parameters())
                enable_activation_checkpointing(model)
                model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
                hf_posenc.patch(model.get_base_model(), "yarn", factor=8.0)
                optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
                x = torch.randint(0, config["vocab_size"], (1, length), device=device)
                times = []
                for step in range(steps + 1):  # the first step warms up (and compiles flex)
                    sync(device)
                    start = time.perf_counter()
                    model(input_ids=x, labels=x, use_cache=False).loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    sync(device)
                    if step:
                        times.append(time.perf_counter() - start)
                seconds = sum(times) / len(times)
                tokens_s = length / seconds
                layers, hidden = config["num_hidden_layers"], config["hidden_size"]
                flops_token = 4 * n_params + 12 * layers * hidden * length
                flops_token += 2 * n_params + 4 * layers * hidden * length  # recomputed forward (checkpointing)
                peak = peak_tflops(device)
                mfu = tokens_s * flops_token / (peak * 1e12) if peak else None
                rows.append(
                    {
                        "backend": attn,
                        "tokens": length,
                        "tokens_per_s": tokens_s,
                        "mfu": mfu,
                        "peak_gib": peak_memory_gib(device),
                    }
                )
            except (RuntimeError, ValueError, ImportError) as err:  # OOM or a backend the image lacks
                rows.append({"backend": attn, "tokens": length, "error": f"{type(err).__name__}: {str(err)[:120]}"})
            print(rows[-1], flush=True)
            model = optimizer = None
    return rows


def alibi_forward(device, dtype, config: dict, lengths: list[int], toy: bool) -> list[dict]:
    rows = []
    variants = [("native BLOOM eager", None), ("hf_posenc alibi sdpa", "sdpa")]
    variants.append(("hf_posenc alibi flex", "eager" if toy else "flex_attention"))
    for length in lengths:
        for label, attn in variants:
            reset_memory(device)
            try:
                torch.manual_seed(0)
                model = (
                    AutoModelForCausalLM.from_config(
                        AutoConfig.for_model("bloom", **config), attn_implementation="eager", dtype=dtype
                    )
                    .to(device)
                    .eval()
                )
                if attn is not None:
                    hf_posenc.patch(model, "alibi", attn_implementation=attn)
                x = torch.randint(0, config["vocab_size"], (1, length), device=device)
                with torch.inference_mode():
                    model(x[:, :128])
                    sync(device)
                    start = time.perf_counter()
                    model(x)
                    sync(device)
                rows.append(
                    {
                        "variant": label,
                        "tokens": length,
                        "seconds": time.perf_counter() - start,
                        "peak_gib": peak_memory_gib(device),
                    }
                )
            except (RuntimeError, ValueError) as err:
                rows.append({"variant": label, "tokens": length, "error": f"{type(err).__name__}: {str(err)[:120]}"})
            print(rows[-1], flush=True)
            model = None
    return rows


def report(meta: dict, training: list[dict], alibi: list[dict]) -> str:
    lines = [
        "# GPU benchmarks",
        "",
        f"`python benchmarks/gpu.py` on {meta['device']} ({meta['torch']}, "
        f"transformers {meta['transformers']}, {meta['dtype']}).",
        "",
        "## 1B-class LLaMA, YaRN x8, LoRA r=16 + gradient checkpointing, one sequence per step",
        "",
        "| backend | tokens | tokens/s | MFU | peak memory (GiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in training:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['tokens']} | {r['error']} | | |")
        else:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            mem = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a"
            lines.append(f"| {r['backend']} | {r['tokens']} | {r['tokens_per_s']:.0f} | {mfu} | {mem} |")
    lines += [
        "",
        "## ALiBi forward: BLOOM-shaped model, native vs hf_posenc",
        "",
        "| variant | tokens | seconds | peak memory (GiB) |",
        "|---|---:|---:|---:|",
    ]
    for r in alibi:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['tokens']} | {r['error']} | |")
        else:
            mem = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
            lines.append(f"| {r['variant']} | {r['tokens']} | {r['seconds']:.3f} | {mem} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--toy", action="store_true", help="CPU, toy sizes, fp32")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "gpu_benchmarks.md"))
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.toy or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if args.toy else torch.bfloat16
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (toy)",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "dtype": str(dtype),
    }
    training = lora_training(
        device,
        dtype,
        TOY_LLAMA if args.toy else LLAMA_1B,
        [64] if args.toy else [4096, 16384, 32768],
        1 if args.toy else 3,
        args.toy,
    )
    alibi = alibi_forward(
        device, dtype, TOY_BLOOM if args.toy else BLOOM_1B, [64] if args.toy else [4096, 8192, 16384], args.toy
    )
    out = Path(args.out)
    out.write_text(report(meta, training, alibi))
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "training": training, "alibi": alibi}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
