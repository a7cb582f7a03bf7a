"""The fine-tuning loop: accelerate for devices, precision and DDP/FSDP/DeepSpeed; peft for LoRA;
atomic, resumable checkpoints; JSON-lines logs. One script for one CPU, one GPU or many."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from .._compat import enable_activation_checkpointing
from ..errors import InvalidParameterError
from ..specs import parse_scheme_spec
from .config import RESUMABLE_KEYS, TrainConfig, load_config, recipe_differences
from .data import batch_at, train_val_blocks
from .loss import LossHead
from .parallel import (
    ShardPlan,
    check_accelerator,
    cp_buffers,
    loss_scale,
    plan_from_accelerator,
    prepare_batch,
    shard_batch,
    sharded_step,
)

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
#: in output_dir: the run's recipe (YAML; ``hf-posenc finetune <output_dir>/config.yaml`` reruns it) and its log
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
#: in an adapter-only final folder: the recipe, and base-model tensors the adapter does not hold
RECIPE_FILE = "hf_posenc_recipe.json"
BASE_WEIGHTS_FILE = "hf_posenc_base_weights.safetensors"
# Fault injection for the resume tests: "kill-during-save" SIGKILLs the process after a checkpoint is
# written but before its rename; "kill-after-step:N" SIGKILLs it right after optimizer step N.
FAULT_ENV = "HF_POSENC_FAULT"
EMBEDDING_NAMES = (
    "embed_tokens",
    "wte",
    "wpe",
    "word_embeddings",
    "embed_in",
    "embed_positions",
    "hf_posenc_positions",
)
NORM_NAMES = ("norm", "ln_", "layernorm", "layer_norm")


@dataclass
class TrainResult:
    step: int
    final_dir: Path | None
    train_loss: float
    eval_loss: float | None


def model_source(cfg: TrainConfig):
    """``(path, record)``: the folder or hub id ``cfg.model`` names (None for ``tiny:``) and the hf_posenc
    patch record its config holds (None if it holds none). A recipe ``scheme`` on a model that records a
    patch is refused: re-patching would discard the tensors the saved patch owns."""
    from ..record import read_record
    from ..tiny import TINY_PREFIX

    if cfg.model.startswith(TINY_PREFIX):
        return None, None
    if cfg.model == "smollm2":  # the packaged model: never patched
        from ..real_model import smollm2_path

        return str(smollm2_path()), None
    from transformers import AutoConfig

    record = read_record(AutoConfig.from_pretrained(cfg.model), source=cfg.model)
    if record is not None and parse_scheme_spec(cfg.scheme) is not None:
        owned = list(record.owned_keys)
        lost = f" and discard the tensors it owns ({', '.join(owned[:3])}{', ...' if len(owned) > 3 else ''})"
        raise InvalidParameterError(
            f"{cfg.model} already carries {record.label} (a patch saved by hf_posenc); scheme: {cfg.scheme} would "
            f"replace that patch{lost if owned else ''}. Set scheme: none to continue training it as saved, or "
            "start from the unpatched model to give it another scheme."
        )
    return cfg.model, record


def load_model_and_tokenizer(cfg: TrainConfig):
    """The recipe's model in float32 and its tokenizer. A folder whose config records an hf_posenc patch
    (saved by ``hf-posenc patch`` or by an earlier recipe) loads through ``hf_posenc.from_pretrained``, so
    it arrives patched, its own tensors included."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_posenc

    from ..tiny import TINY_PREFIX, char_tokenizer, tiny_model

    if cfg.model.startswith(TINY_PREFIX):
        family = cfg.model[len(TINY_PREFIX) :]
        attn = "eager" if family == "bloom" else "sdpa"  # BLOOM has no sdpa of its own (a patch adds it)
        model = tiny_model(
            family, seed=cfg.seed, attn=attn, context=cfg.tiny_context, width=cfg.tiny_width, layers=cfg.tiny_layers
        )
        return model, char_tokenizer()
    path, record = model_source(cfg)
    if record is not None:
        backend = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
        model = hf_posenc.from_pretrained(path, dtype=torch.float32, **backend)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path)


