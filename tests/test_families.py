"""The family sweep: every rotary causal-LM model_type of the installed transformers, checked against its
row in the family table (hf_posenc/families.py).

For each supported family a tiny random model is patched with every scheme; where the patch writes a
native config, the patched logits at twice the original context equal a natively configured twin (fp32,
<= 1e-5); every patch changes the output and unpatch restores it bitwise; a saved native patch loads in
plain transformers with the same logits. Refused families are refused cleanly, naming why.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from properties import check_left_padding, check_model_made_cache_decode
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import model_type_to_module_name
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import hf_posenc
from hf_posenc.families import FAMILIES, UNCHECKED, families_markdown, tiny_rotary_config
from hf_posenc.patches.base import get_adapter

CONTEXT = 64
INSTALLED = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
OWN = ("own-adapter", "sinusoid-table", "refused")  # checked by their own tests, not the twin sweep
SWEPT = sorted(t for t, row in FAMILIES.items() if row.layout not in OWN and t in INSTALLED)
REFUSED = sorted(t for t, row in FAMILIES.items() if row.refused and t in INSTALLED)
DOCS = Path(__file__).resolve().parent.parent / "docs" / "families.md"


def build(model_type: str, **overrides):
    torch.manual_seed(0)
    config = tiny_rotary_config(model_type, context=CONTEXT, **overrides)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def logits(model, x):
    with torch.no_grad():
        return model(x, use_cache=False).logits


def schemes_for(model) -> list[tuple[str, dict]]:
    info = get_adapter(model).model_info(model)
    pairs = int(info.head_dim * info.partial_rotary_factor) // 2
    longrope = {"short_factor": [1.0] * pairs, "long_factor": [1.0 + i / pairs for i in range(pairs)], "factor": 2.0}
    return [
        ("linear", {"factor": 2.0}),
        ("yarn", {"factor": 2.0}),
        ("dynamic_ntk", {"factor": 2.0}),
        ("llama3", {"factor": 2.0}),
        ("longrope", longrope),
        ("proportional", {"factor": 2.0}),
    ]


def native_twin(model_type: str, patched, state):
    changes = {k: getattr(patched.config, k) for k in patched.config.posenc["original_config"]}
    twin = build(model_type, **changes)
    twin.load_state_dict(state)
    return twin


@pytest.mark.parametrize("model_type", SWEPT)
def test_family_patch_equals_native_twin(model_type, tmp_path):
    model = build(model_type)
    state = model.state_dict()
    x = torch.randint(2, 90, (1, 2 * CONTEXT), generator=torch.Generator().manual_seed(1))
    base = logits(model, x)
    native = []
    for scheme, params in schemes_for(model):
        hf_posenc.patch(model, scheme, **params)
        got = logits(model, x)
        assert (got - base).abs().max() > 1e-7, f"{scheme} left {model_type} unchanged past its context"
        if "rope_parameters" in model.config.posenc["original_config"]:
            twin = native_twin(model_type, model, state)
            assert (got - logits(twin, x)).abs().max() <= 1e-5, f"{scheme}: patched != native twin"
            native.append((scheme, params))
        hf_posenc.unpatch(model)
        assert torch.equal(logits(model, x), base), f"{scheme}: unpatch is not bitwise"
    if not FAMILIES[model_type].native:  # the table says so: every save warns, nothing to load plainly
        assert native == []
        return
    assert native, f"no scheme had a native form on {model_type}"
    scheme, params = native[0]
    hf_posenc.patch(model, scheme, **params)
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert (logits(plain, x) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("model_type", REFUSED)
def test_refused_family_is_refused_cleanly(model_type):
    model = build(model_type)
    x = torch.randint(2, 90, (1, 16))
    before = logits(model, x)
    with pytest.raises(hf_posenc.UnsupportedSchemeError) as info:
        hf_posenc.patch(model, "yarn", factor=2.0)
    keywords = {"complex": "complex", "multimodal": "multimodal", "more than one": "other rotary", "Llama-4": "llama_4"}
    reason = FAMILIES[model_type].refused
    assert any(k in reason and v in str(info.value) for k, v in keywords.items()), str(info.value)
    assert not hf_posenc.is_patched(model)
    assert torch.equal(logits(model, x), before)  # nothing was changed


def _has_rotary_module(model_type: str) -> bool:
    module = model_type_to_module_name(model_type)
    try:
        modeling = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    except ImportError:
        return False
    return any(name.endswith("RotaryEmbedding") for name in vars(modeling))


def test_every_rotary_model_type_has_a_row():
    missing = [t for t in sorted(INSTALLED) if _has_rotary_module(t) and t not in FAMILIES and t not in UNCHECKED]
    assert missing == [], f"rotary model types with no row in hf_posenc/families.py: {missing}"


def test_verified_families_reach_the_target():
    verified = [t for t, row in FAMILIES.items() if not row.refused and t in INSTALLED]
    import transformers
    from packaging.version import Version

    target = 90 if Version(transformers.__version__) >= Version("5.24") else 70
    assert len(verified) >= target, f"{len(verified)} verified model types"


def test_docs_match_the_table():
    assert DOCS.read_text() == families_markdown(), "regenerate: python -m hf_posenc.families > docs/families.md"


def test_table_layout_class_matches_what_probing_finds():
    from hf_posenc.patches.rotary_family import RotaryFamilyAdapter

    for model_type in ("qwen3", "phi", "gemma3_text", "cohere", "gpt_oss", "smollm3"):
        if model_type not in INSTALLED:
            continue
        model = build(model_type)
        layouts = RotaryFamilyAdapter().probe(model)
        row = FAMILIES[model_type].layout
        table = next(iter(layouts.values()))
        found = {
            "per-layer-type": None not in layouts,
            "interleaved": table.layout == "interleave",
            "half-width": table.layout == "half",
            "partial": table.rotary_dim is not None,
            "nope-layers": bool(getattr(model.config, "no_rope_layers", None)),
            "standard": table.layout == "cat" and table.rotary_dim is None,
        }
        assert found[row], (model_type, row, layouts)


# -- the deep properties on one representative per layout class --------------------------------------
REPRESENTATIVES = ["qwen3", "phi", "gemma3_text", "smollm3", "cohere", "gpt_oss"]


@pytest.mark.parametrize("model_type", [t for t in REPRESENTATIVES if t in INSTALLED])
@pytest.mark.parametrize(("scheme", "params"), [("yarn", {"factor": 2.0}), ("dynamic_ntk", {"factor": 2.0})])
def test_cached_decoding_and_left_padding_per_layout_class(model_type, scheme, params):
    model = build(model_type)
    hf_posenc.patch(model, scheme, **params)
    check_deep_properties(model)


def check_deep_properties(model) -> None:
    """The common tester's checks on one family: decoding from the model's own cache equals a fresh
    forward past the original context; a left-padded row equals the row alone."""
    x = torch.randint(2, 90, (2, CONTEXT + 16), generator=torch.Generator().manual_seed(3))
    check_model_made_cache_decode(model, x, CONTEXT - 4)
    check_left_padding(model, [x[0, :48], x[1, :40]], tol=1e-4)


# -- ALiBi and absolute schemes on the generic families -------------------------------------------------
ALIBI_FAMILIES = ["qwen3", "gemma3_text", "cohere", "phi3", "deepseek_v3", "smollm3", "olmo2"]
ALIBI_REFUSED = {"gemma2": "softcap", "gpt_oss": "sinks", "qwen3_next": "every layer", "minimax": "interface"}


@pytest.mark.parametrize("model_type", [t for t in ALIBI_FAMILIES if t in INSTALLED])
def test_alibi_and_absolute_schemes_on_generic_families(model_type):
    """ALiBi runs through hf_posenc's registered backends wherever the family's attention uses
    transformers' attention interface: it takes effect (differs from NoPE), eager and sdpa agree, and
    unpatch is bitwise; an absolute scheme changes the output too."""
    model = build(model_type)
    x = torch.randint(2, 90, (1, 100), generator=torch.Generator().manual_seed(5))
    base = logits(model, x)
    with hf_posenc.patched(model, "nope"):
        nope = logits(model, x)
    results = {}
    for backend in ("eager", "sdpa"):
        with hf_posenc.patched(model, "alibi", attn_implementation=backend):
            results[backend] = logits(model, x)
    assert (results["eager"] - results["sdpa"]).abs().max() <= 1e-5
    assert (results["eager"] - nope).abs().max() > 1e-6, "ALiBi had no effect: its backend never ran"
    for absolute, params in (("sinusoidal", {}), ("learned", {"max_positions": 256})):
        with hf_posenc.patched(model, absolute, **params):
            assert (logits(model, x) - nope).abs().max() > 1e-6, absolute
    assert torch.equal(logits(model, x), base)


@pytest.mark.parametrize(("model_type", "reason"), [(t, r) for t, r in ALIBI_REFUSED.items() if t in INSTALLED])
def test_alibi_is_refused_where_its_backends_would_not_run_or_be_exact(model_type, reason):
    model = build(model_type)
    with pytest.raises(hf_posenc.UnsupportedSchemeError, match=reason):
        hf_posenc.patch(model, "alibi")
    assert not hf_posenc.is_patched(model)


# -- GPT-J and CodeGen: a fixed sin/cos table, no native scaling to compare with ------------------------
TABLE_FAMILIES = sorted(t for t, row in FAMILIES.items() if row.layout == "sinusoid-table" and t in INSTALLED)


def transformers_table(model, rope_parameters: dict, seq_len: int, length: int) -> torch.Tensor:
    """Rows ``cat(sin, cos)`` for positions 0..length-1, from transformers' own rope functions for
    ``rope_parameters`` (computed over the family's rotary_dim channels), as GPT-J's table lays them out."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    dim = model.config.rotary_dim
    config = LlamaConfig(
        hidden_size=dim * 4,
        num_attention_heads=4,
        head_dim=dim,
        max_position_embeddings=CONTEXT,
        rope_parameters=rope_parameters,
    )
    kind = rope_parameters["rope_type"]
    if kind == "default":
        inv_freq, scale = 1.0 / (rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim)), 1.0
    else:
        inv_freq, scale = ROPE_INIT_FUNCTIONS[kind](config, None, seq_len)
    angles = torch.arange(length).float()[:, None] * inv_freq[None]
    return torch.cat((angles.sin() * scale, angles.cos() * scale), dim=-1)


