"""A patched model survives what users do to any transformers model: cached decoding however the cache
came into being, deepcopy and pickling, peft in either order, threads, dtype changes, shared configs,
saving and reloading; or it refuses clearly."""

from __future__ import annotations

import copy
import io
import json
import threading
import warnings

import pytest
import torch
from conftest import (
    DYNAMIC,
    GRID_ARCHS,
    GRID_SCHEMES,
    ORIGINAL_LENGTH,
    cache_kwargs,
    max_diff,
    out_cache,
    tiny_config,
    tiny_model,
    tokens,
)
from transformers import AutoModelForCausalLM, DynamicCache, StaticCache

import hf_posenc

LONGROPE = {"short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "factor": 2.0}
# every family x a scheme that exercises its own path (q/k hooks, rotary swap, BLOOM's attention, tables)
CELLS = [
    ("gpt2", "rope", {}),
    ("gpt2", "sinusoidal", {}),
    ("gpt2", "dynamic_ntk", DYNAMIC),
    ("opt", "rope", {}),
    ("opt", "alibi", {}),
    ("bloom", "rope", {}),
    ("bloom", "alibi", {}),
    ("llama", "dynamic_ntk", DYNAMIC),
    ("llama", "sinusoidal", {}),
    ("llama", "alibi", {}),
    ("gpt_neox", "yarn", {"factor": 4.0}),
    ("qwen2", "learned", {"max_positions": 256}),
]
GRID = [(a, s, p) for a in GRID_ARCHS for s, p in GRID_SCHEMES]
CELL_IDS = [f"{a}-{s}" for a, s, _ in CELLS]


def logits(model, x, **kw):
    with torch.no_grad():
        return model(x, **kw).logits


def patched(arch, scheme, params, **kw):
    model = tiny_model(arch, **kw)
    hf_posenc.patch(model, scheme, **params)
    return model


# ----------------------------------------------------------------------------- cached decoding


@pytest.mark.parametrize(
    ("arch", "scheme", "params"),
    [
        ("llama", "dynamic_ntk", DYNAMIC),
        ("llama", "longrope", LONGROPE),
        ("gpt2", "dynamic_ntk", DYNAMIC),
        ("bloom", "dynamic_ntk", DYNAMIC),
    ],
    ids=["llama-dynamic", "llama-longrope", "gpt2-dynamic", "bloom-dynamic"],
)
def test_decoding_from_a_cache_the_model_created(arch, scheme, params):
    """The everyday loop: the first call creates the cache (use_cache=True, no cache passed), later
    calls pass it back; every step equals a fresh forward of the same prefix across the original length."""
    model = patched(arch, scheme, params)
    x = tokens(1, ORIGINAL_LENGTH + 24)
    prompt = ORIGINAL_LENGTH - 8
    with torch.no_grad():
        out = model(x[:, :prompt], use_cache=True)
        cache = out_cache(out)
        worst = 0.0
        for t in range(prompt, x.shape[1]):
            step = model(x[:, t : t + 1], **cache_kwargs(model, cache))
            cache = out_cache(step)
            fresh = model(x[:, : t + 1]).logits[:, -1]
            worst = max(worst, max_diff(step.logits[:, -1], fresh))
    assert worst <= 1e-5
    assert hf_posenc.refresh_count(cache) >= 1  # the scale changed on the way, and the cache followed


def test_static_cache_with_exact_refresh_is_refused_clearly():
    model = patched("llama", "dynamic_ntk", DYNAMIC)
    cache = StaticCache(config=model.config, max_cache_len=128)
    with pytest.raises(hf_posenc.CacheRefreshError, match=r"needs a dynamic KV cache.*refresh='none'"):
        model(tokens(1, 8), use_cache=True, **cache_kwargs(model, cache))
    hf_posenc.unpatch(model)
    hf_posenc.patch(model, "dynamic_ntk", refresh="none", **DYNAMIC)  # the documented alternative runs
    model(tokens(1, 8), use_cache=True, **cache_kwargs(model, StaticCache(config=model.config, max_cache_len=128)))


# ----------------------------------------------------------------------------- deepcopy and pickling


@pytest.mark.parametrize(("arch", "scheme", "params"), GRID, ids=[f"{a}-{s}" for a, s, _ in GRID])
def test_deepcopy_is_an_independent_patched_model(arch, scheme, params):
    model = tiny_model(arch)
    x = tokens(2, 100)
    base = logits(model, x[:, :40])
    hf_posenc.patch(model, scheme, **params)
    expected = logits(model, x)

    twin = copy.deepcopy(model)
    assert hf_posenc.get_handle(twin) is not hf_posenc.get_handle(model)
    assert hf_posenc.get_handle(twin).model is twin
    assert max_diff(logits(twin, x), expected) == 0
    with torch.no_grad():  # the copy runs its own weights, not the original's
        for p in twin.parameters():
            p.mul_(1.5)
    assert max_diff(logits(twin, x), expected) > 1e-3
    assert max_diff(logits(model, x), expected) == 0

    other = copy.deepcopy(model)
    hf_posenc.unpatch(other)  # unpatching a copy leaves the original patched
    assert hf_posenc.is_patched(model)
    assert max_diff(logits(model, x), expected) == 0
    assert max_diff(logits(other, x[:, :40]), base) == 0
    hf_posenc.unpatch(model)  # ... and unpatching the original leaves the copy patched
    assert max_diff(logits(twin, x), logits(twin, x)) == 0 and hf_posenc.is_patched(twin)
    assert max_diff(logits(model, x[:, :40]), base) == 0


@pytest.mark.parametrize(("arch", "scheme", "params"), CELLS[:8], ids=CELL_IDS[:8])
def test_patched_model_pickles(arch, scheme, params):
    model = patched(arch, scheme, params)
    x = tokens(2, 90)
    expected = logits(model, x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    assert max_diff(logits(restored, x), expected) == 0
    hf_posenc.unpatch(restored)
    assert hf_posenc.is_patched(model)


# ----------------------------------------------------------------------------- peft


def _lora(model):
    from peft import LoraConfig, get_peft_model

    targets = {"gpt2": ["c_attn"], "bloom": ["query_key_value"]}.get(
        model.config.model_type, ["q_proj", "k_proj", "v_proj"]
    )
    torch.manual_seed(7)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)  # non-zero delta
    return get_peft_model(model, config)


@pytest.mark.parametrize(
    ("arch", "scheme", "params"),
    [("gpt2", "rope", {}), ("opt", "rope", {}), ("llama", "yarn", {"factor": 4.0}), ("bloom", "rope", {})],
    ids=["gpt2-rope", "opt-rope", "llama-yarn", "bloom-rope"],
)
def test_peft_in_either_order_gives_the_same_model(arch, scheme, params):
    x = tokens(2, 90)
    patch_first = _lora(patched(arch, scheme, params))
    lora_first = _lora(tiny_model(arch))
    hf_posenc.patch(lora_first, scheme, **params)  # a PeftModel is patched through its base model
    assert hf_posenc.is_patched(lora_first) and hf_posenc.is_patched(lora_first.get_base_model())
    assert max_diff(logits(patch_first, x), logits(lora_first, x)) <= 1e-5
    # the LoRA delta is part of the rotated q/k: removing it changes the output
    with patch_first.disable_adapter():
        assert max_diff(logits(patch_first, x), logits(lora_first, x)) > 1e-4
    # merging keeps the model the same
    merged = patch_first.merge_and_unload()
    assert max_diff(logits(merged, x), logits(lora_first, x)) <= 1e-4
    hf_posenc.unpatch(lora_first)
    assert not hf_posenc.is_patched(lora_first)


def test_absolute_scheme_follows_replaced_input_embeddings():
    """Absolute schemes on a RoPE family add their table to whatever embeddings the model uses at call
    time: set_input_embeddings and peft's modules_to_save copies are honoured."""
    model = patched("llama", "sinusoidal", {})
    x = tokens(1, 30)
    before = logits(model, x)
    replacement = torch.nn.Embedding.from_pretrained(model.get_input_embeddings().weight * 2.0, freeze=False)
    model.set_input_embeddings(replacement)
    assert max_diff(logits(model, x), before) > 1e-3

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        patched("llama", "sinusoidal", {}),
        LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
    )
    start = logits(peft_model, x)
    embed = peft_model.get_base_model().model.embed_tokens
    with torch.no_grad():
        embed.modules_to_save["default"].weight.mul_(3.0)  # the trainable copy peft uses
    assert max_diff(logits(peft_model, x), start) > 1e-3


