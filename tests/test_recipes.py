"""Recipes: configs validate, runs learn, checkpoints are atomic and resume exactly, DDP matches one
process, and the final model reloads with its scheme."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import max_diff
from safetensors.torch import load_file

import hf_posenc
from hf_posenc.record import read_record
from hf_posenc.specs import parse_scheme_spec
from hf_posenc.train import load_config, train
from hf_posenc.train.data import batch_at, pose_position_ids

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "recipes" / "configs").rglob("*.yaml"))
TINY = [c for c in CONFIGS if c.name.startswith("tiny_")]
SCRIPT = ROOT / "recipes" / "finetune.py"
FAST = ["steps=12", "save_every=4", "eval_every=6", "log_every=1", "max_tokens=40000", "keep_last=5"]


def run_script(config: Path, out: Path, *extra: str, env: dict | None = None, launcher: list[str] | None = None):
    cmd = [*(launcher or [sys.executable]), str(SCRIPT), str(config), f"output_dir={out}", *FAST, *extra]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=600)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("path", CONFIGS, ids=[str(c.relative_to(ROOT / "recipes" / "configs")) for c in CONFIGS])
def test_every_recipe_validates_and_names_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and str(path.relative_to(ROOT)) in first
    cfg = load_config(path)
    assert cfg.output_dir.startswith("runs/")


def test_tiny_config_for_each_recipe():
    real = {c.name for c in CONFIGS if not c.name.startswith("tiny_")}
    assert {f"tiny_{name}" for name in real} <= {c.name for c in TINY}


def test_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    for path in (ROOT / "recipes" / "accelerate").glob("*.yaml"):
        assert load_config_from_file(str(path)).num_processes >= 2, path  # multi-GPU configs


def test_config_errors_and_overrides(tmp_path):
    with pytest.raises(hf_posenc.InvalidParameterError, match=r"Unknown recipe key 'stpes'.*Did you mean 'steps'"):
        load_config(None, ["stpes=3"])
    with pytest.raises(hf_posenc.InvalidParameterError, match="method must be one of full, lora"):
        load_config(None, ["method=qlora"])
    with pytest.raises(hf_posenc.InvalidParameterError, match="steps must be a positive int"):
        load_config(None, ["steps=0"])
    with pytest.raises(hf_posenc.InvalidParameterError, match="pose_target_len"):
        load_config(None, ["seq_len=128", "pose_target_len=64"])
    with pytest.raises(hf_posenc.UnknownSchemeError):
        load_config(None, ["scheme=yarm:factor=2"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny:llama\nlearning_rate: 0.1\n")
    with pytest.raises(hf_posenc.InvalidParameterError, match="unknown recipe key 'learning_rate'"):
        load_config(bad)
    cfg = load_config(TINY[0], ["weight_decay=1", "scheme=yarn:factor=4", "steps=7"])
    assert cfg.steps == 7 and cfg.scheme == "yarn:factor=4" and cfg.weight_decay == 1.0


def test_batches_are_a_pure_function_of_seed_and_index():
    blocks = torch.arange(40).view(10, 4)
    a, b = batch_at(blocks, 7, 3, seed=1), batch_at(blocks, 7, 3, seed=1)
    assert torch.equal(a["input_ids"], b["input_ids"])
    epoch = torch.cat([batch_at(blocks, i, 3, seed=1)["input_ids"] for i in range(3)])
    assert len(set(epoch[:, 0].tolist())) == 9  # no repeats within an epoch


def test_pose_positions_span_the_target():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        pos = pose_position_ids(64, 512, g)
        jumps = (pos[1:] - pos[:-1]) != 1
        assert pos[0] == 0 and pos.max() < 512 and jumps.sum() <= 1 and torch.all(pos[1:] > pos[:-1])


@pytest.mark.parametrize("path", TINY, ids=[c.name for c in TINY])
def test_tiny_recipes_learn_and_reload(tmp_path, path):
    overrides = ["steps=25", "eval_every=25", "log_every=1", "max_tokens=60000", f"output_dir={tmp_path}"]
    result = train(load_config(path, overrides), progress=False)
    losses = [m["loss"] for m in metrics(tmp_path)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05  # the training loss falls
    model = hf_posenc.from_pretrained(str(result.final_dir))
    cfg = load_config(path)
    name, params = parse_scheme_spec(cfg.scheme)
    assert hf_posenc.get_handle(model).scheme.name == hf_posenc.make_scheme(name, **params).name
    assert not any("lora" in k for k in model.state_dict())  # LoRA merged
    x = torch.randint(2, 97, (1, 2 * cfg.tiny_context))
    with torch.no_grad():
        again = hf_posenc.from_pretrained(str(result.final_dir))
        assert torch.equal(model(x).logits, again(x).logits)


CONFIG = ROOT / "recipes" / "configs" / "llama" / "tiny_yarn4_lora.yaml"


ADAPTER_CASES = [
    ("yarn:factor=4", "true"),  # embeddings and norms trained outside LoRA
    ("learned:max_positions=256:new_table=true", "false"),  # a frozen, randomly initialised patch table
]


@pytest.mark.parametrize(("scheme", "trainable_embeddings"), ADAPTER_CASES, ids=["yarn", "new-learned-table"])
def test_adapter_only_output_reloads_the_trained_model(tmp_path, scheme, trainable_embeddings):
    """save_merged=false keeps the adapter, the recipe, the tensors trained outside LoRA (embeddings,
    norms) and the patch's own (a new learned table); reloaded, it computes what the merged save does."""
    from hf_posenc.train import load_adapter_output

    common = ["steps=12", "eval_every=12", "save_every=12", "log_every=4", "max_tokens=40000", f"scheme={scheme}"]
    common.append(f"trainable_embeddings={trainable_embeddings}")
    runs = {}
    for merged in (True, False):
        out = tmp_path / f"merged-{merged}"
        cfg = load_config(CONFIG, [*common, f"output_dir={out}", f"save_merged={str(merged).lower()}"])
        runs[merged] = train(cfg, progress=False).final_dir
    assert not (runs[False] / "model.safetensors").exists() and (runs[False] / "adapter_model.safetensors").exists()
    saved = load_file(runs[False] / "hf_posenc_base_weights.safetensors")
    # the patch's own table is saved even when frozen (a real model's patch-time init is not reproducible)
    assert ("model.hf_posenc_positions.weight" in saved) == scheme.startswith("learned")
    assert ("model.embed_tokens.weight" in saved) == (trainable_embeddings == "true")
    adapter_model, _ = load_adapter_output(runs[False])
    merged_model = hf_posenc.from_pretrained(str(runs[True])).eval()
    x = torch.randint(2, 97, (2, 200))
    with torch.no_grad():
        assert max_diff(adapter_model(x).logits, merged_model(x).logits) <= 1e-4
        fresh, _ = load_adapter_output(runs[False])  # the patch's random init is overwritten by the saved table
        assert torch.equal(fresh(x).logits, adapter_model(x).logits)