def prepare_model(cfg: TrainConfig, model):
    """LoRA (peft) first, then the position patch: hooks hf_posenc installs on q/k projections then sit
    on the LoRA-wrapped modules, so the low-rank update is rotated too. A model that arrives patched (a
    folder recording a patch; ``scheme`` is then none) is wrapped by LoRA as it is."""
    import hf_posenc

    if cfg.gradient_checkpointing:
        # training forwards pass use_cache=False themselves; the config keeps use_cache as the model had it,
        # so the saved model's forward() still returns a KV cache by default
        enable_activation_checkpointing(model)
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        for name, param in model.named_parameters():
            lowered = name.lower()
            if (cfg.trainable_embeddings and any(k in lowered for k in EMBEDDING_NAMES)) or (
                cfg.trainable_norms and any(k in lowered for k in NORM_NAMES)
            ):
                param.requires_grad_(True)
    parsed = parse_scheme_spec(cfg.scheme)
    if parsed is not None:
        target = model.get_base_model() if cfg.method == "lora" else model
        hf_posenc.patch(target, parsed[0], attn_implementation=cfg.attn_implementation, **parsed[1])
    return model


def latest_checkpoint(output_dir: Path) -> Path | None:
    done = [p for p in output_dir.glob("checkpoint-*") if CHECKPOINT.match(p.name) and (p / STATE_FILE).exists()]
    return max(done, key=lambda p: int(CHECKPOINT.match(p.name).group(1)), default=None)