# ----------------------------------------------------------------------------- threads


@pytest.mark.parametrize(
    ("arch", "scheme", "params"),
    [
        ("gpt2", "rope", {}),
        ("opt", "rope", {}),
        ("bloom", "rope", {}),
        ("llama", "dynamic_ntk", DYNAMIC),
        ("gpt_neox", "alibi", {}),
    ],
    ids=["gpt2-rope", "opt-rope", "bloom-rope", "llama-dynamic", "neox-alibi"],
)
def test_threads_share_no_per_forward_state(arch, scheme, params):
    model = patched(arch, scheme, params)
    lengths = [16, 40, 70, 100, 130]
    inputs = [tokens(1 + i % 2, lengths[i % len(lengths)], seed=i) for i in range(20)]
    expected = [logits(model, x) for x in inputs]
    mismatches, errors = [], []

    def worker(offset: int) -> None:
        try:
            for i in range(20):
                k = (i + offset * 5) % 20
                if max_diff(logits(model, inputs[k]), expected[k]) > 1e-5:
                    mismatches.append(k)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and mismatches == []


# ----------------------------------------------------------------------------- dtype, device, shared config


@pytest.mark.parametrize(
    ("arch", "scheme", "params"),
    [("gpt2", "sinusoidal", {}), ("opt", "rope", {}), ("llama", "yarn", {"factor": 2.0})],
    ids=["gpt2-sinusoidal", "opt-rope", "llama-yarn"],
)
def test_unpatch_after_a_dtype_change_restores_modules_in_the_current_dtype(arch, scheme, params):
    reference = tiny_model(arch).to(torch.float64)
    model = patched(arch, scheme, params)
    model.to(torch.float64)
    hf_posenc.unpatch(model)
    x = tokens(2, 40)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert {b.dtype for b in model.buffers() if b.is_floating_point()} <= {torch.float64, torch.float32}
    assert max_diff(logits(model, x), logits(reference, x)) <= 1e-12


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_a_model_cast_to_bfloat16_before_patching_is_recognised(arch):
    """``model.to(torch.bfloat16)`` also rounds the rotary module's inv_freq buffer; the probe compares like
    with like and patches (it refused before), the patched model keeps the model's scheme, unpatch restores it."""
    model = tiny_model(arch).to(torch.bfloat16)
    x = tokens(2, 48)
    before = logits(model, x).float()
    hf_posenc.patch(model, "rope")  # the model's own scheme, recomputed by hf_posenc (fp32 frequencies)
    same = logits(model, x).float()
    assert max_diff(same, before) <= 0.05 * before.abs().max().item()
    hf_posenc.unpatch(model)
    assert torch.equal(logits(model, x).float(), before)
    hf_posenc.patch(model, "yarn", factor=2.0)
    assert max_diff(logits(model, x).float(), before) > 0