def test_load_adapter_output_names_the_other_loader(tmp_path):
    from hf_posenc.train import load_adapter_output

    with pytest.raises(FileNotFoundError, match=r"hf_posenc\.from_pretrained"):
        load_adapter_output(tmp_path)


@pytest.mark.end_to_end
def test_sigkill_and_resume_equals_uninterrupted(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_script(CONFIG, straight).returncode == 0
    crash = run_script(CONFIG, killed, env={"HF_POSENC_FAULT": "kill-after-step:10"})
    assert crash.returncode == -signal.SIGKILL
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-0000004", "checkpoint-0000008"]
    resumed = run_script(CONFIG, killed)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout + resumed.stderr
    a, b = final_weights(straight), final_weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.end_to_end
def test_kill_during_save_leaves_no_corrupt_checkpoint(tmp_path):
    out = tmp_path / "run"
    crash = run_script(CONFIG, out, env={"HF_POSENC_FAULT": "kill-during-save"})
    assert crash.returncode == -signal.SIGKILL
    assert not list(out.glob("checkpoint-*")) and list(out.glob(".checkpoint-*.tmp"))
    assert run_script(CONFIG, out).returncode == 0  # starts over, cleans the partial save
    assert not list(out.glob(".checkpoint-*.tmp")) and (out / "final" / "model.safetensors").exists()


@pytest.mark.end_to_end
def test_two_process_ddp_matches_one_process(tmp_path):
    config = ROOT / "recipes" / "configs" / "llama" / "tiny_pi2_full.yaml"
    single = run_script(config, tmp_path / "one", "batch_size=4")
    assert single.returncode == 0, single.stderr[-2000:]
    # torchrun is what `accelerate launch` runs for several processes; on CPU accelerate uses gloo.
    # --standalone: a free rendezvous port, so a busy 29500 cannot fail the run
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    ddp = run_script(config, tmp_path / "two", "batch_size=2", launcher=launcher, env={"ACCELERATE_USE_CPU": "true"})
    first_traceback = ddp.stderr.find("Traceback")  # a worker's own error, not torchrun's summary of it
    assert ddp.returncode == 0, ddp.stderr[max(first_traceback, 0) :][:4000]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert {m["processes"] for m in two} == {2} and {m["processes"] for m in one} == {1}
    assert [m["step"] for m in one] == [m["step"] for m in two]
    assert [m["lr"] for m in one] == [m["lr"] for m in two]
    for a, b in zip(one, two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=2e-4)
    wa, wb = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-3


def heldout_loss(path_or_model, length: int, scheme: str | None = None) -> float:
    """Mean NLL on the KJV's last book (never trained on: the recipes hold out the tail)."""
    from hf_posenc.corpus import load_documents
    from hf_posenc.eval import evaluate_perplexity
    from hf_posenc.tiny import char_tokenizer

    model = path_or_model
    if isinstance(model, (str, Path)):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model)).eval()
    ids = char_tokenizer()(load_documents("kjv")[-1])["input_ids"]
    if scheme is None:
        return evaluate_perplexity(model, ids, length, max_windows=8, batch_size=8).nll
    name, params = parse_scheme_spec(scheme)
    with hf_posenc.patched(model, name, **params):
        return evaluate_perplexity(model, ids, length, max_windows=8, batch_size=8).nll


