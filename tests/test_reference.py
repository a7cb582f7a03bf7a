"""Patched models against the same weights configured natively in transformers (fp32, <= 1e-5)."""

from __future__ import annotations

import pytest
import torch
from conftest import LLAMA_FAMILY, ORIGINAL_LENGTH, max_diff, native_twin, tiny_model, tokens

import hf_posenc

HALF = 16 // 2  # head_dim 16 -> 8 channel pairs
NATIVE_SCHEMES = [
    ("rope", {"rope_theta": 500.0}),
    ("linear", {"factor": 2.0}),
    ("ntk", {"alpha": 3.0}),
    ("dynamic_ntk", {"factor": 2.0}),
    ("yarn", {"factor": 4.0}),
    ("yarn", {"factor": 2.0, "beta_fast": 8.0, "beta_slow": 2.0, "attention_factor": 1.2}),
    (
        "longrope",
        {
            "short_factor": [1.0 + 0.1 * i for i in range(HALF)],
            "long_factor": [1.0 + 2.0 * i for i in range(HALF)],
            "factor": 4.0,
        },
    ),
    ("llama3", {"factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
]


@pytest.mark.parametrize("model_type", [*LLAMA_FAMILY, "gpt_neox"])
@pytest.mark.parametrize(("scheme", "params"), NATIVE_SCHEMES, ids=lambda v: v if isinstance(v, str) else "")
def test_same_logits_as_native(model_type, scheme, params):
    model = tiny_model(model_type)
    if scheme == "longrope":  # one factor per rotated channel pair (GPT-NeoX rotates a prefix only)
        info = hf_posenc.patches.get_adapter(model).model_info(model)
        pairs = int(info.head_dim * info.partial_rotary_factor) // 2
        params = {
            **params,
            "short_factor": params["short_factor"][:pairs],
            "long_factor": params["long_factor"][:pairs],
        }
    hf_posenc.patch(model, scheme, **params)
    for length in (ORIGINAL_LENGTH - 16, 3 * ORIGINAL_LENGTH):  # below and above the original context
        x = tokens(2, length)
        twin = native_twin(model, model.config)  # fresh: native dynamic rope is stateful
        with torch.no_grad():
            assert max_diff(model(x).logits, twin(x).logits) <= 1e-5, (scheme, length)
