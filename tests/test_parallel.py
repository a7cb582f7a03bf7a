"""Sharded sequences (context parallelism, DeepSpeed Ulysses): every position scheme computes on its
shard what it computes on the whole sequence (hf_posenc.train.parallel).

On CPU torch's context parallelism does not run its attention (no sharding rule for the CPU SDPA
kernel; accelerate refuses cp_size on MULTI_CPU), so its sharding logic is tested by running the shards
in sequence with their KV cache, their global positions and the pinned global length: each shard's
logits equal the matching slice of the full forward. torch's buffer sharding does run on CPU (2 gloo
processes, no attention). DeepSpeed Ulysses runs on CPU too: where deepspeed is installed,
``test_ulysses_two_processes_match_one_process`` runs it for real against one process.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FREQUENCY_SCHEMES, ORIGINAL_LENGTH, WINDOWED_SCHEMES, cache_kwargs, max_diff, tiny_model, tokens
from transformers import DynamicCache

import hf_posenc
from hf_posenc.errors import InvalidParameterError, UnsupportedSchemeError
from hf_posenc.schemes.alibi import alibi_slopes
from hf_posenc.train import parallel as par

LENGTH = 2 * ORIGINAL_LENGTH  # past the original context, so dynamic NTK and LongRoPE scale
SHARDS = 4
TOL = 1e-5

#: (family, scheme, params, attn_implementation for the patch): every scheme family
CASES = [
    ("llama", None, {}, None),  # the model's own RoPE, unpatched
    *[("llama", s, p, None) for s, p in FREQUENCY_SCHEMES],
    *[("llama", s, p, None) for s, p in WINDOWED_SCHEMES],
    ("llama", "alibi", {}, "sdpa"),
    ("llama", "alibi", {}, "eager"),
    ("bloom", None, {}, None),  # BLOOM's own ALiBi
    ("bloom", "alibi", {}, None),
    ("bloom", "rope", {}, None),
    ("gpt2", "sinusoidal", {}, None),
    ("gpt2", "learned", {"max_positions": 256}, None),
]


def case_id(case) -> str:
    family, scheme, params, backend = case
    extra = ",".join(f"{k}={v}" for k, v in params.items() if not isinstance(v, list | dict))
    return f"{family}-{scheme or 'own'}" + (f"[{extra}]" if extra else "") + (f"-{backend}" if backend else "")


def build(family: str, scheme: str | None, params: dict, backend: str | None):
    model = tiny_model(family, attn="eager" if family == "bloom" else "sdpa")
    if scheme is not None:
        hf_posenc.patch(model, scheme, attn_implementation=backend, **params)
    return model


def full_logits(model, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The one-device forward as the recipe runs it: with its all-ones attention mask (without one,
    transformers reads a jump in ``position_ids``, such as PoSE's, as the start of a packed document)."""
    with torch.no_grad():
        return model(x, position_ids=positions, attention_mask=torch.ones_like(x), use_cache=False).logits


def run_shards(model, x: torch.Tensor, positions: torch.Tensor, *, pin: bool = True, restart: bool = False):
    """The shards of ``x`` in order, each on top of the KV cache of those before it (what ring attention
    computes for a shard), with its slice of the global positions (or positions restarting at 0) and
    the pinned global length (or none). Returns each shard's logits and the cache."""
    cache = DynamicCache(config=model.config)
    step = x.shape[1] // SHARDS
    pinned = par.pin_global_length(model, par.global_length(positions)) if pin else contextlib.nullcontext()
    out = []
    with torch.no_grad(), pinned:
        for k in range(SHARDS):
            part = slice(k * step, (k + 1) * step)
            pos = torch.arange(step)[None] if restart else positions[:, part]
            logits = model(x[:, part], position_ids=pos, use_cache=True, **cache_kwargs(model, cache)).logits
            out.append((part, logits))
    return out, cache


# ----------------------------------------------------------------------------- shards vs the full forward


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_each_shard_equals_its_slice_of_the_full_forward(case):
    model = build(*case)
    x = tokens(1, LENGTH)
    positions = torch.arange(LENGTH)[None]
    full = full_logits(model, x, positions)
    shards, cache = run_shards(model, x, positions)
    for part, logits in shards:
        assert max_diff(logits, full[:, part]) <= TOL, f"shard {part}"
    assert hf_posenc.refresh_count(cache) == 0  # one scale for every shard: the cache is never re-encoded