def test_a_patch_does_not_change_another_model_sharing_the_config():
    config = tiny_config("llama")
    torch.manual_seed(0)
    first = AutoModelForCausalLM.from_config(config).eval()
    second = AutoModelForCausalLM.from_config(config).eval()
    second.config = first.config  # as happens when models are built from one config object
    for module in second.modules():
        if "config" in module.__dict__:
            module.config = first.config
    x = tokens(1, 100)
    before = logits(second, x)
    hf_posenc.patch(first, "yarn", factor=4.0)
    assert first.config is not second.config
    assert "posenc" not in second.config.to_dict()
    assert second.config.rope_parameters.get("rope_type", "default") == "default"
    assert max_diff(logits(second, x), before) == 0
    hf_posenc.unpatch(first)
    assert first.config is second.config


# ----------------------------------------------------------------------------- handles and records


def test_a_stale_handle_cannot_undo_a_newer_patch():
    model = tiny_model("llama")
    old = hf_posenc.patch(model, "linear", factor=2.0)
    hf_posenc.unpatch(model)
    new = hf_posenc.patch(model, "yarn", factor=2.0)
    with pytest.raises(hf_posenc.NotPatchedError, match="no longer the model's patch"):
        old.unpatch()
    assert hf_posenc.get_handle(model) is new and new.active


def test_context_factor_below_one_is_refused():
    for scheme in ("linear", "yarn", "dynamic_ntk", "llama3"):
        with pytest.raises(hf_posenc.InvalidParameterError, match="factor must be >= 1"):
            hf_posenc.make_scheme(scheme, factor=0.5)
    with pytest.raises(hf_posenc.InvalidParameterError, match="factor must be >= 1"):
        hf_posenc.make_scheme("ntk", alpha=0.001)


