"""save_pretrained keeps the scheme; hf_posenc.from_pretrained re-applies it; native schemes load plainly."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import max_diff, tiny_model, tokens
from transformers import AutoModelForCausalLM

import hf_posenc

SCHEMES = [
    ("yarn", {"factor": 4.0}, True),
    ("linear", {"factor": 2.0}, True),
    ("ntk", {"alpha": 2.0}, True),
    ("dynamic_ntk", {"factor": 2.0}, True),
    ("llama3", {"factor": 4.0}, True),
    ("longrope", {"short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "factor": 2.0}, True),
    ("nope", {}, False),
    ("rope", {"partial_rotary_factor": 0.5}, False),
    ("dynamic_ntk", {"factor": 2.0, "bucket_ratio": 1.5}, False),
]


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize(("scheme", "params", "native"), SCHEMES, ids=[f"{s}-{n}" for s, _, n in SCHEMES])
def test_save_and_reload(tmp_path, scheme, params, native):
    model = tiny_model("qwen2")
    x = tokens(2, 150)
    base = logits(model, x)
    hf_posenc.patch(model, scheme, **params)
    expected = logits(model, x)
    if native:
        with warnings.catch_warnings():
            warnings.simplefilter("error", hf_posenc.PosencWarning)
            model.save_pretrained(tmp_path)
    else:  # saving says that plain transformers would load another model
        with pytest.warns(hf_posenc.PosencWarning, match="only with hf_posenc.from_pretrained"):
            model.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin")) and list(tmp_path.glob("*.safetensors"))
    record = json.loads((tmp_path / "config.json").read_text())["posenc"]
    assert record["spec"]["scheme"] == scheme
    assert scheme == "nope" or record["spec"]["rope_theta"] is not None  # stored resolved

    reloaded = hf_posenc.from_pretrained(str(tmp_path))
    assert reloaded.training is False
    assert hf_posenc.get_handle(reloaded).scheme == hf_posenc.get_handle(model).scheme
    assert max_diff(logits(reloaded, x), expected) <= 1e-6
    hf_posenc.unpatch(reloaded)
    assert max_diff(logits(reloaded, x), base) <= 1e-6  # unpatch gives the pre-patch model back

    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    if native:
        assert max_diff(logits(plain, x), expected) <= 1e-5
    else:  # not expressible natively: plain transformers sees the original model
        assert max_diff(logits(plain, x), base) <= 1e-6


def test_from_pretrained_requires_a_record_or_a_scheme(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(hf_posenc.NotPatchedError, match="no 'posenc' record"):
        hf_posenc.from_pretrained(str(tmp_path))
    model = hf_posenc.from_pretrained(str(tmp_path), scheme="yarn", scheme_params={"factor": 2.0})
    assert hf_posenc.get_handle(model).scheme.factor == 2.0


def test_spec_round_trips_through_dict():
    scheme = hf_posenc.make_scheme("longrope", short_factor=[1.0, 2.0], long_factor=[3.0, 4.0], factor=2.0)
    data = json.loads(json.dumps(scheme.to_dict()))
    assert data["version"] == hf_posenc.__version__
    assert hf_posenc.SchemeConfig.from_dict(data) == scheme


def test_from_pretrained_restores_or_overrides_the_backend(tmp_path):
    """BLOOM refuses sdpa at load time; the patch's backend choice is recorded and chosen again, and an
    explicit attn_implementation on load overrides it."""
    model = tiny_model("bloom")
    hf_posenc.patch(model, "alibi", attn_implementation="sdpa")
    model.save_pretrained(tmp_path)
    assert hf_posenc.from_pretrained(str(tmp_path)).config._attn_implementation == "hf_posenc_sdpa"
    eager = hf_posenc.from_pretrained(str(tmp_path), attn_implementation="eager")
    assert eager.config._attn_implementation == "hf_posenc_eager"
