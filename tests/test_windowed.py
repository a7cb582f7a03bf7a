"""Self-Extend and ReRoPE against a straightforward implementation written here from the papers: every
score q_i . k_j is computed with the query rotated by the scheme's relative distance D(i, j) (the key at
position 0), with the frequencies transformers' own rotary module computes, and one dense softmax. On
LLaMA, a GQA model (Mistral), a partial-rotary model (StableLM) and an interleaved-layout one (Cohere).

The cache, padding, packing and backend properties run in the common tester (tests/test_grid.py).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import WINDOWED_SCHEMES, failing_compile, max_diff
from properties import logits
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.masking_utils import AttentionMaskInterface, eager_mask

import hf_posenc
from hf_posenc.families import tiny_rotary_config

LAYOUT = {"llama": "cat", "mistral": "cat", "stablelm": "cat", "cohere": "interleave"}
NATIVE_TYPE = {"dynamic_ntk": "dynamic"}  # hf_posenc's scheme name -> transformers' rope_type
LENGTH = 90


def paper_distance(scheme: str, params: dict, i: int, j: int) -> float:
    """D(i, j) as the papers define it (scalar, causal j <= i)."""
    d, w = i - j, params["window_size"]
    if d < w:
        return float(d)
    if scheme == "self_extend":  # Jin et al. 2024
        g = params["group_size"]
        return float((i // g + w - w // g) - j // g)
    leak = params.get("leak")  # Su 2023: ReRoPE, leaky ReRoPE
    return float(w) if leak is None else w + (d - w) / leak


def rotate_by(x: torch.Tensor, angle: torch.Tensor, scale: float, layout: str) -> torch.Tensor:
    """Rotate each channel pair of ``x`` (..., D) by ``angle`` (..., pairs), scaled by ``scale``."""
    pairs = angle.shape[-1]
    x = x.expand(*torch.broadcast_shapes(x.shape[:-1], angle.shape[:-1]), x.shape[-1])
    out = x.clone()
    first = torch.arange(pairs) if layout == "cat" else torch.arange(0, 2 * pairs, 2)
    second = first + pairs if layout == "cat" else first + 1
    a, b = x[..., first], x[..., second]
    cos, sin = angle.cos() * scale, angle.sin() * scale
    out[..., first], out[..., second] = a * cos - b * sin, b * cos + a * sin
    if x.shape[-1] > 2 * pairs:  # channels past the rotated ones keep the plain attention scaling
        rest = torch.ones(x.shape[-1], dtype=torch.bool)
        rest[first], rest[second] = False, False
        out[..., rest] = x[..., rest]
    return out


def reference_function(distance: torch.Tensor, inv_freq: torch.Tensor, scale: float, layout: str):
    """An attention function that receives unrotated q, k and computes every score at ``distance``."""

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        angle = distance[..., None] * inv_freq  # (q, kv, pairs)
        rotated_q = rotate_by(query[:, :, :, None, :], angle, scale, layout)  # (B, H, q, kv, D)
        rotated_k = rotate_by(key[:, :, None, :, :], torch.zeros_like(angle), scale, layout)
        scores = (rotated_q * rotated_k).sum(-1) * scaling
        if attention_mask is None:  # causal
            attention_mask = torch.zeros(distance.shape).masked_fill(~torch.ones(distance.shape).tril().bool(), -1e30)
        elif attention_mask.dtype == torch.bool:  # the family's own mask (Mistral's sliding window included)
            attention_mask = torch.zeros(attention_mask.shape).masked_fill(~attention_mask, -1e30)
        probs = (scores + attention_mask).softmax(-1)
        return (probs @ value).transpose(1, 2), probs

    return attend


def build(model_type: str, **overrides):
    torch.manual_seed(0)
    if model_type == "mistral":  # a window past the test length, so scores beyond W exist
        overrides.setdefault("sliding_window", 4 * LENGTH)
    config = tiny_rotary_config(model_type, **overrides)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@pytest.mark.parametrize("model_type", list(LAYOUT))
@pytest.mark.parametrize(
    ("scheme", "params"), WINDOWED_SCHEMES, ids=[f"{s}-{i}" for i, (s, _) in enumerate(WINDOWED_SCHEMES)]
)
def test_windowed_scheme_equals_the_papers_formula(model_type, scheme, params):
    check_papers_formula(model_type, scheme, params)


LONGROPE = {  # LENGTH is past the original 64 positions: the long factors and LongRoPE's attention scaling
    "scheme": "longrope",
    "short_factor": [1.0 + i / 8 for i in range(8)],
    "long_factor": [2.0 + i / 4 for i in range(8)],
    "original_max_position_embeddings": 64,
    "factor": 2.0,
}


@pytest.mark.parametrize(
    ("scheme", "params"),
    [
        ("rerope", {"window_size": 16, "rope": LONGROPE}),
        ("self_extend", {"group_size": 3, "window_size": 8, "rope": LONGROPE}),
    ],
)
def test_windowed_over_longrope_equals_the_papers_formula(scheme, params):
    check_papers_formula("llama", scheme, params)


def check_papers_formula(model_type: str, scheme: str, params: dict) -> None:
    model = build(model_type)
    x = torch.randint(2, 90, (2, LENGTH), generator=torch.Generator().manual_seed(1))
    base = logits(model, x)
    rope = params.get("rope")
    # the frequencies transformers computes for the scheme underneath (a natively configured twin)
    source = model
    if rope is not None:
        native = {
            "rope_type": NATIVE_TYPE.get(rope["scheme"], rope["scheme"]),
            "rope_theta": model.config.rope_parameters["rope_theta"],
            **{k: v for k, v in rope.items() if k != "scheme"},
        }
        native |= {k: v for k, v in model.config.rope_parameters.items() if k == "partial_rotary_factor"}
        source = build(model_type, rope_parameters=native)
    rotary = source.model.rotary_emb
    rotary(torch.zeros(()), torch.arange(LENGTH)[None])  # a length-dependent type picks this length's frequencies
    inv_freq, scale = rotary.inv_freq.float(), float(rotary.attention_scaling)
    if rope is not None:  # the scheme underneath changes the frequencies at this length
        assert not torch.equal(inv_freq, model.model.rotary_emb.inv_freq.float())
    distance = torch.tensor([[paper_distance(scheme, params, i, j) for j in range(LENGTH)] for i in range(LENGTH)])

    hf_posenc.patch(model, scheme, **params)
    got = logits(model, x)
    hf_posenc.unpatch(model)
    assert torch.equal(logits(model, x), base)

    name = f"test_reference_{scheme}"
    AttentionInterface.register(name, reference_function(distance, inv_freq, scale, LAYOUT[model_type]))
    AttentionMaskInterface.register(name, eager_mask)
    with hf_posenc.patched(model, "nope"):  # the family's own rotary step becomes the identity
        model.config._attn_implementation = name
        want = logits(model, x)
    model.config._attn_implementation = "eager"
    assert max_diff(got, want) <= 1e-5
    assert max_diff(got, base) > 1e-4  # past the window the scheme changes the output


@pytest.mark.parametrize(("scheme", "params"), WINDOWED_SCHEMES[:2])
def test_windowed_save_reloads_with_hf_posenc_only(tmp_path, scheme, params):
    model = build("llama")
    x = torch.randint(2, 90, (1, LENGTH), generator=torch.Generator().manual_seed(2))
    plain = logits(model, x)
    hf_posenc.patch(model, scheme, **params)
    expected = logits(model, x)
    with pytest.warns(hf_posenc.PosencWarning, match="hf_posenc.from_pretrained"):
        model.save_pretrained(tmp_path)
    again = hf_posenc.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert torch.equal(logits(again, x), expected)
    unpatched = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert max_diff(logits(unpatched, x), plain) <= 1e-6  # plain transformers: the model before the patch


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"group_size": 8, "window_size": 4}, "window_size must be an integer >= group_size"),
        ({"group_size": 0, "window_size": 4}, "group_size must be an integer >= 1"),
        ({"group_size": 2, "window_size": 8, "rope": {"scheme": "dynamic_ntk", "factor": 0.5}}, "factor"),
        ({"group_size": 2, "window_size": 8, "rope": {"scheme": "alibi"}}, "rotary frequency scheme"),
        ({"group_size": 2, "window_size": 8, "rope": "yarn"}, "scheme spec"),
    ],
)
def test_bad_self_extend_parameters_are_refused(params, match):
    model = build("llama")
    with pytest.raises(hf_posenc.InvalidParameterError, match=match):
        hf_posenc.patch(model, "self_extend", **params)
    assert not hf_posenc.is_patched(model)


@pytest.mark.parametrize(
    ("model_type", "kwargs", "match"),
    [
        ("gemma3_text", {}, "per-layer-type"),
        ("gpt_oss", {}, "sinks"),  # attention sinks: refused before its half-width layout is looked at
        ("gptj", {}, "cannot host scheme 'self_extend'"),
        ("llama", {"attn_implementation": "flash_attention_2"}, "flash-attn|runs on"),
    ],
)
def test_windowed_schemes_are_refused_where_they_cannot_run(model_type, kwargs, match):
    model = build(model_type)
    with pytest.raises(hf_posenc.UnsupportedSchemeError, match=match):
        hf_posenc.patch(model, "self_extend", group_size=2, window_size=8, **kwargs)
    assert not hf_posenc.is_patched(model)


@pytest.mark.parametrize("scheme", ["self_extend", "rerope"])
def test_flex_runs_its_kernel_with_the_models_block_mask(monkeypatch, scheme):
    """flex attention itself (not the dense fallback) with a left-padded batch: the model's BlockMask,
    doubled from its block lists and pruned to each copy's side of the window, gives the eager numbers.
    (A fresh dynamo state: on CPU, torch 2.13 compiles the first shape statically; later shapes may hit
    its dynamic-shape bug and fall back.)"""
    from hf_posenc.patches import attention

    torch._dynamo.reset()
    monkeypatch.setattr(attention, "_FLEX_FAILED", set())
    params = {"window_size": 40, **({"group_size": 4} if scheme == "self_extend" else {})}
    # past three 128-token blocks, so the window prunes blocks from both key copies
    rows = [torch.randint(2, 90, (400,)), torch.randint(2, 90, (330,))]
    from properties import left_pad

    ids, mask = left_pad(rows)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = {}
    for backend in ("eager", "flex_attention"):
        model = build("llama")
        hf_posenc.patch(model, scheme, attn_implementation=backend, **params)
        out[backend] = logits(model, ids, attention_mask=mask, position_ids=positions)
    assert not attention._FLEX_FAILED, attention._FLEX_FAILED
    real = mask.bool()
    assert max_diff(out["eager"][real], out["flex_attention"][real]) <= 1e-5


def eager_and_flex_logits(scheme: str, params: dict, ids: torch.Tensor, **inputs) -> dict[str, torch.Tensor]:
    """Logits of the tiny LLaMA patched with ``scheme`` on eager and on flex attention (hf_posenc's
    fallback warnings silenced), keyed by backend."""
    out = {}
    for backend in ("eager", "flex_attention"):
        model = build("llama")
        hf_posenc.patch(model, scheme, attn_implementation=backend, **params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hf_posenc.PosencWarning)
            out[backend] = logits(model, ids, **inputs)
    return out


@pytest.mark.parametrize("scheme", ["self_extend", "rerope"])
def test_flex_compile_failure_runs_densely_over_query_chunks(monkeypatch, flex_compile_fails, scheme):
    """When flex fails to compile (torch 2.13's CPU dynamic-shape bug), the call runs densely over query
    chunks, so a 16k prompt stays O(chunk x L) in memory: left-padded, several chunks, eager's numbers."""
    attention = flex_compile_fails
    monkeypatch.setattr(attention, "_static_flex", failing_compile)  # the per-shape retry of long calls fails too
    monkeypatch.setattr(attention, "DENSE_CHUNK_ELEMENTS", 13 * 70)  # 13 query rows per chunk
    params = {"window_size": 12, **({"group_size": 4} if scheme == "self_extend" else {})}
    from properties import left_pad

    ids, mask = left_pad([torch.randint(2, 90, (70,)), torch.randint(2, 90, (51,))])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = eager_and_flex_logits(scheme, params, ids, attention_mask=mask, position_ids=positions)
    assert attention._FLEX_FAILED
    real = mask.bool()
    assert max_diff(out["eager"][real], out["flex_attention"][real]) <= 1e-5


def test_long_calls_retry_a_failed_dynamic_compile_one_shape_at_a_time(monkeypatch, flex_compile_fails):
    """After the dynamic-shape compile failed (torch 2.13 on CPU), a long call (past the dense chunk
    budget, where the dense path is slow) is compiled for its own shape and still runs flex; a short
    one goes dense. Both give eager's numbers."""
    attention = flex_compile_fails
    static_calls = []
    compiled = attention._static_flex()

    def counted():
        def run(*args):
            static_calls.append(args[0].shape[2])
            return compiled(*args)

        return run

    torch._dynamo.reset()
    monkeypatch.setattr(attention, "_static_flex", counted)
    monkeypatch.setattr(attention, "DENSE_CHUNK_ELEMENTS", 20_000)
    for length in (40, 150):  # 40 queries x 2 x 128 doubled keys: short; 150 x 2 x 256: long
        ids = torch.randint(2, 90, (1, length))
        out = eager_and_flex_logits("self_extend", {"group_size": 4, "window_size": 12}, ids)
        assert max_diff(out["eager"], out["flex_attention"]) <= 1e-5
    assert static_calls and set(static_calls) == {150}, static_calls


@pytest.mark.parametrize(
    ("scheme", "params"), [("self_extend", {"group_size": 4, "window_size": 12}), ("alibi", {})], ids=str
)
def test_short_calls_of_a_failed_kind_go_dense_before_building_flex_inputs(
    monkeypatch, flex_compile_fails, scheme, params
):
    """Once a kind's dynamic-shape compile failed, its short calls go dense at once: only the first
    layer's call (the one that failed) reaches the flex entry, the other layers never build the flex
    inputs (doubled keys, block mask, contiguous copies). Eager's numbers all the same."""
    attention = flex_compile_fails
    entered = []
    run = attention.run_compiled_flex

    def counted(kind, query, *args):
        entered.append(kind)
        return run(kind, query, *args)

    monkeypatch.setattr(attention, "run_compiled_flex", counted)
    ids = torch.randint(2, 90, (1, 40))
    out = eager_and_flex_logits(scheme, params, ids)
    assert build("llama").config.num_hidden_layers > 1
    assert len(entered) == 1 and entered[0] in attention._FLEX_FAILED, entered
    assert max_diff(out["eager"], out["flex_attention"]) <= 1e-5


def test_mask_rows_evaluates_a_block_mask_on_the_given_rows_only():
    """The dense fallbacks evaluate the model's BlockMask chunk by chunk: each chunk's rows equal the
    same rows of the whole mask (a row offset lost would give the first rows' mask again)."""
    from torch.nn.attention.flex_attention import create_block_mask, create_mask

    from hf_posenc.patches.attention import mask_rows

    lengths = torch.tensor([40, 25])

    def mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < 17) & (kv_idx >= 40 - lengths[b])

    whole = create_mask(mod, 2, 1, 40, 40, device="cpu")
    block = create_block_mask(mod, 2, None, 40, 40, device="cpu")
    for rows in (slice(0, 9), slice(9, 27), slice(27, 40)):
        assert torch.equal(mask_rows(block, 2, 40, 40, rows, torch.device("cpu")), whole[:, :, rows])
    causal = mask_rows(None, 1, 5, 12, slice(2, 4), torch.device("cpu"))  # queries are the last 5 keys
    assert torch.equal(causal[0, 0].sum(-1), torch.tensor([10, 11]))


