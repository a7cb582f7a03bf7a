"""GPU benchmark (run by hand on one H100/H200; no internet needed): writes docs/gpu/latest.md (+ .json).

0. Checks on the GPU, fp32: patched vs native logits (BLOOM ALiBi on sdpa/flex, LLaMA YaRN on sdpa/flex),
   left padding vs unpadded under flex ALiBi, and bf16 flex/sdpa ALiBi vs BLOOM's own eager at 4k tokens.
   flash-attn's ``alibi_slopes`` path too, when flash-attn is importable.
1. A 1B-class LLaMA built from config in bf16, LoRA (r=16) + gradient checkpointing, YaRN x8 patched by
   hf_posenc vs the same YaRN configured natively: training tokens/s, MFU against the card's bf16 dense
   peak, and peak memory at 4k / 16k / 32k tokens, for sdpa, flex attention and flash-attention-2 (if
   importable).
2. ALiBi: a BLOOM-1B-shaped model, forward at 4k / 8k / 16k / 32k, native BLOOM (eager, its only
   backend) vs hf_posenc ALiBi on sdpa and flex attention (score_mod, no L x L bias): time and peak memory.
3. Attention-level schemes on the 1B-class LLaMA: forward at 8k / 16k / 32k, plain flex attention vs
   Self-Extend and ReRoPE on flex (time, peak memory); and LoRA training steps with S²-Attn vs full
   attention (sdpa) at 16k / 32k (tokens/s, peak memory).

    python benchmarks/gpu.py                 # on the GPU machine, about 10 minutes
    python benchmarks/gpu.py --toy --out X   # CPU, toy sizes: exercises every code path (a test runs it)

Every row is caught on its own (an out-of-memory cell is reported, not fatal), results are rewritten after
each row, and rows past ``--budget`` seconds are marked skipped, so a time-limited run still reports.

MFU uses the usual estimate: training FLOPs per token = 4 N with frozen base weights under LoRA (no weight
gradients) + 12 * layers * hidden * seq for attention scores, +1 forward for recomputation under gradient
checkpointing.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hf_posenc
from hf_posenc._compat import enable_activation_checkpointing
from hf_posenc.patches.flash import flash_available

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
SMALL_LLAMA = dict(TOY_LLAMA, vocab_size=1000, hidden_size=256, num_attention_heads=8, max_position_embeddings=256)
SMALL_BLOOM = dict(vocab_size=1000, hidden_size=120, n_layer=2, n_head=6)  # 6 heads: not a power of two
YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096, "rope_theta": 10000.0}


class Clock:
    """Wall-clock budget: rows started after it has run out are reported as skipped."""

    def __init__(self, budget_s: float) -> None:
        self.deadline = time.monotonic() + budget_s

    def out(self) -> bool:
        return time.monotonic() > self.deadline


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
    gc.collect()  # the previous cell's model may sit in a reference cycle (peft, hooks)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def backends(toy: bool) -> list[str]:
    """Backends to compare: sdpa and flex attention (eager stands in for flex on the CPU toy run),
    plus flash-attn where it is installed."""
    if toy:
        return ["sdpa", "eager"]
    return ["sdpa", "flex_attention", *(["flash_attention_2"] if flash_available() else [])]


def build(model_type: str, config: dict, device, dtype, attn: str = "eager", **extra):
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(
            AutoConfig.for_model(model_type, **config, **extra), attn_implementation=attn, dtype=dtype
        )


def row(rows: list[dict], clock: Clock, fields: dict, measure: Callable[[], dict], save: Callable[[], None]) -> None:
    """Run one measurement into ``rows``: its result, its error, or 'skipped' past the budget."""
    if clock.out():
        rows.append({**fields, "error": "skipped (time budget)"})
    else:
        try:
            rows.append({**fields, **measure()})
        except (RuntimeError, ValueError, ImportError, AssertionError) as err:  # OOM, a missing backend
            rows.append({**fields, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:140]}"})
    print(rows[-1], flush=True)
    save()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def checks(device, toy: bool, rows: list[dict], clock: Clock, save) -> None:
    """Correctness on this device: max |logit difference| against a reference (fp32 unless noted)."""
    f32 = torch.float32
    x = torch.randint(0, 1000, (2, 96), device=device)

    def bloom_alibi(attn: str) -> Callable[[], dict]:
        def measure() -> dict:
            model = build("bloom", SMALL_BLOOM, device, f32).eval()
            with torch.no_grad():
                ref = model(x).logits
                hf_posenc.patch(model, "alibi", attn_implementation=attn)
                got = model(x).logits
            return {"max_abs_diff": max_diff(got, ref), "tolerance": 1e-5}

        return measure

    def llama_yarn(attn: str, config: dict) -> Callable[[], dict]:
        def measure() -> dict:
            yarn = dict(YARN, factor=4.0, original_max_position_embeddings=64)
            native = build("llama", config, device, f32, attn, rope_parameters=yarn).eval()
            model = build("llama", config, device, f32, attn).eval()
            model.load_state_dict(native.state_dict())
            hf_posenc.patch(model, "yarn", factor=4.0, original_max_position_embeddings=64)
            with torch.no_grad():
                return {"max_abs_diff": max_diff(model(x).logits, native(x).logits), "tolerance": 1e-5}

        return measure

    def left_padding(attn: str, config: dict) -> Callable[[], dict]:
        def measure() -> dict:
            model = build("llama", config, device, f32).eval()
            hf_posenc.patch(model, "alibi", attn_implementation=attn)
            pad = 7
            ids = torch.cat([torch.zeros(1, pad, dtype=torch.long, device=device), x[:1]], dim=1)
            mask = torch.cat([torch.zeros(1, pad, device=device), torch.ones(1, x.shape[1], device=device)], dim=1)
            with torch.no_grad():
                alone = model(x[:1]).logits
                padded = model(ids, attention_mask=mask.long()).logits[:, pad:]
            return {"max_abs_diff": max_diff(padded, alone), "tolerance": 1e-5}

        return measure

    def bf16_error(attn: str | None, config: dict, length: int) -> Callable[[], dict]:
        """bf16 logits against BLOOM's native fp32 logits (same weights): native bf16 or hf_posenc's."""

        def measure() -> dict:
            model = build("bloom", config, device, f32).eval()
            ids = torch.randint(0, config["vocab_size"], (1, length), device=device)
            with torch.inference_mode():
                ref = model(ids).logits.float()
                model.to(torch.bfloat16)
                if attn is not None:
                    hf_posenc.patch(model, "alibi", attn_implementation=attn)
                got = model(ids).logits.float()
            return {"max_abs_diff": max_diff(got, ref), "mean_abs_diff": (got - ref).abs().mean().item()}

        return measure

    hosts = backends(toy)
    llamas = {"GQA 8/2": SMALL_LLAMA, "MHA 8/8": dict(SMALL_LLAMA, num_key_value_heads=8)}
    for attn in hosts:
        row(rows, clock, {"check": f"BLOOM alibi, {attn} vs native eager (6 heads)"}, bloom_alibi(attn), save)
    for name, config in llamas.items():
        for attn in hosts[:2]:
            fields = {"check": f"LLaMA {name} yarn x4, {attn}, patched vs native"}
            row(rows, clock, fields, llama_yarn(attn, config), save)
        for attn in hosts:
            fields = {"check": f"LLaMA {name} alibi, {attn}, left padding vs unpadded"}
            row(rows, clock, fields, left_padding(attn, config), save)
    big, length = (TOY_BLOOM, 64) if toy else (BLOOM_1B, 4096)
    for attn in [None, *hosts]:
        label = "native BLOOM eager" if attn is None else f"hf_posenc alibi {attn}"
        fields = {"check": f"BLOOM-1B shape, {length} tokens: {label} in bf16 vs native fp32"}
        row(rows, clock, fields, bf16_error(attn, big, length), save)
    if not flash_available():
        rows.append({"check": "flash-attn alibi_slopes", "error": "flash_attn is not installed in this image"})
        save()


class TrainingCell:
    """One LoRA training setup (backend x how YaRN is applied), built on first use, timed per length."""

    def __init__(self, device, dtype, config: dict, attn: str, how: str, steps: int) -> None:
        self.device, self.dtype, self.config, self.attn, self.how, self.steps = device, dtype, config, attn, how, steps
        self.model = self.optimizer = None
        self.params = 0

    def setup(self) -> None:
        from peft import LoraConfig, get_peft_model

        yarn = dict(YARN, original_max_position_embeddings=self.config["max_position_embeddings"])
        extra = {"rope_parameters": yarn} if self.how == "native" else {}
        model = build("llama", self.config, self.device, self.dtype, self.attn, **extra)
        self.params = sum(p.numel() for p in model.parameters())
        enable_activation_checkpointing(model)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        if self.how == "hf_posenc":
            hf_posenc.patch(model.get_base_model(), "yarn", factor=yarn["factor"])
        self.model = model
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def measure(self, length: int) -> dict:
        if self.model is None:
            self.setup()
        device = self.device
        reset_memory(device)
        x = torch.randint(0, self.config["vocab_size"], (1, length), device=device)
        times = []
        for step in range(self.steps + 1):  # the first step warms up (and compiles flex)
            sync(device)
            start = time.perf_counter()
            self.model(input_ids=x, labels=x, use_cache=False).loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            sync(device)
            if step:
                times.append(time.perf_counter() - start)
        tokens_s = length / (sum(times) / len(times))
        layers, hidden, n = self.config["num_hidden_layers"], self.config["hidden_size"], self.params
        flops_token = 4 * n + 12 * layers * hidden * length
        flops_token += 2 * n + 4 * layers * hidden * length  # recomputed forward (checkpointing)
        peak = peak_tflops(device)
        return {
            "tokens_per_s": tokens_s,
            "mfu": tokens_s * flops_token / (peak * 1e12) if peak else None,
            "peak_gib": peak_memory_gib(device),
        }


def lora_training(device, dtype, config: dict, lengths: list[int], steps: int, toy: bool, rows, clock, save) -> None:
    for attn in backends(toy):
        for how in ("hf_posenc", "native"):
            cell = TrainingCell(device, dtype, config, attn, how, steps)
            for length in lengths:
                fields = {"backend": attn, "yarn": how, "tokens": length}
                row(rows, clock, fields, functools.partial(cell.measure, length), save)
            cell.model = cell.optimizer = None


def timed_forward(model, config: dict, device, length: int) -> dict:
    """Mean time of two forwards of ``length`` random tokens after a warm-up (which compiles flex
    attention for this length), and the peak memory."""
    reset_memory(device)
    x = torch.randint(0, config["vocab_size"], (1, length), device=device)
    times = []
    with torch.inference_mode():
        for step in range(3):
            sync(device)
            start = time.perf_counter()
            model(x, use_cache=False)
            sync(device)
            if step:
                times.append(time.perf_counter() - start)
    return {"seconds": sum(times) / len(times), "peak_gib": peak_memory_gib(device)}


def alibi_forward(device, dtype, config: dict, lengths: list[int], toy: bool, rows, clock, save) -> None:
    labels = {"eager": "flex", "flex_attention": "flex", "flash_attention_2": "flash-attn 2"}  # eager: CPU toy
    variants = [("native BLOOM eager", None), *((f"hf_posenc alibi {labels.get(a, a)}", a) for a in backends(toy))]
    model = build("bloom", config, device, dtype).eval()
    for label, attn in variants:
        if hf_posenc.is_patched(model):
            hf_posenc.unpatch(model)
        if attn is not None:
            hf_posenc.patch(model, "alibi", attn_implementation=attn)
        for length in lengths:
            measure = functools.partial(timed_forward, model, config, device, length)
            row(rows, clock, {"variant": label, "tokens": length}, measure, save)


class S2Cell(TrainingCell):
    """A LoRA training cell whose attention is S²-Attn (groups of a quarter of the sequence) while training."""

    def setup(self) -> None:
        super().setup()
        hf_posenc.enable_s2_attn(self.model, 0.25)
        self.model.train()


def windowed_forward(device, dtype, config: dict, lengths: list[int], toy: bool, rows, clock, save) -> None:
    attn = "eager" if toy else "flex_attention"  # eager stands in for flex on the CPU toy run
    window = 16 if toy else 2048
    variants = [
        ("plain", "rope", {}),
        ("self_extend G=8", "self_extend", {"group_size": 8, "window_size": window}),
        ("rerope", "rerope", {"window_size": window}),
    ]
    model = build("llama", config, device, dtype).eval()
    for label, scheme, params in variants:
        hf_posenc.patch(model, scheme, attn_implementation=attn, replace=True, **params)
        for length in lengths:
            measure = functools.partial(timed_forward, model, config, device, length)
            row(rows, clock, {"variant": f"{label}, {attn}", "tokens": length}, measure, save)


def s2_training(device, dtype, config: dict, lengths: list[int], steps: int, rows, clock, save) -> None:
    for name, cls in (("full", TrainingCell), ("s2_attn", S2Cell)):
        cell = cls(device, dtype, config, "sdpa", "hf_posenc", steps)
        for length in lengths:
            row(rows, clock, {"attention": name, "tokens": length}, functools.partial(cell.measure, length), save)
        cell.model = cell.optimizer = None


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def report(
    meta: dict,
    check_rows: list[dict],
    training: list[dict],
    alibi: list[dict],
    windowed: list[dict] | None = None,
    s2: list[dict] | None = None,
) -> str:
    lines = [
        "# GPU benchmarks",
        "",
        f"`python benchmarks/gpu.py` on {meta['device']} (torch {meta['torch']}, "
        f"transformers {meta['transformers']}, flash-attn: {meta['flash_attn']}).",
        "",
        "## Checks on this device",
        "",
        "| check | max abs diff | mean abs diff | tolerance | within |",
        "|---|---:|---:|---:|---|",
    ]
    for r in check_rows:
        if "error" in r:
            lines.append(f"| {r['check']} | {r['error']} | | | |")
        else:
            tol = r.get("tolerance")
            within = "n/a (bf16)" if tol is None else ("yes" if r["max_abs_diff"] <= tol else "NO")
            lines.append(
                f"| {r['check']} | {r['max_abs_diff']:.2e} | {fmt(r.get('mean_abs_diff'), '.2e')} | "
                f"{fmt(tol, '.0e')} | {within} |"
            )
    lines += [
        "",
        f"## 1B-class LLaMA, YaRN x8, LoRA r=16 + gradient checkpointing, {meta['dtype']}, one sequence per step",
        "",
        "`hf_posenc` = YaRN patched onto a default-RoPE model; `native` = the same YaRN in the config "
        "(transformers' own rotary embedding). Equal throughput means the patch costs nothing.",
        "",
        "| backend | YaRN | tokens | tokens/s | MFU | peak memory (GiB) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in training:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['yarn']} | {r['tokens']} | {r['error']} | | |")
        else:
            lines.append(
                f"| {r['backend']} | {r['yarn']} | {r['tokens']} | {r['tokens_per_s']:.0f} | "
                f"{fmt(r['mfu'], '.1%')} | {fmt(r['peak_gib'], '.1f')} |"
            )
    lines += [
        "",
        f"## ALiBi forward: BLOOM-shaped model, native vs hf_posenc, {meta['dtype']}, batch 1",
        "",
        "| variant | tokens | seconds | peak memory (GiB) |",
        "|---|---:|---:|---:|",
    ]
    for r in alibi:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['tokens']} | {r['error']} | |")
        else:
            lines.append(f"| {r['variant']} | {r['tokens']} | {r['seconds']:.3f} | {fmt(r['peak_gib'], '.2f')} |")
    lines += [
        "",
        f"## Self-Extend and ReRoPE forward: 1B-class LLaMA, {meta['dtype']}, batch 1",
        "",
        "| variant | tokens | seconds | peak memory (GiB) |",
        "|---|---:|---:|---:|",
    ]
    for r in windowed or []:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['tokens']} | {r['error']} | |")
        else:
            lines.append(f"| {r['variant']} | {r['tokens']} | {r['seconds']:.3f} | {fmt(r['peak_gib'], '.2f')} |")
    lines += [
        "",
        f"## S²-Attn vs full attention: LoRA training steps, 1B-class LLaMA (YaRN x8), sdpa, {meta['dtype']}",
        "",
        "| attention while training | tokens | tokens/s | peak memory (GiB) |",
        "|---|---:|---:|---:|",
    ]
    for r in s2 or []:
        if "error" in r:
            lines.append(f"| {r['attention']} | {r['tokens']} | {r['error']} | |")
        else:
            lines.append(
                f"| {r['attention']} | {r['tokens']} | {r['tokens_per_s']:.0f} | {fmt(r['peak_gib'], '.1f')} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--toy", action="store_true", help="CPU, toy sizes, fp32")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "gpu" / "latest.md"))
    parser.add_argument("--budget", type=float, default=480.0, help="seconds; later rows are skipped")
    parser.add_argument("--sections", default="checks,training,alibi,windowed,s2")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.toy or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if args.toy else torch.bfloat16
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (toy)",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "flash_attn": "installed" if flash_available() else "not installed",
    }
    clock = Clock(args.budget)
    out = Path(args.out)
    results: dict[str, list[dict]] = {"checks": [], "training": [], "alibi": [], "windowed": [], "s2": []}

    def save() -> None:
        out.write_text(
            report(meta, results["checks"], results["training"], results["alibi"], results["windowed"], results["s2"])
        )
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, **results}, indent=2))

    sections = args.sections.split(",")
    if "checks" in sections:
        checks(device, args.toy, results["checks"], clock, save)
    if "alibi" in sections:
        lengths = [64] if args.toy else [4096, 8192, 16384, 32768]
        alibi_forward(
            device, dtype, TOY_BLOOM if args.toy else BLOOM_1B, lengths, args.toy, results["alibi"], clock, save
        )
    if "training" in sections:
        lengths = [64] if args.toy else [4096, 16384, 32768]
        lora_training(
            device,
            dtype,
            TOY_LLAMA if args.toy else LLAMA_1B,
            lengths,
            1 if args.toy else 4,
            args.toy,
            results["training"],
            clock,
            save,
        )
    if "windowed" in sections:
        lengths = [64] if args.toy else [8192, 16384, 32768]
        windowed_forward(
            device, dtype, TOY_LLAMA if args.toy else LLAMA_1B, lengths, args.toy, results["windowed"], clock, save
        )
    if "s2" in sections:
        lengths = [64] if args.toy else [16384, 32768]
        config = TOY_LLAMA if args.toy else LLAMA_1B
        s2_training(device, dtype, config, lengths, 1 if args.toy else 3, results["s2"], clock, save)
    save()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