def pretrain(model: str, out: Path, steps: int = 150) -> Path:
    cfg = load_config(
        None,
        [
            f"model={model}",
            "method=full",
            "seq_len=64",
            f"steps={steps}",
            "batch_size=8",
            "lr=0.003",
            "max_tokens=300000",
            "eval_every=1000",
            "save_every=1000",
            f"output_dir={out}",
        ],
    )
    return train(cfg, progress=False).final_dir


@pytest.mark.end_to_end
def test_recipes_show_their_point(tmp_path):
    """GPT-2 learned -> RoPE: after the swap, fine-tuning at twice the old table's length brings the loss
    below the zero-shot swap and runs past the table as well as the original ran inside it. LLaMA +
    YaRN x4: the loss at 4x the trained length falls with a short LoRA fine-tune at that length.
    (A tiny model leans little on positions, so the swap itself costs little here.)"""
    gpt2 = pretrain("tiny:gpt2", tmp_path / "gpt2")
    before, swapped = heldout_loss(gpt2, 64), heldout_loss(gpt2, 64, "rope")
    tuned = train(
        load_config(
            ROOT / "recipes/configs/gpt2/tiny_learned_to_rope_full.yaml",
            [f"model={gpt2}", "steps=80", "batch_size=8", "max_tokens=300000", f"output_dir={tmp_path / 'gpt2-rope'}"],
        ),
        progress=False,
    )
    retrofit = hf_posenc.from_pretrained(str(tuned.final_dir)).eval()
    assert heldout_loss(retrofit, 64) < swapped - 0.02
    assert heldout_loss(retrofit, 128) < before + 0.02

    llama = pretrain("tiny:llama", tmp_path / "llama")
    zero_shot = heldout_loss(llama, 256, "yarn:factor=4")
    tuned = train(
        load_config(
            ROOT / "recipes/configs/llama/tiny_yarn4_lora.yaml",
            [
                f"model={llama}",
                "steps=40",
                "batch_size=4",
                "max_tokens=300000",
                f"output_dir={tmp_path / 'llama-yarn'}",
            ],
        ),
        progress=False,
    )
    after = heldout_loss(hf_posenc.from_pretrained(str(tuned.final_dir)).eval(), 256)
    assert after < zero_shot - 0.03