def write_atomic(path: Path, text: str) -> None:
    """Write a hidden temp file, fsync, rename: readers see the old content or the new, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _shown(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def check_rerun(output_dir: Path, cfg: TrainConfig, resume: Path | None, resume_step: int) -> dict:
    """Compare ``cfg`` with the recipe stored in ``output_dir`` by an earlier run. Where that run left
    something to keep (a checkpoint to resume from, or ``final/``), only :data:`RESUMABLE_KEYS` may
    differ: any other difference is an :class:`InvalidParameterError` listing each key as old -> new.
    Returns the differences (allowed ones), ``{key: (old, new)}``."""
    stored_path = output_dir / CONFIG_FILE
    kept = resume is not None or (output_dir / "final").is_dir()
    if not stored_path.exists() or not kept:
        return {}  # a new run, or one that left nothing but its recipe and log: it starts over
    where = (
        f"{output_dir} holds a run checkpointed at step {resume_step} ({resume.name})"
        if resume is not None
        else f"{output_dir} holds a finished run (final/, no checkpoint)"
    )
    try:
        stored = yaml.safe_load(stored_path.read_text())
    except yaml.YAMLError:
        stored = None
    if not isinstance(stored, dict):
        raise InvalidParameterError(
            f"{where}, but its {CONFIG_FILE} is not a readable recipe, so this recipe cannot be checked "
            "against it. Use a new output_dir."
        )
    changes = recipe_differences(stored, cfg)
    fixed = {key: change for key, change in changes.items() if key not in RESUMABLE_KEYS}
    if fixed:
        lines = "".join(f"\n  {key}: {_shown(old)} -> {_shown(new)}" for key, (old, new) in fixed.items())
        raise InvalidParameterError(
            f"{where} with a different recipe ({stored_path}):{lines}\nOnly {', '.join(RESUMABLE_KEYS)} may "
            f"change when a run resumes. Use a new output_dir for this recipe, or run {stored_path} (the stored "
            "recipe) to go on with the run as it was."
        )
    if resume is not None and cfg.steps < resume_step:
        raise InvalidParameterError(
            f"steps ({cfg.steps}) is below the resumed step {resume_step}: {where}. Set steps >= {resume_step}, "
            "or use a new output_dir."
        )
    return changes


def trim_metrics(path: Path, step: int) -> None:
    """Keep the log rows up to ``step`` (the resumed one; 0 when starting over): a run killed after its
    last checkpoint logged steps that the resumed run logs again."""
    if not path.exists():
        return
    if step == 0:
        path.unlink()
        return
    rows = path.read_text().splitlines()
    kept = []
    for row in rows:
        try:
            if json.loads(row)["step"] <= step:
                kept.append(row)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the kill
    if len(kept) != len(rows):
        write_atomic(path, "".join(f"{row}\n" for row in kept))


def save_checkpoint(accelerator, output_dir: Path, step: int, state: dict, keep_last: int) -> Path:
    """Write to a hidden temp folder, then rename: a crash mid-save never leaves a half checkpoint."""
    final = output_dir / f"checkpoint-{step:07d}"
    tmp = output_dir / f".checkpoint-{step:07d}.tmp"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        # every rank writes its RNG state into it; accelerate creates it on the main process only,
        # with no barrier, so it must exist before the other ranks start writing
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()  # every rank's files are in before the folder is renamed
    if accelerator.is_main_process:
        with open(tmp / STATE_FILE, "w") as fh:
            json.dump(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if os.environ.get(FAULT_ENV) == "kill-during-save":
            os.kill(os.getpid(), signal.SIGKILL)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        done = sorted(output_dir.glob("checkpoint-*"), key=lambda p: p.name)
        for old in done[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def batch_loss(model, batch: dict[str, torch.Tensor], loss_head: LossHead | None) -> torch.Tensor:
    """The mean next-token loss of ``batch``: the model's own, or through the recipe's :class:`LossHead`."""
    if loss_head is None:
        return model(**batch, use_cache=False).loss
    return loss_head.loss(model, batch, use_cache=False)


def data_parallel_place(accelerator, shard: ShardPlan | None) -> tuple[int, int]:
    """``(data-parallel size, this rank's place)``: which rows of the global batch this process trains.
    Under cp / sp the ranks of one group (consecutive ranks, as accelerate and DeepSpeed form them) share
    their rows and split the sequence."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if shard is None:
        return world, rank
    if rank % shard.size != shard.rank:
        raise InvalidParameterError(
            f"Process {rank} is rank {shard.rank} of its {shard.mode} group of {shard.size}, not {rank % shard.size}: "
            "hf_posenc expects each group to be consecutive processes (accelerate's and DeepSpeed's default)."
        )
    return world // shard.size, rank // shard.size


def sharded_micro_step(accelerator, model, batch, shard: ShardPlan, loss_head: LossHead | None, cfg: TrainConfig):
    """Forward and backward of one micro-batch whose sequence is split across ``shard``'s group: global
    positions, targets and length taken before the split (:mod:`hf_posenc.train.parallel`), each rank's
    loss scaled so the group's mean is the whole sequence's. Returns the scaled loss."""
    batch = prepare_batch(batch, shard)
    targets = batch["shift_labels"].clone()
    if shard.mode == "cp":  # accelerate shards the buffers in place, inside the scope
        buffers, dims = cp_buffers(batch)
        scope, mine = accelerator.maybe_context_parallel(buffers, dims, no_restore_buffers=set(buffers)), batch
    else:
        scope, mine = nullcontext(), shard_batch(batch, shard)
    with sharded_step(model, batch, shard), activation_offload(cfg), scope:
        loss = batch_loss(model, mine, loss_head) * loss_scale(mine["shift_labels"], targets, shard.size)
        accelerator.backward(loss / cfg.grad_accum)
    return loss / cfg.grad_accum


def activation_offload(cfg: TrainConfig):
    """Saved activations (with checkpointing: each layer's input) kept in host memory when asked."""
    if not cfg.offload_activations:
        return nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, cfg: TrainConfig, device, loss_head: LossHead | None = None) -> float | None:
    if len(blocks) == 0:
        return None
    model.eval()
    losses = []
    for i in range(min(cfg.eval_batches, math.ceil(len(blocks) / cfg.batch_size))):
        ids = blocks[i * cfg.batch_size : (i + 1) * cfg.batch_size].to(device)
        losses.append(batch_loss(model, {"input_ids": ids, "labels": ids}, loss_head).item())
    model.train()
    return sum(losses) / len(losses)


