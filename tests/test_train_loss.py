"""The recipe's memory options: the chunked loss and activation offload compute what the plain loss does."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import hf_posenc
from hf_posenc.errors import InvalidParameterError
from hf_posenc.families import tiny_rotary_config
from hf_posenc.tiny import tiny_model
from hf_posenc.train import TrainConfig, train
from hf_posenc.train.engine import activation_offload, batch_loss
from hf_posenc.train.loss import IGNORE_INDEX, LossHead, output_head, shifted_targets

L = 40


def _batch(vocab: int, *, seed: int = 0, pose: bool = False, ignore: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (2, L), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    if ignore:
        batch["labels"][:, :7] = IGNORE_INDEX
    if pose:
        positions = torch.arange(L).repeat(2, 1)
        positions[:, 15:] += 100
        batch["position_ids"] = positions
    return batch


def _lora(model):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, param in peft.named_parameters():
        if "embed" in name or "norm" in name:
            param.requires_grad_(True)
    return peft


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _loss_and_grads(model, batch, head: LossHead | None, offload: bool = False):
    model.zero_grad(set_to_none=True)
    cfg = TrainConfig(model="tiny:llama", offload_activations=offload)
    with activation_offload(cfg):
        loss = batch_loss(model, batch, head)
    loss.backward()
    return loss.detach(), _grads(model)


def _assert_same(a, b, tol=1e-5):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=tol, atol=tol)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("chunk", [1, 7, 16, 1024])
@pytest.mark.parametrize("case", ["plain", "pose", "ignored"])
def test_chunked_loss_and_gradients_equal_the_models_own(chunk, case):
    model = _lora(tiny_model("llama", seed=1))
    batch = _batch(97, pose=case == "pose", ignore=case == "ignored")
    plain = _loss_and_grads(model, batch, None)
    head = LossHead(model, "chunked", chunk)
    _assert_same(plain, _loss_and_grads(model, batch, head))
    assert any("embed" in n for n in plain[1]) and any("lora_" in n for n in plain[1])


@pytest.mark.parametrize("model_type", ["gpt2", "gemma2", "cohere", "granite"])
def test_chunked_loss_follows_the_familys_logit_transform(model_type):
    """Tied heads (GPT-2, Cohere) and logits the forward rescales or soft-caps after the head."""
    overrides = {
        "gemma2": {"final_logit_softcapping": 3.0},
        "cohere": {"logit_scale": 0.5},
        "granite": {"logits_scaling": 4.0},
    }.get(model_type, {})
    if model_type == "gpt2":
        model = tiny_model("gpt2", seed=2)
    else:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(2)
        config = tiny_rotary_config(model_type, **overrides)
        config.tie_word_embeddings = model_type == "cohere"
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    batch = _batch(model.config.vocab_size)
    plain = _loss_and_grads(model, batch, None)
    head = LossHead(model, "chunked", 9)
    _assert_same(plain, _loss_and_grads(model, batch, head))
    assert head.check(model, batch)[0] == pytest.approx(plain[0].item(), rel=1e-5)


def test_check_refuses_a_head_transform_it_does_not_reproduce(monkeypatch):
    from transformers import AutoModelForCausalLM

    import hf_posenc.train.loss as loss_module

    model = AutoModelForCausalLM.from_config(tiny_rotary_config("gemma2", final_logit_softcapping=1.0))
    monkeypatch.setattr(loss_module, "logit_transform", lambda config: lambda logits: logits)
    head = LossHead(model, "chunked")
    with pytest.raises(InvalidParameterError, match="loss: plain"):
        head.check(model, _batch(97))


def test_chunked_loss_under_a_position_patch_and_its_removal():
    model = _lora(tiny_model("llama", seed=3, attn="sdpa"))
    hf_posenc.patch(model.get_base_model(), "yarn", factor=4)
    batch = _batch(97, pose=True)
    plain = _loss_and_grads(model, batch, None)
    head = LossHead(model, "chunked", 8)
    _assert_same(plain, _loss_and_grads(model, batch, head))
    ids = batch["input_ids"][:1, :10]
    during = model(input_ids=ids).logits  # no loss pending: the ordinary head
    head.remove()
    assert "forward" not in output_head(model).__dict__
    torch.testing.assert_close(model(input_ids=ids).logits, during, rtol=0, atol=0)


def test_activation_offload_gives_equal_loss_and_gradients():
    model = _lora(tiny_model("llama", seed=4))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = _batch(97)
    plain = _loss_and_grads(model, batch, None)
    _assert_same(plain, _loss_and_grads(model, batch, None, offload=True), tol=0)
    _assert_same(plain, _loss_and_grads(model, batch, LossHead(model, "chunked", 16), offload=True))


def test_shifted_targets():
    labels = torch.tensor([[5, 6, 7]])
    assert shifted_targets(labels).tolist() == [[6, 7, IGNORE_INDEX]]


@pytest.mark.parametrize("kind", ["liger", "cce"])
def test_fused_kernels_say_what_they_need(kind):
    model = tiny_model("llama")
    with pytest.raises(InvalidParameterError, match=r"pip install|CUDA"):
        LossHead(model, kind)


def test_bad_loss_options_name_the_valid_ones():
    with pytest.raises(InvalidParameterError, match="plain, chunked, liger, cce"):
        TrainConfig(model="tiny:llama", loss="fused")
    with pytest.raises(InvalidParameterError, match="loss_chunk_size"):
        TrainConfig(model="tiny:llama", loss_chunk_size=0)
    with pytest.raises(InvalidParameterError, match="chunked, liger, cce"):
        LossHead(tiny_model("llama"), "plain")


def test_recipe_with_chunked_loss_and_offload_trains_like_the_plain_one(tmp_path):
    """The same LoRA + PoSE recipe, three steps: identical losses whichever way memory is spent, and the
    loss option may change when a run resumes."""
    common = dict(
        model="tiny:llama", scheme="yarn:factor=2", seq_len=32, pose_target_len=96, steps=3, lr=1e-2,
        trainable_embeddings=True, trainable_norms=True, gradient_checkpointing=True, eval_every=3,
        save_every=2, log_every=1, max_tokens=6000, data="kjv",
    )  # fmt: skip
    runs = {}
    for name, extra in {
        "plain": {},
        "kit": {"loss": "chunked", "loss_chunk_size": 8, "offload_activations": True},
    }.items():
        cfg = TrainConfig(output_dir=str(tmp_path / name), **common, **extra)
        result = train(cfg, progress=False)
        runs[name] = [json.loads(r) for r in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert result.eval_loss is not None
    for a, b in zip(runs["plain"], runs["kit"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert runs["plain"][-1]["eval_loss"] == pytest.approx(runs["kit"][-1]["eval_loss"], rel=1e-5)
    resumed = TrainConfig(output_dir=str(tmp_path / "plain"), **{**common, "steps": 4}, loss="chunked")
    assert train(resumed, progress=False).step == 4


def test_loss_head_through_deepcopy_is_independent():
    model = tiny_model("llama")
    head = LossHead(model, "chunked")
    twin = copy.deepcopy(model)
    head.remove()
    batch = _batch(97)
    torch.testing.assert_close(model(**batch).loss, twin(**batch).loss)


def test_loss_head_takes_shift_labels_of_a_sharded_sequence():
    """A shard's targets come pre-shifted (its last token's target lives on the next rank)."""
    from hf_posenc.train.parallel import ShardPlan, prepare_batch, shard_batch

    model = tiny_model("llama", seed=5)
    plan = ShardPlan("sp", 2, 0)
    batch = prepare_batch(_batch(97), plan)
    mine = shard_batch(batch, plan)
    head = LossHead(model, "chunked", 8)
    with torch.no_grad():
        ours = batch_loss(model, mine, head)
        head.remove()
        reference = model(**mine).loss  # transformers reads shift_labels too
    torch.testing.assert_close(ours, reference)
    assert mine["shift_labels"][0, -1] == batch["input_ids"][0, L // 2]  # the target across the cut


def test_sharded_groups_share_their_rows():
    from types import SimpleNamespace

    from hf_posenc.train.engine import data_parallel_place
    from hf_posenc.train.parallel import ShardPlan

    places = [
        data_parallel_place(SimpleNamespace(num_processes=8, process_index=r), ShardPlan("cp", 2, r % 2))
        for r in range(8)
    ]
    assert places == [(4, 0), (4, 0), (4, 1), (4, 1), (4, 2), (4, 2), (4, 3), (4, 3)]
    assert data_parallel_place(SimpleNamespace(num_processes=2, process_index=1), None) == (2, 1)
    with pytest.raises(InvalidParameterError, match="consecutive"):
        data_parallel_place(SimpleNamespace(num_processes=4, process_index=1), ShardPlan("cp", 2, 0))


@pytest.mark.parametrize("kind", ["liger", "cce"])
def test_fused_kernel_plumbing_with_a_reference_kernel(kind, monkeypatch):
    """The kernels need CUDA; here a reference kernel with each package's signature stands in, so the
    hook's plumbing (flattening, weight, bias, ignore index, mean) is checked on CPU."""
    import sys
    import types

    import torch.nn.functional as F

    import hf_posenc.train.loss as loss_module

    def reference(flat, weight, labels, bias=None, ignore_index=-100, **kw):
        logits = flat @ weight.T + (bias if bias is not None else 0)
        return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)

    liger = types.ModuleType("liger_kernel.transformers.functional")
    liger.liger_fused_linear_cross_entropy = lambda flat, weight, labels, bias, **kw: (
        reference(flat, weight, labels, bias, **kw),
        None,
    )
    cce = types.ModuleType("cut_cross_entropy")
    cce.linear_cross_entropy = lambda flat, weight, labels, bias=None, **kw: reference(flat, weight, labels, bias, **kw)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", liger)
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", cce)
    monkeypatch.setattr(loss_module, "require_kernel", lambda kind: None)
    model = _lora(tiny_model("llama", seed=6))
    batch = _batch(97, ignore=True)
    plain = _loss_and_grads(model, batch, None)
    _assert_same(plain, _loss_and_grads(model, batch, LossHead(model, kind)))