def test_gradient_checkpointing_changes_nothing_but_memory(tmp_path):
    runs = {}
    for gc in ("false", "true"):
        cfg = load_config(
            TINY[0],
            [
                "steps=3",
                "log_every=1",
                "max_tokens=30000",
                f"gradient_checkpointing={gc}",
                f"output_dir={tmp_path / gc}",
            ],
        )
        train(cfg, progress=False)
        runs[gc] = [m["loss"] for m in metrics(tmp_path / gc)]
        saved = json.loads((tmp_path / gc / "final" / "config.json").read_text())
        assert saved.get("use_cache", True) is True  # the saved model's forward() returns a KV cache by default
    assert runs["true"] == pytest.approx(runs["false"], abs=1e-5)


def test_gradient_accumulation_equals_a_larger_batch(tmp_path):
    runs = {}
    for name, extra in {"big": ["batch_size=4"], "accum": ["batch_size=2", "grad_accum=2"]}.items():
        cfg = load_config(
            ROOT / "recipes/configs/llama/tiny_pi2_full.yaml",
            ["steps=3", "log_every=1", "max_tokens=30000", *extra, f"output_dir={tmp_path / name}"],
        )
        train(cfg, progress=False)
        runs[name] = [m["loss"] for m in metrics(tmp_path / name)]
    assert runs["accum"][0] == pytest.approx(runs["big"][0], abs=1e-5)  # same data, same first step
    assert runs["accum"] == pytest.approx(runs["big"], abs=1e-3)


