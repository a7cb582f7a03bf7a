"""GPU (prepared; about 10 minutes on one H100/H200): the longest single sequence a 1B LLaMA-shaped model
with a 128k vocabulary (Llama-3.2-1B's shape, random weights, bf16) trains with LoRA on one GPU: the plain
recipe (the model's own loss, activation checkpointing) against the kit (``loss: chunked``, activation
checkpointing, activations offloaded to host memory). Each row is one training step (forward, backward,
AdamW) at a doubling length, until the step runs out of memory or past ``--budget`` seconds; each row also
gives what ``hf-posenc plan`` predicts. Writes docs/scaling/gpu_long_training.md (+ .json).

    python benchmarks/gpu_long_training.py                  # on the GPU machine
    python benchmarks/gpu_long_training.py --toy --out X    # CPU, toy sizes: every code path (a test runs it)
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
RECIPES = {
    "plain": dict(loss="plain", offload_activations=False),
    "kit": dict(loss="chunked", offload_activations=True),
}
TOY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=1024,
)  # fmt: skip


def build(toy: bool, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_posenc.plan import PRESETS

    shape = TOY if toy else PRESETS["llama3-1b"]
    config = LlamaConfig(**shape, max_position_embeddings=1 << 20)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model


def step(recipe: str, length: int, toy: bool, device: torch.device, dtype: torch.dtype) -> dict:
    """One LoRA training step at ``length`` tokens under ``recipe``; the peak memory and time."""
    from hf_posenc.train import TrainConfig
    from hf_posenc.train.engine import activation_offload, batch_loss, prepare_model
    from hf_posenc.train.loss import LossHead

    cfg = TrainConfig(
        model="tiny:llama", method="lora", lora_r=16, lora_alpha=32, gradient_checkpointing=True,
        seq_len=length, **RECIPES[recipe],
    )  # fmt: skip
    model = prepare_model(cfg, build(toy, device, dtype))
    model.train()
    head = LossHead(model, cfg.loss, cfg.loss_chunk_size) if cfg.loss != "plain" else None
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        with activation_offload(cfg):
            loss = batch_loss(model, {"input_ids": ids, "labels": ids}, head)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out = {"ok": True, "loss": loss.item(), "seconds": time.perf_counter() - start}
    except torch.OutOfMemoryError:
        out = {"ok": False, "error": "out of memory"}
    out["peak_gib"] = torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None
    del model, optimizer, head
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def planned(recipe: str, length: int, toy: bool) -> float | None:
    if toy:
        return None
    from hf_posenc.plan import PlanOptions, plan_memory

    options = PlanOptions(
        seq_len=length,
        lora=True,
        lora_r=16,
        loss=RECIPES[recipe]["loss"],
        offload=RECIPES[recipe]["offload_activations"],
    )
    return plan_memory("llama3-1b", options).total_bytes / GIB


def write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"# Longest sequence one GPU trains: 1B LLaMA shape, 128k vocabulary, LoRA r=16 ({results['device']})",
        "",
        "`python benchmarks/gpu_long_training.py`; one training step per row, bf16, sdpa, activation "
        "checkpointing in both recipes; the kit adds `loss: chunked` and `offload_activations: true`.",
        "",
        "| recipe | tokens | result | peak GiB (measured) | planner GiB | step (s) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for row in results["rows"]:
        planner = f"{row['planned_gib']:.1f}" if row.get("planned_gib") is not None else "-"
        peak = f"{row['peak_gib']:.1f}" if row.get("peak_gib") is not None else "-"
        secs = f"{row['seconds']:.1f}" if row.get("seconds") is not None else "-"
        result = "trains" if row["ok"] else row.get("error", "failed")
        lines.append(f"| {row['recipe']} | {row['length']:,} | {result} | {peak} | {planner} | {secs} |")
    lines.append("")
    for recipe in RECIPES:
        longest = max((r["length"] for r in results["rows"] if r["recipe"] == recipe and r["ok"]), default=None)
        lines.append(f"- longest that trains, {recipe}: {f'{longest:,} tokens' if longest else 'none'}")
    out.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy", action="store_true", help="CPU, toy sizes, fp32")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "scaling" / "gpu_long_training.md")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds; later rows are skipped")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.toy or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if args.toy else torch.bfloat16
    lengths = [64, 128] if args.toy else [32768, 65536, 131072, 262144, 524288]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (toy)"
    results = {"device": name, "rows": []}
    begin = time.perf_counter()
    for recipe in RECIPES:
        for length in lengths:
            if time.perf_counter() - begin > args.budget:
                results["rows"].append({"recipe": recipe, "length": length, "ok": False, "error": "skipped (budget)"})
                continue
            row = {"recipe": recipe, "length": length, **step(recipe, length, args.toy, device, dtype)}
            row["planned_gib"] = planned(recipe, length, args.toy)
            results["rows"].append(row)
            write(results, args.out)
            print(row, flush=True)
            if not row["ok"]:
                break  # longer ones fail too
    write(results, args.out)


if __name__ == "__main__":
    main()
