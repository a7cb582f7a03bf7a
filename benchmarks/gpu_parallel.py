"""Context / sequence parallelism on one multi-GPU node: a short run, sharded vs one process.

    python benchmarks/gpu_parallel.py                  # a node with >= 2 GPUs: cp, then sp (about 2 minutes)
    python benchmarks/gpu_parallel.py --mode cp --ranks 4
    python benchmarks/gpu_parallel.py --dry-run        # CPU: checks configs, plans and sharding logic; launches nothing
    python benchmarks/gpu_parallel.py --cpu --mode sp  # CPU, gloo: the sp run for real (needs deepspeed)

For every scheme: the same tiny LLaMA (seed 0, context 64) and the same batches of ``--seq-len`` tokens;
``--steps`` SGD steps in one process (the reference, run on each rank before anything is sharded), then
the same steps sharded over ``--ranks`` GPUs, through ``hf_posenc.train.parallel`` as the engine uses it:

- cp: accelerate ``ParallelismConfig(cp_size=N)`` + FSDP2, torch's ring attention (load-balanced layout);
- sp: DeepSpeed Ulysses registered over ``hf_posenc_sdpa`` (every case's model runs on it), gradients
  averaged across ranks as DeepSpeed's engine does.

A case passes when every step's global loss is within ``--tol`` of the reference's and the first step's
logits (each rank's, at the positions it holds) within ``10 x tol``. Controls: dynamic NTK without the
pinned length must differ (step-0 logits off by more than ``10 x tol``); ALiBi and Self-Extend must be
refused under cp. Writes ``OUT/parallel.json`` and ``OUT/parallel.md`` (default docs/gpu/parallel/); the
exit status is 0 only if every case is as expected.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODES = ("cp", "sp")
CONFIGS = {"cp": ROOT / "recipes/accelerate/cp2.yaml", "sp": ROOT / "recipes/accelerate/sp2_ulysses.yaml"}
LONGROPE = {"short_factor": [1.0] * 8, "long_factor": [1.0 + i for i in range(8)], "factor": 4.0}


@dataclass(frozen=True)
class Case:
    name: str
    scheme: str | None  # None: the model's own RoPE
    params: dict = field(default_factory=dict)
    pinned: bool = True  # run the step inside sharded_step
    #: per mode: "equal" (losses match), "differs" (a control), "refused" (check_parallel refuses it)
    expect: dict = field(default_factory=lambda: {"cp": "equal", "sp": "equal"})


CASES = [
    Case("native_rope", None, expect={"cp": "equal"}),  # sp runs every model on hf_posenc_sdpa: patched only
    Case("rope", "rope"),
    Case("linear", "linear", {"factor": 4.0}),
    Case("ntk", "ntk", {"factor": 4.0}),
    Case("yarn", "yarn", {"factor": 4.0}),
    Case("llama3", "llama3", {"factor": 4.0}),
    Case("dynamic_ntk", "dynamic_ntk", {"factor": 4.0}),
    Case("longrope", "longrope", LONGROPE),
    Case("alibi", "alibi", expect={"cp": "refused", "sp": "equal"}),
    Case("self_extend", "self_extend", {"group_size": 4, "window_size": 32}, expect={"cp": "refused", "sp": "equal"}),
    Case(
        "dynamic_ntk_unpinned", "dynamic_ntk", {"factor": 4.0}, pinned=False, expect={"cp": "differs", "sp": "differs"}
    ),
]


def selected(args) -> list[Case]:
    """The cases ``--cases`` names (all by default)."""
    return [c for c in CASES if not args.cases or c.name in args.cases]


def build(case: Case):
    """The case's tiny LLaMA on sdpa (patched schemes on hf_posenc_sdpa), seed 0, in train mode."""
    import hf_posenc
    from hf_posenc.tiny import tiny_model

    model = tiny_model("llama", seed=0, attn="sdpa", context=64)
    if case.scheme is not None:
        hf_posenc.patch(model, case.scheme, attn_implementation="sdpa", **case.params)
    return model.train()


def batches(args, device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(2, 97, (args.batch, args.seq_len), generator=g).to(device) for _ in range(args.steps)]


def reference_run(model, data: list[torch.Tensor], lr: float) -> tuple[list[float], torch.Tensor]:
    """The run in one process: plain SGD on each batch, the model's own loss (all-ones mask, as the
    recipe). Returns the losses and the first batch's logits (before any step)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses, first = [], None
    for ids in data:
        out = model(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        first = out.logits.detach() if first is None else first
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    return losses, first


def verdict(case: Case, mode: str, result: dict, tol: float) -> str:
    """``equal``: every step's loss within ``tol`` and the first step's logits within ``10 x tol``;
    ``differs``: the first step's logits off by more than ``10 x tol``; ``refused``: check_parallel refused."""
    expected = case.expect.get(mode, "skipped")
    if "error" in result:
        return "FAIL"
    if result.get("status") == "refused":
        return "ok" if expected == "refused" else "FAIL"
    result["max_diff"] = max(abs(a - b) for a, b in zip(result["sharded"], result["reference"], strict=True))
    if expected == "equal":
        return "ok" if result["max_diff"] <= tol and result["logits_diff"] <= 10 * tol else "FAIL"
    return "ok" if expected == "differs" and result["logits_diff"] > 10 * tol else "FAIL"