def reference_twin(model_type: str, state: dict, table: torch.Tensor):
    """The unpatched family, its table long enough and filled with ``table``: transformers' own attention
    code running transformers' own frequencies."""
    twin = build(model_type, max_position_embeddings=table.shape[0])
    twin.load_state_dict(state)
    filled = 0
    for module in twin.modules():
        if "embed_positions" in module._buffers:
            module.embed_positions.copy_(table)
            filled += 1
    assert filled
    return twin


@pytest.mark.parametrize("model_type", TABLE_FAMILIES)
def test_sinusoid_table_families_equal_transformers_math_past_their_table(model_type, tmp_path):
    """GPT-J/CodeGen: each scheme equals the family's own attention running transformers' frequencies for
    that scheme at twice the table's length; unpatch is bitwise; hf_posenc's save reloads the patch."""
    model = build(model_type)
    state = model.state_dict()
    x = torch.randint(2, 90, (1, 2 * CONTEXT), generator=torch.Generator().manual_seed(1))
    short = x[:, :CONTEXT]
    base = logits(model, short)
    info = get_adapter(model).model_info(model)
    assert info.head_dim == model.config.rotary_dim  # frequencies over the rotated channels, as the family
    for scheme, params in schemes_for(model):
        if scheme == "proportional":
            continue
        handle = hf_posenc.patch(model, scheme, **params)
        rope = handle.scheme.native_rope_parameters(info)
        got = logits(model, x)
        twin = reference_twin(model_type, state, transformers_table(model, rope, x.shape[1], x.shape[1]))
        assert (got - logits(twin, x)).abs().max() <= 1e-5, f"{scheme}: patched != transformers' math"
        hf_posenc.unpatch(model)
        assert torch.equal(logits(model, short), base), f"{scheme}: unpatch is not bitwise"
    hf_posenc.patch(model, "yarn", factor=2.0)
    expected = logits(model, x)
    with pytest.warns(hf_posenc.PosencWarning):  # no native form: the save needs hf_posenc to load
        model.save_pretrained(tmp_path)
    again = hf_posenc.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert torch.equal(logits(again, x), expected)


