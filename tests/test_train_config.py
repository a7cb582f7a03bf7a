"""Recipe configs: numeric values typed from YAML and overrides, every numeric field range-checked,
and no stale recipe paths in the docs and scripts that name them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import hf_posenc
from hf_posenc.train import TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("lr=1e-4", "lr", 1e-4),
        ("lr=2.5e-5", "lr", 2.5e-5),
        ("lr=3E-4", "lr", 3e-4),
        ("weight_decay=1e-2", "weight_decay", 0.01),
        ("weight_decay=1", "weight_decay", 1.0),
        ("max_grad_norm=5e-1", "max_grad_norm", 0.5),
        ("lora_dropout=1e-1", "lora_dropout", 0.1),
        ("val_fraction=5e-2", "val_fraction", 0.05),
        ("steps=3", "steps", 3),
        ("steps=1e3", "steps", 1000),
        ("steps=2.0", "steps", 2),
        ("max_tokens=4e4", "max_tokens", 40000),
        ("max_tokens=null", "max_tokens", None),
        ("pose_target_len=none", "pose_target_len", None),
        ("seq_len=128", "seq_len", 128),
    ],
)
def test_numeric_overrides_are_typed(override, key, expected):
    value = getattr(load_config(None, [override]), key)
    assert value == expected and type(value) is type(expected)


def test_numeric_values_in_a_recipe_file_are_typed(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: tiny:llama\nlr: 1e-4\nweight_decay: 1e-2\nsteps: 1e2\nmax_grad_norm: 1\n")
    cfg = load_config(recipe)
    assert (cfg.lr, cfg.weight_decay, cfg.steps, cfg.max_grad_norm) == (1e-4, 0.01, 100, 1.0)
    assert isinstance(cfg.lr, float) and isinstance(cfg.steps, int) and isinstance(cfg.max_grad_norm, float)


def test_a_json_recipe_with_small_floats_loads(tmp_path):
    """json.dumps writes 2e-05 (no dot), which YAML 1.1 reads as a string: the adapter-output recipe
    and config.yaml of older runs are JSON."""
    recipe = tmp_path / "hf_posenc_recipe.json"
    recipe.write_text(json.dumps({**TrainConfig().to_dict(), "lr": 2e-5, "weight_decay": 1e-5}, indent=2))
    cfg = load_config(recipe)
    assert cfg.lr == 2e-5 and cfg.weight_decay == 1e-5 and isinstance(cfg.lr, float)


def test_the_python_api_types_numbers_too():
    cfg = TrainConfig(lr="1e-4", steps="12", max_tokens="1000")
    assert (cfg.lr, cfg.steps, cfg.max_tokens) == (1e-4, 12, 1000)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lr=abc", r"lr must be a number \(float\), got 'abc'"),
        ("lr=", r"lr must be a number \(float\), got None"),
        ("lr=true", r"lr must be a number \(float\), got True"),
        ("lr=nan", r"lr must be a finite number"),
        ("steps=abc", r"steps must be an int, got 'abc'"),
        ("steps=2.5", r"steps must be an int, got 2.5"),
        ("seq_len=[1]", r"seq_len must be an int, got \[1\]"),
        ("max_tokens=lots", r"max_tokens must be an int or null, got 'lots'"),
        ("pose_target_len=abc", r"pose_target_len must be an int or null, got 'abc'"),
        ("trainable_norms=maybe", r"trainable_norms must be true or false, got 'maybe'"),
    ],
)
def test_unparsable_values_name_the_key_and_type(override, message):
    with pytest.raises(hf_posenc.InvalidParameterError, match=message):
        load_config(None, [override])


def test_unparsable_file_values_name_the_file(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lr: fast\n")
    with pytest.raises(hf_posenc.InvalidParameterError, match=r"recipe\.yaml: lr must be a number"):
        load_config(recipe)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["max_grad_norm=-1"], r"max_grad_norm must be >= 0 \(0 turns clipping off\), got -1.0"),
        (["max_grad_norm=inf"], r"max_grad_norm must be a finite number"),
        (["warmup_steps=-1"], r"warmup_steps must be an int >= 0, got -1"),
        (["warmup_steps=1.5"], r"warmup_steps must be an int"),
        (["weight_decay=-0.1"], r"weight_decay must be >= 0, got -0.1"),
        (["lora_alpha=0"], r"lora_alpha must be a positive int, got 0"),
        (["lora_alpha=-16"], r"lora_alpha must be a positive int"),
        (["lora_dropout=1"], r"lora_dropout must be in \[0, 1\), got 1.0"),
        (["lora_dropout=-0.1"], r"lora_dropout must be in \[0, 1\)"),
        (["max_tokens=0"], r"max_tokens must be a positive int or null, got 0"),
        (["max_tokens=-5"], r"max_tokens must be a positive int or null"),
        (["pose_target_len=0"], r"pose_target_len must be a positive int or null, got 0"),
        (["seed=-1"], r"seed must be an int in \[0, 2\*\*32\), got -1"),
        (["lr=0"], r"lr must be in \(0, 1\)"),
        (["report_to=mlflow"], r"report_to accepts tensorboard, wandb; got \['mlflow'\]"),
        (["model="], r"model must be a non-empty string"),
        (["lora_target_modules=[1, 2]"], r"lora_target_modules must be a string or a list of strings"),
    ],
)
def test_out_of_range_values_are_refused(overrides, message):
    with pytest.raises(hf_posenc.InvalidParameterError, match=message):
        load_config(None, overrides)


def test_edges_that_stay_valid():
    cfg = load_config(None, ["max_grad_norm=0", "warmup_steps=0", "weight_decay=0", "lora_dropout=0"])
    assert cfg.max_grad_norm == 0.0  # the engine clips only when max_grad_norm is non-zero
    assert load_config(None, ["steps=10", "warmup_steps=9"]).warmup_steps == 9
    with pytest.warns(UserWarning, match=r"warmup_steps \(10\) >= steps \(10\): the learning rate never reaches lr"):
        assert load_config(None, ["steps=10", "warmup_steps=10"]).warmup_steps == 10  # a smoke test of a real recipe
    assert load_config(None, ["seq_len=64", "pose_target_len=64"]).pose_target_len == 64


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("report_to=tensorboard", ["tensorboard"]),
        ("report_to=tensorboard,wandb", ["tensorboard", "wandb"]),
        ("report_to=[wandb]", ["wandb"]),
        ("report_to=none", []),
        ("report_to=[]", []),
    ],
)
def test_report_to_override_forms(override, expected):
    assert load_config(None, [override]).report_to == expected


def test_every_field_has_a_known_type():
    """The coercion covers each TrainConfig field: a new field of a new type must be taught to it."""
    from hf_posenc.train.config import field_kinds

    kinds = field_kinds()
    assert set(kinds) == set(TrainConfig().to_dict())


RECIPE_PATH = re.compile(r"recipes/configs/[\w./-]+?\.yaml")
NAMING_FILES = [
    "README.md",
    "recipes/finetune.py",
    "hf_posenc/train/__init__.py",
    "hf_posenc/train/config.py",
    "hf_posenc/train/engine.py",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes" / "configs").rglob("*.yaml")),
]


@pytest.mark.parametrize("name", NAMING_FILES)
def test_recipe_paths_named_in_docs_and_scripts_exist(name):
    named = set(RECIPE_PATH.findall((ROOT / name).read_text()))
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"{name} names recipes that do not exist: {missing}"


def test_recipe_differences_reads_old_json_configs():
    """Runs written before config.yaml became YAML hold JSON (2e-05 reads as a string to YAML 1.1)."""
    import yaml

    from hf_posenc.train.config import recipe_differences

    cfg = TrainConfig(lr=2e-5, output_dir="runs/a", report_to=["tensorboard"])
    stored = yaml.safe_load(json.dumps({**cfg.to_dict(), "output_dir": "/abs/runs/a", "retired_key": 1}))
    assert stored["lr"] == "2e-05" and recipe_differences(stored, cfg) == {}
    changed = TrainConfig(lr=1e-4, steps=200, output_dir="runs/a", report_to=["tensorboard"])
    assert recipe_differences(stored, changed) == {"lr": (2e-5, 1e-4), "steps": (100, 200)}