def _edit_record(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["posenc"].update(changes)
    if changes.get("drop"):
        for key in changes["drop"]:
            config["posenc"].pop(key)
        config["posenc"].pop("drop")
    path.write_text(json.dumps(config))


def test_malformed_and_future_records_are_clear_errors(tmp_path):
    patched("llama", "yarn", {"factor": 2.0}).save_pretrained(tmp_path)
    _edit_record(tmp_path, drop=["spec"])
    with pytest.raises(hf_posenc.InvalidRecordError, match="lacks 'spec'"):
        hf_posenc.from_pretrained(str(tmp_path))
    patched("llama", "yarn", {"factor": 2.0}).save_pretrained(tmp_path)
    _edit_record(tmp_path, format=99, library_version="9.0.0")
    with pytest.raises(hf_posenc.InvalidRecordError, match=r"format 99.*Upgrade hf_posenc"):
        hf_posenc.from_pretrained(str(tmp_path))
    patched("llama", "yarn", {"factor": 2.0}).save_pretrained(tmp_path)
    _edit_record(tmp_path, architecture="gpt2")
    with pytest.raises(hf_posenc.InvalidRecordError, match="written for the gpt2 adapter"):
        hf_posenc.from_pretrained(str(tmp_path))


def test_a_record_carried_over_to_other_weights_is_refused(tmp_path):
    """A checkpoint loaded without hf_posenc keeps its record in the config; saved again after its
    patch-owned tensors changed, the record no longer describes the weights."""
    hf_posenc.patch(model := tiny_model("gpt2"), "learned", max_positions=128)  # native: plain load works
    model.save_pretrained(tmp_path / "patched")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "patched")
    with pytest.raises(hf_posenc.InvalidRecordError, match="loaded from a patched checkpoint without hf_posenc"):
        hf_posenc.patch(plain, "rope")
    with torch.no_grad():
        plain.transformer.wpe.weight.add_(1.0)
    plain.save_pretrained(tmp_path / "stale")
    with pytest.raises(hf_posenc.InvalidRecordError, match="record is stale"):
        hf_posenc.from_pretrained(str(tmp_path / "stale"))
    # trained and saved through hf_posenc, the fingerprint follows the weights
    reloaded = hf_posenc.from_pretrained(str(tmp_path / "patched"))
    with torch.no_grad():
        reloaded.transformer.wpe.weight.add_(1.0)
    reloaded.save_pretrained(tmp_path / "trained")
    again = hf_posenc.from_pretrained(str(tmp_path / "trained"))
    x = tokens(1, 100)
    assert max_diff(logits(again, x), logits(reloaded, x)) == 0


def test_owned_tensor_of_the_wrong_shape_is_a_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_posenc.patch(model := tiny_model("llama"), "learned", max_positions=128)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.hf_posenc_positions.weight"] = weights["model.hf_posenc_positions.weight"][:100]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(hf_posenc.InvalidRecordError, match=r"saved with shape \(100, 64\).*\(128, 64\)"):
        hf_posenc.from_pretrained(str(tmp_path))


def test_bad_local_paths_are_named(tmp_path):
    with pytest.raises(hf_posenc.CheckpointNotFoundError, match="No such folder"):
        hf_posenc.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(hf_posenc.CheckpointNotFoundError, match=r"has no config\.json"):
        hf_posenc.from_pretrained(str(tmp_path))


def test_saving_a_non_native_patch_warns_and_a_native_one_does_not(tmp_path):
    with pytest.warns(hf_posenc.PosencWarning, match="only with hf_posenc.from_pretrained"):
        patched("llama", "alibi", {}).save_pretrained(tmp_path / "alibi")
    with warnings.catch_warnings():
        warnings.simplefilter("error", hf_posenc.PosencWarning)
        patched("llama", "yarn", {"factor": 2.0}).save_pretrained(tmp_path / "yarn")
        patched("bloom", "alibi", {}).save_pretrained(tmp_path / "bloom")


def test_generate_after_deepcopy_with_exact_refresh():
    model = patched("llama", "dynamic_ntk", DYNAMIC)
    twin = copy.deepcopy(model)
    x = tokens(1, ORIGINAL_LENGTH - 4)
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        a = model.generate(x, **kwargs)
        b = twin.generate(x, **kwargs)
        c = twin.generate(x, use_cache=False, **kwargs)
    assert torch.equal(a, b) and torch.equal(b, c)
    assert isinstance(DynamicCache(), DynamicCache)


def test_bloom_assumed_context_is_stated_and_overridable():
    model = tiny_model("bloom")
    assert hf_posenc.patch(model, "yarn", factor=2.0).scheme.original_max_position_embeddings == 2048
    handle = hf_posenc.patch(model, "yarn", factor=2.0, original_max_position_embeddings=512, replace=True)
    assert handle.scheme.original_max_position_embeddings == 512
    assert model.config.posenc["spec"]["original_max_position_embeddings"] == 512


@pytest.mark.parametrize(
    ("arch", "scheme", "params"),
    [("gpt2", "rope", {}), ("bloom", "alibi", {}), ("llama", "dynamic_ntk", DYNAMIC)],
    ids=["gpt2-rope", "bloom-alibi", "llama-dynamic"],
)
def test_torch_compile_of_a_patched_model_equals_eager(arch, scheme, params):
    """The instance forwards and per-call state survive torch.compile (a bound lookup of the module's
    forward inside a wrapper once sent dynamo back into the wrapper)."""
    model = patched(arch, scheme, params)
    x = tokens(1, 90)
    compiled = torch.compile(model)
    assert max_diff(logits(compiled, x), logits(model, x)) <= 1e-5