def train(cfg: TrainConfig, *, progress: bool = True) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from ..patches.shifted import enable_s2_attn

    output_dir = Path(cfg.output_dir)
    model_source(cfg)  # a scheme for a model that records a patch: refused before anything is written
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, log_with=cfg.report_to or None, project_dir=str(output_dir)
    )
    set_seed(cfg.seed)
    resume = latest_checkpoint(output_dir)
    resume_step = json.loads((resume / STATE_FILE).read_text())["step"] if resume is not None else 0
    changes = check_rerun(output_dir, cfg, resume, resume_step)  # every rank raises alike
    accelerator.wait_for_everyone()  # every rank has read the stored recipe before it is replaced
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        for stale in output_dir.glob(".checkpoint-*.tmp"):
            shutil.rmtree(stale)
        header = f"# the recipe of this run; `hf-posenc finetune {output_dir / CONFIG_FILE}` resumes it\n"
        write_atomic(output_dir / CONFIG_FILE, header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        trim_metrics(output_dir / METRICS_FILE, resume_step)
    model, tokenizer = load_model_and_tokenizer(cfg)
    model = prepare_model(cfg, model)
    s2 = enable_s2_attn(model, cfg.s2_group_fraction) if cfg.attention == "s2_attn" else None
    val_len = cfg.pose_target_len or cfg.seq_len
    train_blocks, val_blocks = train_val_blocks(
        tokenizer, cfg.data, cfg.seq_len, val_len, cfg.val_fraction, num_proc=cfg.num_proc, max_tokens=cfg.max_tokens
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.schedule, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)
    # The scheduler is not passed to prepare(): accelerate would step it once per process per step, and
    # `steps` here counts optimizer steps of the global batch. It is still saved with the checkpoint.
    check_accelerator(accelerator, model)  # cp / sp: refused combinations fail before prepare
    model, optimizer = accelerator.prepare(model, optimizer)
    shard = plan_from_accelerator(accelerator)
    accelerator.register_for_checkpointing(scheduler)
    loss_head = LossHead(model, cfg.loss, cfg.loss_chunk_size) if cfg.loss != "plain" else None
    if cfg.report_to:
        accelerator.init_trackers("hf_posenc", config={k: str(v) for k, v in cfg.to_dict().items()})

    step = 0
    changed = ", ".join(f"{key}: {_shown(old)} -> {_shown(new)}" for key, (old, new) in changes.items())
    if resume is not None:
        accelerator.load_state(str(resume))
        step = resume_step
        accelerator.print(
            f"resumed from {resume} at step {step} of {cfg.steps}: weights, optimizer, scheduler and RNG state "
            f"restored, data continues at step {step + 1}; "
            + (f"recipe changes: {changed}" if changed else "recipe unchanged")
        )
    elif changes or (output_dir / "final").is_dir():
        accelerator.print(
            f"{output_dir} holds no checkpoint: starting over at step 0"
            + (f" (recipe changes: {changed})" if changed else "")
        )

    log_path = output_dir / METRICS_FILE
    world, rank = data_parallel_place(accelerator, shard)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world
    bar = tqdm(total=cfg.steps, initial=step, disable=not (progress and accelerator.is_local_main_process))
    model.train()
    start, start_step = time.perf_counter(), step
    loss_value, eval_loss = float("nan"), None
    while step < cfg.steps:
        total = 0.0
        for micro in range(cfg.grad_accum):
            index = step * cfg.grad_accum + micro
            batch = batch_at(
                train_blocks, index, cfg.batch_size * world, seed=cfg.seed, pose_target_len=cfg.pose_target_len
            )
            batch = {
                k: v[rank * cfg.batch_size : (rank + 1) * cfg.batch_size].to(accelerator.device)
                for k, v in batch.items()
            }
            if loss_head is not None and step == start_step and micro == 0:
                loss_head.check(model, batch)  # equals the model's own loss here, or the run stops now
            sync = micro == cfg.grad_accum - 1
            with nullcontext() if sync else accelerator.no_sync(model):
                if shard is None:
                    with activation_offload(cfg):
                        loss = batch_loss(model, batch, loss_head) / cfg.grad_accum
                    accelerator.backward(loss)
                else:
                    loss = sharded_micro_step(accelerator, model, batch, shard, loss_head, cfg)
            total += loss.detach()
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_value = accelerator.reduce(total, reduction="mean").item()
        elapsed = time.perf_counter() - start
        tokens_per_s = (step - start_step) * tokens_per_step / max(elapsed, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens_per_s:.0f}")
        record = None
        if step % cfg.log_every == 0 or step == cfg.steps:
            record = {
                "step": step,
                "loss": loss_value,
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": tokens_per_s,
                "processes": world,
            }
        if step % cfg.eval_every == 0 or step == cfg.steps:
            eval_loss = evaluate(model, val_blocks, cfg, accelerator.device, loss_head)
            if eval_loss is not None:
                record = {**(record or {"step": step}), "eval_loss": eval_loss, "eval_len": val_len}
        if record is not None and accelerator.is_main_process:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            if cfg.report_to:
                accelerator.log(record, step=step)
        if step % cfg.save_every == 0 and step < cfg.steps:
            save_checkpoint(accelerator, output_dir, step, {"step": step, "loss": loss_value}, cfg.keep_last)
        if os.environ.get(FAULT_ENV) == f"kill-after-step:{step}":
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    if loss_head is not None:
        loss_head.remove()
    if s2 is not None:
        s2.undo()  # the saved model attends fully (S²-Attn is a training-time approximation)
    final_dir = save_final(accelerator, model, tokenizer, cfg, output_dir)
    if cfg.report_to:
        accelerator.end_training()
    return TrainResult(step, final_dir, loss_value, eval_loss)


def save_final(accelerator, model, tokenizer, cfg: TrainConfig, output_dir: Path) -> Path | None:
    """``<output_dir>/final``: a model ``hf_posenc.from_pretrained`` loads with its scheme (LoRA merged),
    or, when ``save_merged`` is false, the LoRA adapter plus what :func:`load_adapter_output` needs."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    final = output_dir / "final"
    tmp = output_dir / ".final.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    unwrapped = accelerator.unwrap_model(model)
    if cfg.method == "lora" and not cfg.save_merged:
        save_adapter_output(unwrapped, cfg, tmp)
    else:
        if cfg.method == "lora":
            unwrapped = unwrapped.merge_and_unload()
        unwrapped.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def save_adapter_output(peft_model, cfg: TrainConfig, folder: Path) -> None:
    """The LoRA adapter (peft's files), the recipe, and the base-model tensors an adapter alone would
    lose: those trained outside LoRA (``trainable_embeddings`` / ``trainable_norms``) and those the
    position patch created (e.g. a new learned table)."""
    import hf_posenc

    peft_model.save_pretrained(folder, safe_serialization=True)
    base = peft_model.get_base_model()
    handle = hf_posenc.get_handle(base)
    owned = set(handle.owned_keys) if handle is not None else set()
    trained = {id(p) for p in base.parameters() if p.requires_grad}
    kept = {
        key: tensor.detach().cpu().clone().contiguous()
        for key, tensor in base.state_dict(keep_vars=True).items()
        if "lora_" not in key and (key in owned or id(tensor) in trained)
    }
    save_file(kept, folder / BASE_WEIGHTS_FILE)
    (folder / RECIPE_FILE).write_text(json.dumps(cfg.to_dict(), indent=2))


def load_adapter_output(folder: str | Path):
    """Rebuild a model saved with ``save_merged: false``: the recipe's base model, the LoRA adapter,
    the position patch (in training's order: LoRA first) and the saved base tensors. Returns
    ``(model, tokenizer)``; the model is a peft model in eval mode."""
    from peft import PeftModel

    import hf_posenc

    folder = Path(folder)
    if not (folder / RECIPE_FILE).exists():
        raise FileNotFoundError(
            f"{folder} holds no {RECIPE_FILE}: it is not an adapter output of hf-posenc finetune "
            "(a merged output loads with hf_posenc.from_pretrained)."
        )
    cfg = load_config(folder / RECIPE_FILE)
    base, tokenizer = load_model_and_tokenizer(cfg)
    model = PeftModel.from_pretrained(base, str(folder))
    parsed = parse_scheme_spec(cfg.scheme)
    if parsed is not None:
        hf_posenc.patch(model.get_base_model(), parsed[0], attn_implementation=cfg.attn_implementation, **parsed[1])
    loaded = model.get_base_model().load_state_dict(load_file(folder / BASE_WEIGHTS_FILE), strict=False)
    if loaded.unexpected_keys:
        raise KeyError(f"saved base tensors that the rebuilt model lacks: {sorted(loaded.unexpected_keys)[:5]}")
    return model.eval(), tokenizer
