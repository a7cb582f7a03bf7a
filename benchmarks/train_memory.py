"""One LoRA training step of SmolLM2-135M at a long context: peak memory and time with the plain loss
(full logits) against ``loss: chunked``, activation checkpointing on; equal loss and gradients; and
what ``hf-posenc plan`` predicted for the same step.

    python benchmarks/train_memory.py                      # 8k tokens, writes docs/scaling/
    python benchmarks/train_memory.py --seq-len 2048 --out /tmp/x

Each measurement runs in a fresh process. Peak memory is the process's resident set sampled every
5 ms during the step (forward, backward, optimizer step), above its resident set just before the step:
what a step adds to a loaded model and its optimizer state (a short warm-up step runs first, so the
measured step is a steady-state one, AdamW's moments already allocated). The processes run with
``MALLOC_MMAP_THRESHOLD_`` set, so that freed tensors leave the resident set (see :data:`MMAP_THRESHOLD`).
CPU only by design (the GPU runs are benchmarks/gpu_long_training.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
#: glibc serves allocations from this size up (bytes) with their own mapping, returned on free: without it,
#: freed tensors stay in malloc's heap and the resident set over-states live memory (by 3x at 8k here)
MMAP_THRESHOLD = 65536
#: the recipe shape of recipes/configs/llama/yarn4_lora.yaml, one step
RECIPE = dict(
    method="lora", lora_r=16, lora_alpha=32, trainable_embeddings=True, trainable_norms=True,
    gradient_checkpointing=True, attn_implementation="sdpa", steps=1, batch_size=1,
)  # fmt: skip


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class PeakSampler:
    """The highest resident set seen while the context is open (sampled every ``interval`` s)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self) -> PeakSampler:
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def one_step(model_name: str, loss: str, seq_len: int, chunk: int, grads_path: Path, threads: int) -> dict:
    """Run in the child process: load, wrap, one step; return the figures. A model folder without a
    tokenizer trains on seeded random tokens."""
    import torch

    from hf_posenc.eval.data import token_stream
    from hf_posenc.texts import load_texts
    from hf_posenc.train import TrainConfig
    from hf_posenc.train.engine import batch_loss, load_model_and_tokenizer, prepare_model
    from hf_posenc.train.loss import LossHead

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = TrainConfig(**RECIPE, model=model_name, seq_len=seq_len, loss=loss, loss_chunk_size=chunk)
    if Path(model_name).is_dir() and not (Path(model_name) / "tokenizer_config.json").exists():
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_name, dtype=torch.float32)
        ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    else:
        model, tokenizer = load_model_and_tokenizer(cfg)
        ids = torch.tensor(token_stream(tokenizer, load_texts("kjv"), seq_len)[:seq_len]).unsqueeze(0)
    model = prepare_model(cfg, model)
    model.train()
    batch = {"input_ids": ids, "labels": ids.clone()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    head = LossHead(model, loss, chunk) if loss != "plain" else None
    warm = {"input_ids": ids[:, :256], "labels": ids[:, :256]}  # steady state: the optimizer's moments exist
    batch_loss(model, warm, head).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():  # weights loaded from a mapped file become resident now, not during the step
        for param in model.parameters():
            param.add_(0)
    before = rss_bytes()
    with PeakSampler() as sampler:
        start = time.perf_counter()
        value = batch_loss(model, batch, head)
        value.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        seconds = time.perf_counter() - start
    torch.save(grads, grads_path)
    return {
        "loss": loss,
        "seq_len": seq_len,
        "chunk": chunk if loss != "plain" else None,
        "value": value.item(),
        "seconds": seconds,
        "rss_before_gib": before / GIB,
        "step_peak_gib": (sampler.peak - before) / GIB,
        "trainable_params": sum(p.numel() for p in params),
    }


def child(args) -> None:
    result = one_step(args.model, args.loss, args.seq_len, args.chunk, Path(args.grads), args.threads)
    print("RESULT " + json.dumps(result), flush=True)


def run_child(loss: str, args, grads: Path) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        "--model",
        args.model,
        "--loss",
        loss,
        "--seq-len",
        str(args.seq_len),
    ]
    command += ["--chunk", str(args.chunk), "--grads", str(grads), "--threads", str(args.threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{loss} step failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def compare_grads(a: Path, b: Path) -> float:
    """Largest |difference| of any gradient entry, relative to that gradient's largest entry."""
    import torch

    ga, gb = torch.load(a), torch.load(b)
    if ga.keys() != gb.keys():
        raise RuntimeError("the two runs trained different parameters")
    return max(((ga[k] - gb[k]).abs().max() / ga[k].abs().max().clamp(min=1e-30)).item() for k in ga)


def planned(model: str, seq_len: int, chunk: int) -> dict[str, float]:
    """What the planner predicts for the step each run measured (GiB added to the loaded model)."""
    from hf_posenc.plan import PlanOptions, plan_memory

    figures = {}
    for loss in ("plain", "chunked"):
        options = PlanOptions(
            seq_len=seq_len, lora=True, lora_r=RECIPE["lora_r"], trainable_embeddings=True, trainable_norms=True,
            checkpointing=True, loss=loss, loss_chunk_size=chunk, weight_bytes=4, activation_bytes=4,
        )  # fmt: skip
        figures[loss] = plan_memory(model, options).step_bytes / GIB
    return figures


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_memory.json").write_text(json.dumps(results, indent=2) + "\n")
    plain, chunked = results["runs"]["plain"], results["runs"]["chunked"]
    lines = [
        f"# One LoRA step of {results['model']} at {results['seq_len']:,} tokens: plain loss vs chunked loss",
        "",
        f"`{results['command']}` on {results['machine']} (CPU, {results['threads']} threads, fp32, sdpa, "
        "activation checkpointing, LoRA r=16 on all linear layers + trainable embeddings and norms; one step: "
        "forward, backward, AdamW, after a short warm-up step). Memory: peak resident set during the step "
        "above the loaded model's with its optimizer state (glibc told to return freed tensors: "
        "`MALLOC_MMAP_THRESHOLD_=65536`).",
        "",
        "| loss | step peak (GiB) | planner (GiB) | time (s) | loss value |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, run in results["runs"].items():
        lines.append(
            f"| {name}{' (chunks of ' + str(run['chunk']) + ')' if run['chunk'] else ''} | "
            f"{run['step_peak_gib']:.2f} | {results['planned_gib'][name]:.2f} | {run['seconds']:.1f} | "
            f"{run['value']:.6f} |"
        )
    memory, seconds = results["memory_ratio"], results["time_ratio"]
    lines += [
        "",
        f"- memory, chunked / plain: **{memory:.2f}x** (target <= 0.4x: {'held' if memory <= 0.4 else 'did not hold'})",
        f"- time, chunked / plain: **{seconds:.2f}x** (target <= 1.1x: {'held' if seconds <= 1.1 else 'did not hold'})",
        f"- loss: {plain['value']:.6f} vs {chunked['value']:.6f}; largest gradient difference relative to that "
        f"gradient's largest entry: {results['grad_max_rel_diff']:.1e}",
        f"- planner vs measured: {results['planner_error']}",
    ]
    (out / "train_memory.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, or a model folder (random tokens if no tokenizer)")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=1024, help="positions per loss chunk")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "scaling")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loss", default="plain", help=argparse.SUPPRESS)
    parser.add_argument("--grads", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    tmp = args.out / ".grads"
    tmp.mkdir(parents=True, exist_ok=True)
    runs = {loss: run_child(loss, args, tmp / f"{loss}.pt") for loss in ("plain", "chunked")}
    predicted = planned(args.model, args.seq_len, args.chunk)
    errors = {k: predicted[k] / runs[k]["step_peak_gib"] - 1 for k in runs}
    results = {
        "command": "python benchmarks/train_memory.py"
        + ("" if args.model == "smollm2" else f" --model {args.model}")
        + ("" if args.seq_len == 8192 else f" --seq-len {args.seq_len}"),
        "model": "SmolLM2-135M" if args.model == "smollm2" else args.model,
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "threads": args.threads,
        "seq_len": args.seq_len,
        "runs": runs,
        "planned_gib": predicted,
        "planner_error": ", ".join(f"{k} {v:+.0%}" for k, v in errors.items()),
        "memory_ratio": runs["chunked"]["step_peak_gib"] / runs["plain"]["step_peak_gib"],
        "time_ratio": runs["chunked"]["seconds"] / runs["plain"]["seconds"],
        "grad_max_rel_diff": compare_grads(tmp / "plain.pt", tmp / "chunked.pt"),
    }
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    write(results, args.out)
    print((args.out / "train_memory.md").read_text())


if __name__ == "__main__":
    main()