def scored_blocks(q_pos, k_pos, allowed, window, block):
    """(B, q blocks, 2 x kv blocks): the blocks holding at least one score a key copy keeps, brute force."""
    distance = q_pos[:, :, None] - k_pos[:, None, :]
    pad_q, pad_k = -q_pos.shape[1] % block, -k_pos.shape[1] % block
    out = []
    for copy in (allowed & (distance < window), allowed & (distance >= window)):
        copy = torch.nn.functional.pad(copy, (0, pad_k, 0, pad_q))
        b, q, k = copy.shape
        out.append(copy.view(b, q // block, block, k // block, block).any(-1).any(-2))
    return torch.cat(out, dim=-1)


def test_window_block_mask_keeps_every_scored_block_and_prunes_the_rest():
    """The doubled block mask holds every block in which some score survives (so nothing is lost), and for
    contiguous positions exactly those blocks; it visits far fewer blocks than both copies in full."""
    from torch.nn.attention.flex_attention import create_block_mask

    from hf_posenc.patches.windowed import _window_block_mask

    length, window, block = 700, 150, 128
    offset = -(-length // block) * block
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    contiguous = torch.arange(length)[None]
    # no model mask (causal): exactly the scored blocks
    got = _window_block_mask(None, (contiguous, contiguous), window, length, offset).to_dense().bool()
    want = scored_blocks(contiguous, contiguous, causal[None], window, block)
    assert torch.equal(got[:, 0], want)
    both_copies_in_full = 2 * scored_blocks(contiguous, contiguous, causal[None], 10**9, block).sum()
    assert got.sum() < 0.75 * both_copies_in_full
    # a left-padded batch under the model's own BlockMask: a superset of the scored blocks
    real = torch.ones(2, length, dtype=torch.bool)
    real[1, :260] = False
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)

    def model_mask(b, h, q, k):
        return (k <= q) & real[b, k]

    block_mask = create_block_mask(model_mask, 2, 1, length, length, device="cpu")
    got = _window_block_mask(block_mask, (positions, positions), window, length, offset).to_dense().bool()
    allowed = causal[None] & real[:, None, :]
    want = scored_blocks(positions, positions, allowed, window, block)
    assert not (want & ~got[:, 0]).any()
    full = scored_blocks(positions, positions, allowed, 10**9, block) | scored_blocks(
        positions, positions, allowed, -1, block
    )
    assert got.sum() < full.sum()