@pytest.mark.parametrize("scheme", ["rope", "yarn", "dynamic_ntk"])
def test_pose_positions_travel_with_their_tokens(scheme):
    """PoSE's jumping positions (as the recipe's collator writes them) are the batch's global positions."""
    from hf_posenc.train.data import pose_position_ids

    model = build("llama", scheme, dict(dict(FREQUENCY_SCHEMES).get(scheme, {})), None)
    x = tokens(1, LENGTH)
    positions = pose_position_ids(LENGTH, 4 * LENGTH, torch.Generator().manual_seed(5))[None]
    batch = par.prepare_batch({"input_ids": x, "position_ids": positions}, par.ShardPlan("cp", 2))
    assert torch.equal(batch["position_ids"], positions)
    full = full_logits(model, x, positions)
    for part, logits in run_shards(model, x, batch["position_ids"])[0]:
        assert max_diff(logits, full[:, part]) <= TOL


def test_positions_restarting_at_zero_change_the_logits():
    """What a shard fed without its global positions computes: RoPE distances to earlier shards are wrong."""
    model = build("llama", "rope", {}, None)
    x = tokens(1, LENGTH)
    positions = torch.arange(LENGTH)[None]
    full = full_logits(model, x, positions)
    shards, _ = run_shards(model, x, positions, restart=True)
    assert max_diff(shards[0][1], full[:, shards[0][0]]) <= TOL  # the first shard does start at 0
    assert min(max_diff(logits, full[:, part]) for part, logits in shards[1:]) > 1e-3


@pytest.mark.parametrize("scheme", ["dynamic_ntk", "longrope"])
def test_without_the_pinned_length_a_shard_scales_differently(scheme):
    """Unpinned, the first shard (positions < the original context) runs unscaled while the full
    sequence is scaled: its logits differ, and the cache is re-encoded when later shards change the scale."""
    model = build("llama", scheme, dict(FREQUENCY_SCHEMES)[scheme], None)
    x = tokens(1, LENGTH)
    positions = torch.arange(LENGTH)[None]
    full = full_logits(model, x, positions)
    shards, cache = run_shards(model, x, positions, pin=False)
    part, logits = shards[0]
    assert max_diff(logits, full[:, part]) > 1e-4
    assert hf_posenc.refresh_count(cache) > 0


@pytest.mark.parametrize("scheme", ["dynamic_ntk", "longrope", "yarn"])
@pytest.mark.parametrize("mode", ["cp", "sp"])
def test_each_ranks_rotary_tables_are_rows_of_the_global_tables(scheme, mode):
    """Each rank's rotary tables, from its own positions (under cp non-contiguous: chunks r and 2n-1-r)
    and the pinned length, are the matching rows of the global tables. Unpinned, a length-dependent
    scheme scales for the largest position the rank holds: the ranks that do not hold the end (under
    cp dynamic NTK's rank 1; under sp rank 0, which holds no position past the original context for
    LongRoPE either) get other tables."""
    model = build("llama", scheme, dict(FREQUENCY_SCHEMES)[scheme], None)
    rotary = model.model.rotary_emb
    x = torch.zeros(1, 1, 1)
    positions = torch.arange(LENGTH)[None]
    cos, sin = rotary(x, positions)
    layout = par.cp_layout(LENGTH, 2) if mode == "cp" else par.sp_layout(LENGTH, 2)
    unpinned = []
    for index in layout:
        mine = positions[:, index]
        with par.pin_global_length(model, LENGTH):
            my_cos, my_sin = rotary(x, mine)
        assert max_diff(my_cos, cos[:, index]) <= 1e-6 and max_diff(my_sin, sin[:, index]) <= 1e-6
        unpinned.append(max_diff(rotary(x, mine)[0], cos[:, index]))
    short_rank = 1 if mode == "cp" else 0
    assert unpinned[1 - short_rank] == 0.0  # the rank holding the last position scales as the whole
    if scheme == "yarn" or (scheme, mode) == ("longrope", "cp"):  # static; LongRoPE's rank 1 is past 64 too
        assert unpinned[short_rank] == 0.0
    else:
        assert unpinned[short_rank] > 1e-4


