"""``hf-posenc plan``: its estimate holds against a measured step, and its advice follows the options."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hf_posenc.cli import main
from hf_posenc.errors import InvalidParameterError
from hf_posenc.plan import GIB, MARGIN, PlanOptions, estimate, fitting_options, load_shape

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory) -> Path:
    """A LLaMA-shaped model with a real-sized vocabulary (the logits are what the loss options change)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=True,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("small_llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.end_to_end
def test_estimate_holds_against_a_measured_step(small_llama, tmp_path):
    """benchmarks/train_memory.py measures one LoRA step (plain and chunked loss) in fresh processes."""
    command = [sys.executable, str(ROOT / "benchmarks" / "train_memory.py"), "--model", str(small_llama)]
    command += ["--seq-len", "2048", "--chunk", "256", "--threads", "2", "--out", str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "train_memory.json").read_text())
    for loss, run in results["runs"].items():
        predicted = results["planned_gib"][loss]
        assert abs(predicted / run["step_peak_gib"] - 1) <= MARGIN, (loss, predicted, run["step_peak_gib"])
    assert results["memory_ratio"] < 0.6  # the chunked loss's saving shows at this size too
    assert results["grad_max_rel_diff"] < 1e-4
    assert results["runs"]["plain"]["value"] == pytest.approx(results["runs"]["chunked"]["value"], rel=1e-5)


def test_shape_counts_parameters_exactly(small_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(small_llama)
    shape = load_shape(str(small_llama))
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.embedding_params == model.get_input_embeddings().weight.numel()  # tied: counted once
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(r=3, target_modules="all-linear"))
    assert 3 * shape.lora_params_per_rank == sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)


def test_each_option_moves_the_part_it_should():
    shape = load_shape("llama3-1b")
    base = PlanOptions(seq_len=65536, lora=True)
    plain = estimate(shape, base)
    chunked = estimate(shape, PlanOptions(seq_len=65536, lora=True, loss="chunked"))
    assert chunked.parts["logits"] * 60 < plain.parts["logits"]
    assert {k: v for k, v in chunked.parts.items() if k != "logits"} == {
        k: v for k, v in plain.parts.items() if k != "logits"
    }
    offload = estimate(shape, PlanOptions(seq_len=65536, lora=True, offload=True))
    assert offload.parts["layer inputs"] == 0 and offload.host == plain.parts["layer inputs"] > 0
    no_ckpt = estimate(shape, PlanOptions(seq_len=65536, lora=True, checkpointing=False))
    assert no_ckpt.parts["layer activations"] > 8 * plain.parts["layer activations"]
    cp = estimate(shape, PlanOptions(seq_len=65536, lora=True, gpus=4, parallel="cp"))
    assert cp.parts["layer activations"] * 4 == plain.parts["layer activations"]
    assert cp.parts["weights"] * 4 == plain.parts["weights"]  # sharded (FSDP)
    full = estimate(shape, PlanOptions(seq_len=65536, lora=False))
    assert full.parts["optimizer"] == 2 * shape.params * 4


def test_advice_is_the_cheapest_combination_that_fits():
    shape = load_shape("llama3-1b")
    base = PlanOptions(seq_len=262144, lora=True)
    fits = fitting_options(shape, base, 139 * GIB)
    assert fits and fits[0].options.loss == "chunked" and fits[0].total_bytes <= 139 * GIB
    assert estimate(shape, base).total_bytes > 139 * GIB  # the plain recipe does not fit
    assert fitting_options(shape, PlanOptions(seq_len=2**22, lora=True), 80 * GIB) == []


def test_cli_plan_prints_the_table_and_the_advice(capsys):
    assert main(["plan", "llama3-8b", "--seq-len", "131072", "--lora", "--gpus", "8", "--parallel", "cp"]) == 0
    out = capsys.readouterr().out
    assert "| logits |" in out and "cp x8" in out and "fits in 80 GiB" in out
    assert main(["plan", "llama3-1b", "--seq-len", "4096", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"parallel": "ulysses"}, "none, cp, sp"),
        ({"loss": "liger"}, "plain, chunked, fused"),
        ({"seq_len": 0}, "seq_len must be a positive int"),
        ({"gpus": 3, "parallel": "cp", "seq_len": 1000}, "multiple of gpus"),
        ({"weight_bytes": 3}, "2 \\(bf16/fp16\\) or 4"),
    ],
)
def test_bad_options_are_named(kwargs, message):
    with pytest.raises(InvalidParameterError, match=message):
        PlanOptions(**{"seq_len": 1024, **kwargs})


def test_unknown_model_says_what_is_accepted(tmp_path):
    with pytest.raises(InvalidParameterError, match="preset"):
        load_shape(str(tmp_path / "nothing-here"))