# ----------------------------------------------------------------------------- workers (one per rank)


def _max(value: torch.Tensor) -> float:
    """The largest ``value`` over all ranks."""
    import torch.distributed as dist

    value = value.detach().float().reshape(1).clone()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()


def cp_worker(args) -> dict:
    from accelerate import Accelerator
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import FullyShardedDataParallelPlugin

    from hf_posenc.errors import UnsupportedSchemeError
    from hf_posenc.train import parallel as par

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    try:
        acc = Accelerator(parallelism_config=ParallelismConfig(cp_size=args.ranks), fsdp_plugin=plugin, cpu=args.cpu)
    except ValueError as exc:  # on CPU: accelerate refuses a ParallelismConfig on MULTI_CPU
        error = {"error": f"{type(exc).__name__}: {exc}"[:800]}
        return {c.name: error for c in CASES if "cp" in c.expect} if int(os.environ.get("RANK", 0)) == 0 else {}
    data = batches(args, acc.device)
    results = {}
    for case in selected(args):
        if "cp" not in case.expect:
            continue
        try:
            model = build(case)
            try:
                par.check_accelerator(acc, model)
            except UnsupportedSchemeError as exc:
                results[case.name] = {"status": "refused", "message": str(exc)}
                continue
            reference, ref_logits = reference_run(copy.deepcopy(model).to(acc.device), data, args.lr)
            opt = torch.optim.SGD(model.to(acc.device).parameters(), lr=args.lr)
            model, opt = acc.prepare(model, opt)
            plan = par.plan_from_accelerator(acc)
            index = par.cp_layout(args.seq_len, plan.size)[plan.rank].to(acc.device)
            sharded, logits_diff = [], None
            for ids in data:
                batch = par.prepare_batch({"input_ids": ids, "labels": ids}, plan)
                targets = batch["shift_labels"].clone()  # global: the buffers are sharded in place below
                buffers, dims = par.cp_buffers(batch)
                step = par.sharded_step(model, batch, plan) if case.pinned else contextlib.nullcontext()
                with step, acc.maybe_context_parallel(buffers, dims, no_restore_buffers=set(buffers)):
                    out = model(**batch, use_cache=False)
                    scaled = out.loss * par.loss_scale(batch["shift_labels"], targets, plan.size)
                    acc.backward(scaled)
                if logits_diff is None:  # this rank's logits at step 0 vs the reference's at its positions
                    logits_diff = _max((out.logits.detach() - ref_logits[:, index]).abs().max())
                opt.step()
                opt.zero_grad(set_to_none=True)
                sharded.append(acc.reduce(scaled.detach(), reduction="mean").item())
            results[case.name] = {
                "status": "ran",
                "reference": reference,
                "sharded": sharded,
                "logits_diff": logits_diff,
            }
        except Exception as exc:  # one case's failure is reported, the others still run
            results[case.name] = {"error": f"{type(exc).__name__}: {exc}"[:800]}
    return results if acc.is_main_process else {}


def sp_worker(args) -> dict:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    from hf_posenc.train import parallel as par

    deepspeed.init_distributed(dist_backend="gloo" if args.cpu else "nccl")
    rank, size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu") if args.cpu else torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    if not args.cpu:
        torch.cuda.set_device(device)
    plan = par.ShardPlan("sp", size, rank)
    data = batches(args, device)
    cases = [c for c in selected(args) if "sp" in c.expect]
    models, refs, results = {}, {}, {}
    index = par.sp_layout(args.seq_len, size)[rank].to(device)
    for case in cases:  # every reference before Ulysses takes over hf_posenc_sdpa
        model = build(case).to(device)
        par.check_parallel(model, plan)
        losses, first = reference_run(copy.deepcopy(model), data, args.lr)
        results[case.name] = {"status": "ran", "reference": losses}
        models[case.name], refs[case.name] = model, first
    UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=models["rope"],
        core_attn_implementation="hf_posenc_sdpa",
        sequence_parallel_size=size,
        micro_batch_size=args.batch,
        seq_length_is_variable=True,
    )
    for case in cases:
        model = models[case.name]
        opt = torch.optim.SGD(model.parameters(), lr=args.lr)
        sharded, logits_diff = [], None
        try:
            for ids in data:
                batch = par.prepare_batch({"input_ids": ids, "labels": ids}, plan)
                mine = par.shard_batch(batch, plan)
                step = par.sharded_step(model, batch, plan) if case.pinned else contextlib.nullcontext()
                with step:
                    out = model(**mine, use_cache=False)
                    scaled = out.loss * par.loss_scale(mine["shift_labels"], batch["shift_labels"], size)
                    scaled.backward()
                if logits_diff is None:
                    logits_diff = _max((out.logits.detach() - refs[case.name][:, index]).abs().max())
                for p in model.parameters():  # what DeepSpeed's engine does across the sequence-parallel ranks
                    dist.all_reduce(p.grad)
                    p.grad /= size
                opt.step()
                opt.zero_grad(set_to_none=True)
                total = scaled.detach().clone()
                dist.all_reduce(total)
                sharded.append(total.item() / size)
            results[case.name].update(sharded=sharded, logits_diff=logits_diff)
        except Exception as exc:
            results[case.name] = {"error": f"{type(exc).__name__}: {exc}"[:800]}
    dist.destroy_process_group()
    return results if rank == 0 else {}


