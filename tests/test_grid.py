"""The common tester: one set of property tests over every cell of family x scheme x backend.

Three sets of cells: the grid (GPT-2, LLaMA, BLOOM, GPT-NeoX, OPT x one scheme of every kind x eager,
sdpa and flex attention), the frequency cells (every frequency scheme, partial rotary and bucketed
dynamic NTK included, on LLaMA, Mistral and Qwen2) and the windowed cells (Self-Extend and ReRoPE on
LLaMA with every backend, and on Mistral with GQA). The checks themselves live in ``properties.py``;
``test_flash.py`` and ``test_families.py`` run the same checks on their own cells.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    FREQUENCY_SCHEMES,
    GRID_ARCHS,
    GRID_SCHEMES,
    LLAMA_FAMILY,
    ORIGINAL_LENGTH,
    WINDOWED_SCHEMES,
    max_diff,
    tiny_model,
    tokens,
)
from properties import (
    check_cache_decode,
    check_left_padding,
    check_packing,
    check_position_free,
    check_shift_invariance,
    logits,
    patched_model,
)

import hf_posenc

BACKENDS = ("eager", "sdpa", "flex_attention")
LENGTH_DEPENDENT = ("dynamic_ntk", "longrope")
RELATIVE = ("rope", "linear", "ntk", "yarn", "llama3", "alibi", "rerope")  # not self_extend: it groups i // G

GRID = [(a, s, p, b) for a in GRID_ARCHS for s, p in GRID_SCHEMES for b in BACKENDS]
FREQUENCY = [(t, s, p, "sdpa") for t in LLAMA_FAMILY for s, p in FREQUENCY_SCHEMES]
WINDOWED = [("llama", s, p, b) for s, p in WINDOWED_SCHEMES for b in BACKENDS] + [
    ("mistral", s, p, "sdpa") for s, p in WINDOWED_SCHEMES
]
CELLS = GRID + FREQUENCY + WINDOWED


def ids(cells) -> list[str]:
    out = []
    for cell in cells:
        name = f"{cell[0]}-{cell[1]}-{cell[3]}"
        n = sum(o == name or o.startswith(name + "#") for o in out)
        out.append(f"{name}#{n}" if n else name)
    return out


# FlexAttention has no backward on CPU: training with flex is measured on a GPU (docs/gpu_benchmarks.md)
TRAIN_GRID = [g for g in GRID if g[3] != "flex_attention"]
REL = [c for c in CELLS if c[1] in RELATIVE]


@pytest.mark.parametrize(("arch", "scheme", "params", "backend"), TRAIN_GRID, ids=ids(TRAIN_GRID))
def test_forward_backward_unpatch(arch, scheme, params, backend):
    model = tiny_model(arch)
    x = tokens(2, 100)  # past GPT-2's 64-row table: only the patched model can run it
    short = x[:, : ORIGINAL_LENGTH - 4]
    before = logits(model, short)
    n_params = sum(p.numel() for p in model.parameters())
    hf_posenc.patch(model, scheme, attn_implementation=backend, **params)
    model.train()
    loss = model(x, labels=x, use_cache=False).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval().zero_grad(set_to_none=True)
    # Inside the original context these patches leave the function unchanged; all others change it.
    unchanged = (arch, scheme) in {
        ("gpt2", "learned"),
        ("opt", "learned"),
        *((a, s) for a in ("llama", "gpt_neox") for s in ("rope", "dynamic_ntk")),
    }
    assert torch.equal(logits(model, short), before) == (unchanged and backend == "eager")
    hf_posenc.unpatch(model)
    assert torch.equal(logits(model, short), before)
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize(("arch", "scheme", "params", "backend"), FREQUENCY, ids=ids(FREQUENCY))
def test_unpatch_restores_config_modules_and_logits(arch, scheme, params, backend):
    model = tiny_model(arch)
    x = tokens(2, 2 * ORIGINAL_LENGTH)
    before = logits(model, x)
    config_before = copy.deepcopy(model.config.to_dict())
    modules_before = dict(model.named_modules())
    hf_posenc.patch(model, scheme, attn_implementation=backend, **params)
    assert not torch.equal(logits(model, x), before) or scheme == "rope"
    hf_posenc.unpatch(model)
    assert torch.equal(logits(model, x), before)
    assert model.config.to_dict() == config_before
    assert dict(model.named_modules()) == modules_before
    assert "forward" not in model.model.__dict__


@pytest.mark.parametrize(("arch", "scheme", "params", "backend"), CELLS, ids=ids(CELLS))
def test_cache_decode_equals_fresh_forward(arch, scheme, params, backend):
    # crosses the original length (64), where dynamic / longrope change their frequencies
    check_cache_decode(patched_model(arch, scheme, params, backend), ORIGINAL_LENGTH - 6, ORIGINAL_LENGTH + 12)


@pytest.mark.parametrize(("arch", "scheme", "params", "backend"), CELLS, ids=ids(CELLS))
def test_left_padding_equals_unpadded(arch, scheme, params, backend):
    model = patched_model(arch, scheme, params, backend)
    # past the original context; a length-dependent scheme's rows stay inside it (one scale for the batch)
    length_dependent = scheme in LENGTH_DEPENDENT or (params.get("rope") or {}).get("scheme") in LENGTH_DEPENDENT
    lengths = (50, 33) if length_dependent else (90, 57)
    rows = [tokens(1, n, seed=11 + i)[0] for i, n in enumerate(lengths)]
    check_left_padding(model, rows, positions=arch != "bloom")


@pytest.mark.parametrize(("arch", "scheme", "params", "backend"), CELLS, ids=ids(CELLS))
def test_packed_sequences_equal_separate(arch, scheme, params, backend):
    docs = [tokens(1, 40, seed=31)[0], tokens(1, 24, seed=32)[0]]  # each shorter than the original length
    check_packing(patched_model(arch, scheme, params, backend), docs)


@pytest.mark.parametrize(("arch", "scheme", "params", "backend"), REL, ids=ids(REL))
def test_relative_schemes_are_shift_invariant(arch, scheme, params, backend):
    check_shift_invariance(patched_model(arch, scheme, params, backend))


@pytest.mark.parametrize("arch", (*GRID_ARCHS, "qwen2"))
def test_nope_is_position_free(arch):
    check_position_free(patched_model(arch, "nope", {}, "eager"))


@pytest.mark.parametrize("arch", GRID_ARCHS)
@pytest.mark.parametrize(("scheme", "params"), GRID_SCHEMES, ids=[s for s, _ in GRID_SCHEMES])
def test_backends_agree(arch, scheme, params):
    x = tokens(2, 90)
    out = {b: logits(patched_model(arch, scheme, params, b), x) for b in BACKENDS}
    assert max_diff(out["eager"], out["sdpa"]) <= 1e-5
    assert max_diff(out["eager"], out["flex_attention"]) <= 1e-5


@pytest.mark.parametrize(("arch", "scheme", "params", "backend"), FREQUENCY, ids=ids(FREQUENCY))
def test_frequency_schemes_agree_on_eager_and_sdpa(arch, scheme, params, backend):
    x = tokens(2, 100)
    out = {b: logits(patched_model(arch, scheme, params, b), x) for b in ("eager", "sdpa")}
    assert max_diff(out["eager"], out["sdpa"]) <= 1e-5


@pytest.mark.parametrize("arch", GRID_ARCHS)
@pytest.mark.parametrize(("scheme", "params"), GRID_SCHEMES, ids=[s for s, _ in GRID_SCHEMES])
def test_save_and_reload(tmp_path, arch, scheme, params):
    model = patched_model(arch, scheme, params, "sdpa")
    x = tokens(2, 90)
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    reloaded = hf_posenc.from_pretrained(str(tmp_path))
    assert reloaded.config._attn_implementation == model.config._attn_implementation  # the backend comes back
    assert max_diff(logits(reloaded, x), expected) <= 1e-6
    short = x[:, : ORIGINAL_LENGTH - 4]
    base = tiny_model(arch)
    hf_posenc.unpatch(reloaded)  # the pre-patch model comes back, extra tensors and all
    assert max_diff(logits(reloaded, short), logits(base, short)) <= 1e-6