@pytest.mark.parametrize("model_type", TABLE_FAMILIES)
def test_sinusoid_table_families_decode_and_pad_exactly(model_type):
    """The deep properties on the custom layout class, for a static and a length-dependent scheme."""
    for scheme in ("yarn", "dynamic_ntk"):
        model = build(model_type)
        hf_posenc.patch(model, scheme, factor=2.0)
        check_deep_properties(model)


@pytest.mark.parametrize("model_type", TABLE_FAMILIES)
def test_sinusoid_table_families_host_absolute_and_alibi_or_refuse_it(model_type):
    """Absolute schemes everywhere; ALiBi where the attention runs through transformers' interface (5.24
    on), refused by name before (nothing changed)."""
    model = build(model_type)
    x = torch.randint(2, 90, (1, 100), generator=torch.Generator().manual_seed(5))
    with hf_posenc.patched(model, "nope"):
        nope = logits(model, x)
    for absolute, params in (("sinusoidal", {}), ("learned", {"max_positions": 256})):
        with hf_posenc.patched(model, absolute, **params):
            assert (logits(model, x) - nope).abs().max() > 1e-6, absolute
    if "rotary_emb" not in model.base_model._modules:
        with pytest.raises(hf_posenc.UnsupportedSchemeError, match=r"ALiBi needs transformers >= 5\.24"):
            hf_posenc.patch(model, "alibi")
        assert not hf_posenc.is_patched(model)
        return
    results = {}
    for backend in ("eager", "sdpa"):
        with hf_posenc.patched(model, "alibi", attn_implementation=backend):
            results[backend] = logits(model, x)
    assert (results["eager"] - results["sdpa"]).abs().max() <= 1e-5
    assert (results["eager"] - nope).abs().max() > 1e-6