# ----------------------------------------------------------------------------- dry run (CPU)


def parallelism_from_config(path: Path):
    """The ``ParallelismConfig`` an ``accelerate launch --config_file path`` process builds (through the
    same ``PARALLELISM_CONFIG_*`` variables the launcher sets), and the config's process count."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.parallelism_config import ParallelismConfig

    config = load_config_from_file(str(path))
    prefix = "parallelism_config_"
    env = {f"PARALLELISM_CONFIG_{k.removeprefix(prefix).upper()}": str(v) for k, v in config.parallelism_config.items()}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return ParallelismConfig(), config
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value


def emulate(model, ids: torch.Tensor, plan, pinned: bool) -> float:
    """The sharding logic on one CPU process: the shards of ``ids`` (the plan's chunk size) in order on
    top of their KV cache, with their global positions and (if ``pinned``) the global length; returns
    the largest difference from the full forward's logits."""
    from transformers import DynamicCache

    from hf_posenc.train import parallel as par

    batch = par.prepare_batch({"input_ids": ids}, plan)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    chunks = 2 * plan.size if plan.mode == "cp" else plan.size
    step = ids.shape[1] // chunks
    model.eval()
    with torch.no_grad():
        full = model(**batch, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        worst = 0.0
        length = par.global_length(batch["position_ids"])
        pin = par.pin_global_length(model, length) if pinned else contextlib.nullcontext()
        with pin:
            for k in range(chunks):
                part = slice(k * step, (k + 1) * step)
                positions = batch["position_ids"][:, part]
                out = model(ids[:, part], position_ids=positions, use_cache=True, **{cache_kw: cache})
                worst = max(worst, (out.logits - full[:, part]).abs().max().item())
    return worst


def dry_run(args) -> int:
    """Everything the GPU run relies on that CPU can check: the accelerate configs, each case's plan
    (refusals as expected) and its sharding logic (emulated shards vs the full forward)."""
    from hf_posenc.errors import UnsupportedSchemeError
    from hf_posenc.train import parallel as par

    problems = []
    for mode, path in CONFIGS.items():
        pc, config = parallelism_from_config(path)
        size = pc.cp_size if mode == "cp" else pc.sp_size
        print(
            f"{path.relative_to(ROOT)}: {config.distributed_type}, {config.num_processes} processes, {mode}_size={size}"
        )
        if size < 2 or config.num_processes % size:
            problems.append(f"{path.name}: {mode}_size={size} does not fit {config.num_processes} processes")
        if mode == "cp" and pc.total_size != config.num_processes:
            problems.append(f"{path.name}: total_size {pc.total_size} != num_processes {config.num_processes}")
    ids = batches(argparse.Namespace(batch=1, seq_len=args.seq_len, steps=1), "cpu")[0]
    for mode in args.modes:
        plan = par.ShardPlan(mode, args.ranks)
        for case in selected(args):
            expected = case.expect.get(mode)
            if expected is None:
                continue
            model = build(case)
            try:
                par.check_parallel(model, plan)
            except UnsupportedSchemeError as exc:
                got = "refused"
                detail = str(exc)[:90]
            else:
                diff = emulate(model, ids, plan, case.pinned)
                got = "equal" if diff <= args.tol else "differs"
                detail = f"emulated shards: max |logit diff| {diff:.2e}"
            mark = "ok" if got == expected else "FAIL"
            if mark == "FAIL":
                problems.append(f"{mode} {case.name}: expected {expected}, got {got} ({detail})")
            print(f"  {mode:2} {case.name:22} expected {expected:8} got {got:8} {mark:4}  {detail}")
    for mode in args.modes:
        print("would run:", " ".join(launch_command(args, mode, Path(args.out))))
    for problem in problems:
        print("PROBLEM:", problem)
    return 1 if problems else 0


# ----------------------------------------------------------------------------- launcher


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(args, mode: str, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks),
        "--master_port", str(free_port()), __file__, "--worker", mode, "--out", str(out),
        "--ranks", str(args.ranks), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
        "--batch", str(args.batch), "--lr", str(args.lr), "--tol", str(args.tol), *(["--cpu"] if args.cpu else []),
        *(["--cases", ",".join(args.cases)] if args.cases else []),
    ]  # fmt: skip


def worker_env() -> dict[str, str]:
    """The launcher's environment, with this checkout first on the path (the workers import hf_posenc)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def write_report(out: Path, results: dict, args) -> bool:
    lines = [
        "# Context / sequence parallelism vs one process (benchmarks/gpu_parallel.py)",
        "",
        f"{args.ranks} GPUs ({torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}), tiny LLaMA, "
        f"seq_len {args.seq_len}, batch {args.batch}, {args.steps} SGD steps (lr {args.lr}), fp32; tol {args.tol}.",
        "",
        "| mode | case | expected | result | max loss diff | step-0 logits diff | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    good = True
    for mode, per_case in results.items():
        if "launch" in per_case:
            good = False
            lines.append(f"| {mode} | (launch) | | {per_case['launch']['error'][-200:]!r} | | | FAIL |")
        for case in CASES:
            if case.name not in per_case:
                continue
            result = per_case[case.name]
            mark = verdict(case, mode, result, args.tol) if "skipped" not in result else "skipped"
            good &= mark != "FAIL"
            shown = result.get("error") or result.get("message") or result.get("skipped") or result.get("status")
            diff = f"{result['max_diff']:.2e}" if "max_diff" in result else ""
            logits = f"{result['logits_diff']:.2e}" if result.get("logits_diff") is not None else ""
            lines.append(
                f"| {mode} | {case.name} | {case.expect.get(mode)} | {str(shown)[:120]} | {diff} | {logits} | {mark} |"
            )
    (out / "parallel.md").write_text("\n".join(lines) + "\n")
    (out / "parallel.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print("\n".join(lines))
    return good


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=[*MODES, "both"], default="both")
    parser.add_argument("--ranks", type=int, default=2, help="GPUs (ranks) sharing each sequence (default 2)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (4x the tiny context)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--tol", type=float, default=1e-5, help="largest accepted loss difference (fp32)")
    parser.add_argument("--cases", type=lambda v: v.split(","), default=[], help="comma-separated case names (all)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "gpu" / "parallel"))
    parser.add_argument("--timeout", type=int, default=540, help="seconds per mode")
    parser.add_argument("--dry-run", action="store_true", help="CPU: check configs, plans and sharding logic")
    parser.add_argument(
        "--cpu", action="store_true", help="run the workers on CPU with gloo (sp runs; accelerate refuses cp there)"
    )
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.modes = list(MODES) if args.mode == "both" else [args.mode]
    unknown = sorted(set(args.cases) - {c.name for c in CASES})
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(c.name for c in CASES)}")
    if "rope" not in args.cases and args.cases and "sp" in args.modes and not args.dry_run:
        args.cases.append("rope")  # the sp worker registers Ulysses with the rope case's model
    if args.ranks < 2 or args.seq_len % (2 * args.ranks):
        parser.error(f"--ranks must be >= 2 and --seq-len divisible by 2 x ranks = {2 * args.ranks}")
    out = Path(args.out)
    if args.worker:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        results = cp_worker(args) if args.worker == "cp" else sp_worker(args)
        if results:
            (out / f"{args.worker}.json").write_text(json.dumps(results))
        return 0
    if args.dry_run:
        return dry_run(args)
    found = torch.cuda.device_count()
    if found < args.ranks and not args.cpu:
        parser.error(f"needs {args.ranks} GPUs, found {found}; run with --dry-run on a CPU machine")
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for mode in args.modes:
        if mode == "sp" and not _has("deepspeed"):
            results[mode] = {c.name: {"skipped": "deepspeed not installed"} for c in selected(args) if mode in c.expect}
            continue
        (out / f"{mode}.json").unlink(missing_ok=True)
        start = time.time()
        try:
            proc = subprocess.run(
                launch_command(args, mode, out), capture_output=True, text=True, timeout=args.timeout, env=worker_env()
            )
            log = proc.stdout[-4000:] + proc.stderr[-4000:]
        except subprocess.TimeoutExpired:
            log = f"timed out after {args.timeout} s"
        (out / f"{mode}.log").write_text(log)
        found = out / f"{mode}.json"
        results[mode] = json.loads(found.read_text()) if found.exists() else {"launch": {"error": log[-600:]}}
        print(f"{mode}: {time.time() - start:.0f} s")
    return 0 if write_report(out, results, args) else 1


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    sys.exit(main())