def test_parallel_tokenization_packs_the_same_blocks(monkeypatch):
    from hf_posenc.eval.data import load_texts
    from hf_posenc.tiny import char_tokenizer
    from hf_posenc.train import data

    texts = load_texts("kjv")[:6]

    def pack(*args, **kwargs):
        data._LAST_STREAM.clear()  # tokenized anew, not cut from the stream kept by the call before
        return data.pack_blocks(char_tokenizer(), texts, *args, **kwargs)

    one = pack(128)
    assert torch.equal(one, pack(128, num_proc=2)) and (one == 1).sum() >= 5  # EOS (id 1) between documents
    monkeypatch.setattr(data, "TOKENIZE_BATCH", 1)  # a document at a time: a cap inside the first stops there
    for cap in (1000, 128 * 2000 + 7):  # the first blocks of the whole text, the cap inside the first or a later book
        capped = pack(128, max_tokens=cap)
        assert torch.equal(capped, one[: cap // 128]) and torch.equal(pack(128, num_proc=2, max_tokens=cap), capped)


def test_the_last_token_stream_is_cut_again_not_tokenized_again(monkeypatch):
    """A sweep's runs on one text tokenize it once; another tokenizer, text or cap tokenizes anew, and the
    blocks handed out are copies (changing them leaves the kept stream as it was)."""
    from hf_posenc.eval.data import load_texts
    from hf_posenc.tiny import char_tokenizer
    from hf_posenc.train import data

    texts = load_texts("kjv")[:2]
    tokenizer = char_tokenizer()
    calls = []
    real = type(tokenizer).__call__
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    data._LAST_STREAM.clear()
    first = data.pack_blocks(tokenizer, texts, 128)
    first[0].zero_()
    assert len(calls) == 1
    again = data.pack_blocks(tokenizer, texts, 64)  # another block size: the same stream, cut again
    assert len(calls) == 1 and torch.equal(again.flatten()[:128], data.pack_blocks(tokenizer, texts, 128)[0])
    assert not torch.equal(again[:2].flatten(), first[0])  # the zeroed copy did not reach the kept stream
    for other in ((tokenizer, texts[:1], None), (tokenizer, texts, 5000), (char_tokenizer(), texts, None)):
        if other[2] is None and other[0] is not tokenizer:  # the same definition: the same stream, rightly reused
            other[0].add_tokens(["<newly added>"])
        before = len(calls)
        data.pack_blocks(other[0], other[1], 128, max_tokens=other[2])
        assert len(calls) == before + 1, other[1:]


def first_batch_loss(model, cfg) -> float:
    """The loss at step 1 as the engine logs it: the starting model on the run's first batch."""
    from hf_posenc.tiny import char_tokenizer
    from hf_posenc.train.data import train_val_blocks

    blocks, _ = train_val_blocks(
        char_tokenizer(), cfg.data, cfg.seq_len, cfg.seq_len, cfg.val_fraction, max_tokens=cfg.max_tokens
    )
    batch = batch_at(blocks, 0, cfg.batch_size, seed=cfg.seed)
    with torch.no_grad():
        return model.eval()(**batch, use_cache=False).loss.item()


SAVED_PATCHES = [
    # LoRA wraps the pre-patched model (YaRN rescales the rotary frequencies: no q/k hooks involved)
    ("llama/tiny_yarn4_lora.yaml", "tiny:llama", "yarn:factor=4"),
    # LoRA over a patch that owns a tensor plain transformers would drop (a new learned table)
    ("llama/tiny_yarn4_lora.yaml", "tiny:llama", "learned:max_positions=256:new_table=true"),
    # full fine-tuning of a learned -> RoPE retrofit (owned tensors: the zeroed wpe)
    ("gpt2/tiny_learned_to_rope_full.yaml", "tiny:gpt2", "rope"),
]


@pytest.mark.parametrize(
    ("recipe", "family", "scheme"), SAVED_PATCHES, ids=["llama-yarn-lora", "llama-new-table-lora", "gpt2-rope-full"]
)
def test_a_saved_patched_model_trains_as_saved(tmp_path, recipe, family, scheme):
    """model=FOLDER with a posenc record: loaded through hf_posenc.from_pretrained (patched), trained
    with scheme: none, and the output still carries the saved patch. A recipe scheme is refused."""
    from hf_posenc.tiny import char_tokenizer, tiny_model

    saved = tmp_path / "saved"
    family = family.split(":")[1]
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0} if family == "gpt2" else {}
    model = tiny_model(family, attn="sdpa", **no_dropout)  # so the logged train-mode loss is deterministic
    name, params = parse_scheme_spec(scheme)
    hf_posenc.patch(model, name, **params)
    model.save_pretrained(saved)
    char_tokenizer().save_pretrained(saved)
    label = read_record(model.config).label

    path = ROOT / "recipes" / "configs" / recipe
    out = tmp_path / "run"
    with pytest.raises(hf_posenc.InvalidParameterError, match=rf"already carries {re.escape(label)}.*scheme: none"):
        train(load_config(path, [f"model={saved}", f"output_dir={out}"]), progress=False)
    assert not out.exists()  # refused before anything was written

    common = ["steps=2", "warmup_steps=0", "log_every=1", "eval_every=2", "max_tokens=20000", "seq_len=128"]
    cfg = load_config(path, [f"model={saved}", "scheme=none", f"output_dir={out}", *common])
    result = train(cfg, progress=False)
    # the run started from the patched model: its first logged loss is the saved patched model's
    start = first_batch_loss(hf_posenc.from_pretrained(str(saved)), cfg)
    assert metrics(out)[0]["loss"] == pytest.approx(start, abs=1e-5)
    trained = hf_posenc.from_pretrained(str(result.final_dir))
    assert hf_posenc.get_handle(trained).scheme.name == hf_posenc.make_scheme(name, **params).name
    assert read_record(trained.config).label == label
    assert not any("lora" in k for k in trained.state_dict())


RESUME_FAST = ["log_every=1", "eval_every=100", "max_tokens=20000", "seq_len=64"]
PI2 = ROOT / "recipes" / "configs" / "llama" / "tiny_pi2_full.yaml"


def test_resume_refuses_a_different_recipe_and_keeps_its_config(tmp_path):
    out = tmp_path / "run"
    train(load_config(PI2, ["steps=4", "save_every=2", f"output_dir={out}", *RESUME_FAST]), progress=False)
    stored = (out / "config.yaml").read_text()
    assert load_config(out / "config.yaml").steps == 4  # config.yaml is a recipe that reruns the run

    with pytest.raises(hf_posenc.InvalidParameterError) as err:
        cfg = load_config(PI2, ["steps=4", "lr=0.001", "seed=3", f"output_dir={out}", *RESUME_FAST, "save_every=2"])
        train(cfg, progress=False)
    message = str(err.value)
    assert "lr: 0.003 -> 0.001" in message and "seed: 0 -> 3" in message and "new output_dir" in message
    assert "checkpoint-0000002" in message
    assert (out / "config.yaml").read_text() == stored  # untouched

    with pytest.raises(hf_posenc.InvalidParameterError, match=r"steps \(1\) is below the resumed step 2"):
        train(load_config(PI2, ["steps=1", "save_every=2", f"output_dir={out}", *RESUME_FAST]), progress=False)
    assert (out / "config.yaml").read_text() == stored


def test_a_compatible_resume_says_what_it_resumed_and_what_changed(tmp_path, capsys):
    out = tmp_path / "run"
    train(load_config(PI2, ["steps=4", "save_every=2", f"output_dir={out}", *RESUME_FAST]), progress=False)
    capsys.readouterr()
    extended = load_config(PI2, ["steps=6", "save_every=3", f"output_dir={out}", *RESUME_FAST])
    result = train(extended, progress=False)
    printed = capsys.readouterr()
    printed = printed.out + printed.err
    assert re.search(r"resumed from \S*checkpoint-0000002 at step 2", printed), printed
    assert "steps: 4 -> 6" in printed and "save_every: 2 -> 3" in printed
    assert result.step == 6 and load_config(out / "config.yaml") == extended  # replaced: the new recipe
    steps = [m["step"] for m in metrics(out)]
    assert steps == [1, 2, 3, 4, 5, 6]  # rows past the resumed step are not duplicated
    assert metrics(out)[-1]["lr"] == 0.0  # the cosine schedule follows the new total


def test_a_finished_run_without_checkpoints_is_not_overwritten_by_another_recipe(tmp_path):
    out = tmp_path / "run"
    train(load_config(PI2, ["steps=2", "save_every=10", f"output_dir={out}", *RESUME_FAST]), progress=False)
    stored = (out / "config.yaml").read_text()
    with pytest.raises(hf_posenc.InvalidParameterError, match=r"batch_size: 4 -> 2"):
        train(load_config(PI2, ["steps=2", "batch_size=2", f"output_dir={out}", *RESUME_FAST]), progress=False)
    assert (out / "config.yaml").read_text() == stored
    shutil.rmtree(out / "final")  # a run that left nothing to keep (no checkpoint, no final/) starts over
    train(load_config(PI2, ["steps=2", "batch_size=2", f"output_dir={out}", *RESUME_FAST]), progress=False)
    assert load_config(out / "config.yaml").batch_size == 2 and [m["step"] for m in metrics(out)] == [1, 2]


def test_s2_attn_recipe_trains_grouped_and_saves_full_attention(tmp_path):
    """attention: s2_attn trains with LongLoRA's shifted groups (the losses differ from full attention's)
    and saves a model that attends fully: no hf_posenc attention backend or term is left in it."""
    config = ROOT / "recipes" / "configs" / "llama" / "tiny_pi2_full.yaml"
    runs = {}
    for attention in ("full", "s2_attn"):
        out = tmp_path / attention
        cfg = load_config(
            config, ["steps=3", "log_every=1", "max_tokens=30000", f"attention={attention}", f"output_dir={out}"]
        )
        result = train(cfg, progress=False)
        runs[attention] = [m["loss"] for m in metrics(out)]
        model = hf_posenc.from_pretrained(result.final_dir)
        assert not model.config._attn_implementation.startswith("hf_posenc_")
        assert not any("attention_term" in name for name, _ in model.named_modules())
    assert all(map(torch.isfinite, torch.tensor(runs["s2_attn"])))
    assert runs["full"] != pytest.approx(runs["s2_attn"], abs=1e-6)  # grouped attention trained


def test_s2_attn_recipe_checks_its_group():
    config = ROOT / "recipes" / "configs" / "llama" / "tiny_pi2_full.yaml"
    with pytest.raises(hf_posenc.InvalidParameterError, match="dividing the sequence length"):
        load_config(config, ["attention=s2_attn", "s2_group_fraction=0.3"])
    with pytest.raises(hf_posenc.InvalidParameterError, match="attention must be one of"):
        load_config(config, ["attention=sparse"])