def test_pinned_length_is_restored_and_checked():
    model = build("llama", "dynamic_ntk", {"factor": 2.0}, None)
    rotary = model.model.rotary_emb
    with par.pin_global_length(model, LENGTH):
        assert rotary.pinned_length == LENGTH
        with pytest.raises(ValueError, match="past the pinned global length"):
            rotary(torch.zeros(1, 1, 1), torch.arange(LENGTH + 1)[None])
    assert rotary.pinned_length is None
    with pytest.raises(InvalidParameterError, match="positive int"):
        par.pin_global_length(model, 0).__enter__()


# ----------------------------------------------------------------------------- ALiBi under head sharding


@pytest.mark.parametrize("heads", [4, 6, 8, 12, 16])
@pytest.mark.parametrize("size", [2, 4])
def test_alibi_slopes_of_a_rank_are_its_slice_of_the_full_set(heads, size):
    if heads % size:
        with pytest.raises(UnsupportedSchemeError, match="do not split"):
            par.alibi_slopes_for_rank(alibi_slopes(heads), 0, size)
        return
    full = alibi_slopes(heads)
    parts = [par.alibi_slopes_for_rank(full, r, size) for r in range(size)]
    per = heads // size
    for r, part in enumerate(parts):
        assert torch.equal(part, full[r * per : (r + 1) * per])
    assert torch.equal(torch.cat(parts), full)
    # the slopes of a smaller model are other numbers: recomputing them per rank would be the bug
    assert not torch.equal(alibi_slopes(per), parts[0])


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_alibi_attention_on_a_ranks_heads_equals_those_heads_of_full_attention(backend):
    """What Ulysses runs on rank r (every token, heads/n of the heads) inside shard_alibi_heads equals
    those heads of attention over all heads; outside it the mismatch is refused, naming the fix."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = build("llama", "alibi", {}, backend)
    attn = model.model.layers[0].self_attn
    fn = ALL_ATTENTION_FUNCTIONS[f"hf_posenc_{backend}"]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 40, 16, generator=g) for h in (4, 2, 2))  # 4 query heads, 2 kv heads (GQA)
    full, _ = fn(attn, q, k, v, None, scaling=0.25)
    size = 2
    for rank in range(size):
        heads, kv = par.head_slice(4, rank, size), par.head_slice(2, rank, size)
        with par.shard_alibi_heads(model, rank, size):
            part, _ = fn(attn, q[:, heads], k[:, kv], v[:, kv], None, scaling=0.25)
        assert max_diff(part, full[:, :, heads]) <= 1e-6
    with pytest.raises(UnsupportedSchemeError, match="shard_alibi_heads"):
        fn(attn, q[:, :2], k[:, :1], v[:, :1], None, scaling=0.25)


# ----------------------------------------------------------------------------- batches, layouts, loss


def test_cp_layout_is_torchs_load_balanced_layout():
    balancer = pytest.importorskip("torch.distributed.tensor.experimental._context_parallel._load_balancer")
    for length, size in [(16, 2), (48, 3), (64, 4)]:
        torch_order = balancer._HeadTailLoadBalancer(length, size, "cpu")._generate_indices()[0]
        assert torch.equal(torch.cat(par.cp_layout(length, size)), torch_order)


def test_prepare_batch_writes_global_positions_and_shifted_labels():
    x = tokens(2, 16)
    batch = par.prepare_batch({"input_ids": x, "labels": x.clone()}, par.ShardPlan("sp", 2))
    assert torch.equal(batch["position_ids"], torch.arange(16).expand(2, -1))
    assert torch.equal(batch["shift_labels"][:, :-1], x[:, 1:]) and (batch["shift_labels"][:, -1] == -100).all()
    assert batch["labels"] is batch["shift_labels"] and batch["attention_mask"].all()
    assert batch["input_ids"].data_ptr() != x.data_ptr()  # new tensors: accelerate shards them in place
    shard = par.shard_batch(batch, par.ShardPlan("cp", 2, rank=1))
    assert torch.equal(shard["position_ids"][0], torch.cat((torch.arange(4, 8), torch.arange(8, 12))))
    buffers, dims = par.cp_buffers(batch)
    assert len(buffers) == 4 and dims == [1, 1, 1, 1] and any(b is batch["labels"] for b in buffers)


def test_shard_losses_scaled_and_averaged_equal_the_full_loss():
    model = build("llama", "dynamic_ntk", {"factor": 2.0}, None)
    x = tokens(1, LENGTH)
    plan = par.ShardPlan("cp", 2)
    batch = par.prepare_batch({"input_ids": x, "labels": x}, plan)
    with torch.no_grad():
        full = model(x, labels=x, use_cache=False).loss
    logits = full_logits(model, x, batch["position_ids"])
    scaled = []
    for rank, index in enumerate(par.cp_layout(LENGTH, plan.size)):
        mine = par.shard_batch(batch, plan, rank)  # rank 0 holds the last token, which has no target
        loss = torch.nn.functional.cross_entropy(logits[0, index], mine["shift_labels"][0], ignore_index=-100)
        scaled.append(loss * par.loss_scale(mine["shift_labels"], batch["shift_labels"], plan.size))
    assert abs(sum(scaled) / plan.size - full) <= 1e-5


PADDED = torch.tensor([[0] + [1] * 7])
JUMP = torch.tensor([[0, 1, 2, 3, 9, 10, 11, 12]])  # PoSE's skip


@pytest.mark.parametrize(
    ("batch", "plan", "match"),
    [
        ({"input_ids": tokens(1, 10)}, par.ShardPlan("cp", 2), "divisible by 4"),
        ({"input_ids": tokens(1, 9)}, par.ShardPlan("sp", 2), "divisible by 2"),
        ({"input_ids": tokens(1, 8), "attention_mask": PADDED}, par.ShardPlan("cp", 2), "padding"),
        ({"input_ids": tokens(1, 8), "position_ids": JUMP}, par.ShardPlan("sp", 2), "jump"),
        ({"input_ids": tokens(1, 8), "position_ids": torch.arange(6)[None]}, par.ShardPlan("sp", 2), "per token"),
    ],
)  # fmt: skip
def test_batches_a_mode_cannot_shard_are_refused(batch, plan, match):
    with pytest.raises(InvalidParameterError, match=match):
        par.prepare_batch(batch, plan)


def test_plan_rejects_bad_modes_and_sizes():
    with pytest.raises(InvalidParameterError, match="Did you mean 'cp'") as err:
        par.ShardPlan("cpp", 2)
    assert "Valid: cp, sp" in str(err.value)
    with pytest.raises(InvalidParameterError, match="int >= 2"):
        par.ShardPlan("sp", 1)
    with pytest.raises(InvalidParameterError, match=r"in \[0, 2\)"):
        par.ShardPlan("cp", 2, rank=2)


# ----------------------------------------------------------------------------- what each mode refuses


def refused(model, mode: str, size: int = 2) -> str:
    with pytest.raises(UnsupportedSchemeError) as err:
        par.check_parallel(model, par.ShardPlan(mode, size))
    return str(err.value)


def test_cp_refuses_backends_other_than_sdpa():
    for backend in ("eager", "flex_attention"):
        model = tiny_model("llama", attn=backend)
        assert "Accepted: sdpa, hf_posenc_sdpa" in refused(model, "cp")
    par.check_parallel(tiny_model("llama", attn="sdpa"), par.ShardPlan("cp", 2))


def test_sp_refuses_eager_and_flex():
    for backend in ("eager", "flex_attention"):
        message = refused(tiny_model("llama", attn=backend), "sp")
        assert f"attn_implementation={backend!r}" in message and "Accepted: sdpa, flash_attention_2" in message
    par.check_parallel(tiny_model("llama", attn="sdpa"), par.ShardPlan("sp", 2))


def test_cp_refuses_attention_level_schemes_sp_takes_them_on_hf_posenc_sdpa():
    alibi = build("llama", "alibi", {}, "sdpa")
    assert "ring attention takes none" in refused(alibi, "cp")
    par.check_parallel(alibi, par.ShardPlan("sp", 2))
    windowed = build("llama", "self_extend", {"group_size": 4, "window_size": 16}, None)  # on hf_posenc_sdpa
    assert "each rank would attend to its own shard only" in refused(windowed, "cp")
    par.check_parallel(windowed, par.ShardPlan("sp", 2))
    assert "'hf_posenc_eager'" in refused(build("llama", "rerope", {"window_size": 16}, "eager"), "sp")


def test_length_dependent_schemes_pass_but_a_native_dynamic_rope_is_refused():
    for scheme in ("dynamic_ntk", "longrope"):
        model = build("llama", scheme, dict(FREQUENCY_SCHEMES)[scheme], None)
        for mode in ("cp", "sp"):
            par.check_parallel(model, par.ShardPlan(mode, 2))
    native = tiny_model("llama", attn="sdpa", rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    message = refused(native, "cp")
    assert "rope_type 'dynamic'" in message and "hf_posenc.patch(model, 'dynamic_ntk'" in message


def test_sp_refuses_heads_that_do_not_split():
    assert "4 attention heads do not split over sp_size=3" in refused(tiny_model("llama", attn="sdpa"), "sp", 3)


def test_ulysses_handler_names_the_models_own_backend():
    pytest.importorskip("accelerate")
    handler = par.ulysses_handler(build("llama", "alibi", {}, "sdpa"))
    assert handler.sp_attn_implementation == "hf_posenc_sdpa" and handler.sp_seq_length_is_variable
    with pytest.raises(UnsupportedSchemeError, match="not one of"):
        par.ulysses_handler(tiny_model("llama", attn="eager"))


# ------------------------------------------------------------------ torch and DeepSpeed for real (2 processes)


def launch(tmp_path: Path, worker: str, timeout: int = 600) -> dict:
    """Run this file's ``worker`` on 2 gloo processes (torch.distributed.run); rank 0's JSON result."""
    out = tmp_path / f"{worker}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    root = str(Path(__file__).resolve().parents[1])  # the workers import hf_posenc from this checkout
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    done = subprocess.run([*cmd, __file__, worker, str(out)], capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.end_to_end
def test_torch_context_parallel_shards_positions_and_targets_with_the_tokens(tmp_path):
    """torch's own context_parallel (2 gloo processes; only its attention needs a GPU) shards a
    prepare_batch batch's buffers in place: each rank holds shard_batch's shard, positions and targets
    included (labels, the same tensor as shift_labels, sharded once), and its rotary tables under the
    pinned length are the rows of the global tables at the positions it holds."""
    results = launch(tmp_path, "--cp-buffers-worker", timeout=300)
    assert results == {"0": {"same_shard": True, "tables": True}, "1": {"same_shard": True, "tables": True}}


def cp_buffers_worker(out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("cp",))
    plan = par.ShardPlan("cp", 2, rank)
    x = tokens(2, LENGTH)
    batch = par.prepare_batch({"input_ids": x, "labels": x}, plan)
    expected = par.shard_batch(batch, plan)
    model = build("llama", "dynamic_ntk", {"factor": 2.0}, None)
    cos, _ = model.model.rotary_emb(torch.zeros(1, 1, 1), batch["position_ids"])
    buffers, dims = par.cp_buffers(batch)
    with par.sharded_step(model, batch, plan), context_parallel(mesh, buffers=buffers, buffer_seq_dims=dims):
        same = all(torch.equal(batch[k], expected[k]) for k in expected)
        mine, _ = model.model.rotary_emb(torch.zeros(1, 1, 1), batch["position_ids"])
        index = par.cp_layout(LENGTH, 2)[rank]
        tables = max_diff(mine, cos[:, index]) <= 1e-6
    found = [None, None]
    dist.all_gather_object(found, {"same_shard": same, "tables": tables})
    if rank == 0:
        Path(out).write_text(json.dumps({str(r): f for r, f in enumerate(found)}))
    dist.barrier()  # no rank tears gloo down while the other still uses it
    dist.destroy_process_group()


#: (name, scheme, params, sharded_step on?, what is expected: "equal", "differs" or an error name)
ULYSSES_CASES = [
    ("rope", "rope", {}, True, "equal"),
    ("yarn", "yarn", {"factor": 4.0}, True, "equal"),
    ("dynamic_ntk", "dynamic_ntk", {"factor": 2.0}, True, "equal"),
    ("longrope", "longrope", dict(FREQUENCY_SCHEMES)["longrope"], True, "equal"),
    ("alibi", "alibi", {}, True, "equal"),
    ("self_extend", "self_extend", {"group_size": 4, "window_size": 16}, True, "equal"),
    ("dynamic_ntk_unpinned", "dynamic_ntk", {"factor": 2.0}, False, "differs"),
    ("alibi_unsliced", "alibi", {}, False, "UnsupportedSchemeError"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
@pytest.mark.end_to_end
def test_ulysses_two_processes_match_one_process(tmp_path):
    """DeepSpeed Ulysses on 2 gloo processes: each rank's logits equal its slice of the one-process
    forward, and the gradient (scaled losses, averaged over ranks) equals the one-process gradient;
    unpinned dynamic NTK differs, and ALiBi outside shard_alibi_heads is refused."""
    results = launch(tmp_path, "--ulysses-worker")
    for name, *_, expected in ULYSSES_CASES:
        got = results[name]
        if expected == "equal":
            assert got["logits"] <= TOL and got["grad"] <= 1e-5, (name, got)
        elif expected == "differs":
            assert got["logits"] > 1e-4, (name, got)
        else:
            assert got.get("error") == expected, (name, got)


def ulysses_worker(out: str) -> None:
    """One rank of the Ulysses test (run by torch.distributed.run): every case's reference first (one
    process, Ulysses not yet registered), then Ulysses over hf_posenc's sdpa backend, this rank's shard."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    deepspeed.init_distributed(dist_backend="gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    plan = par.ShardPlan("sp", size, rank)
    x = tokens(1, LENGTH)
    batch = par.prepare_batch({"input_ids": x, "labels": x}, plan)
    mine = par.shard_batch(batch, plan)
    models, refs = {}, {}
    for name, scheme, params, *_ in ULYSSES_CASES:
        model = build("llama", scheme, params, "sdpa").train()  # hf_posenc_sdpa; no dropout in the tiny models
        par.check_parallel(model, plan)
        model.zero_grad()
        loss = model(x, labels=x, use_cache=False).loss
        loss.backward()
        grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
        with torch.no_grad():
            refs[name] = (model(x, use_cache=False).logits, grad)
        models[name] = model
    UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=models["rope"],
        core_attn_implementation="hf_posenc_sdpa",
        sequence_parallel_size=size,
        micro_batch_size=1,
        seq_length_is_variable=True,
    )
    index = par.sp_layout(LENGTH, size)[rank]
    results = {}
    for name, _, _, sharded, _ in ULYSSES_CASES:
        model, (ref, ref_grad) = models[name], refs[name]
        model.zero_grad()
        step = par.sharded_step(model, batch, plan) if sharded else contextlib.nullcontext()
        try:
            with step:
                output = model(**mine, use_cache=False)
                scale = par.loss_scale(mine["shift_labels"], batch["shift_labels"], size)
                (output.loss * scale).backward()
        except UnsupportedSchemeError as exc:
            results[name] = {"error": type(exc).__name__}
            continue
        grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
        dist.all_reduce(grad)
        diffs = torch.tensor([max_diff(output.logits.detach(), ref[:, index]), max_diff(grad / size, ref_grad)])
        dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
        results[name] = {"logits": diffs[0].item(), "grad": diffs[1].item()}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()  # no rank tears gloo down while the other still uses it
    dist.destroy_process_group()


@pytest.mark.end_to_end
def test_gpu_script_dry_run_passes_on_cpu():
    """benchmarks/gpu_parallel.py --dry-run: the accelerate configs, every case's plan and its emulated shards."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_parallel.py"
    cases = ["--cases", "native_rope,dynamic_ntk,alibi,dynamic_ntk_unpinned", "--seq-len", "128"]
    done = subprocess.run(
        [sys.executable, str(script), "--dry-run", *cases], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "cp_size=2" in done.stdout and "sp_size=2" in done.stdout and "FAIL" not in done.stdout
    assert done.stdout.count(" ok ") == 7  # 4 cases under cp, 3 under sp (the model's own RoPE: cp only)


if __name__ == "__main__" and len(sys.argv) == 3:
    {"--ulysses-worker": ulysses_worker, "--cp-buffers-worker": cp_buffers_worker}[sys.argv[1]](sys.argv[2])
