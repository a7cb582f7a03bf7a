"""``pip install hf-posenc`` without extras: patching, saving and loading need no training or
evaluation dependency (peft, accelerate, datasets, matplotlib, lm-eval)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# (pyyaml and tqdm are dependencies of transformers itself)
OPTIONAL = ("peft", "accelerate", "datasets", "matplotlib", "lm_eval")

SCRIPT = textwrap.dedent(
    f"""
    import sys, tempfile

    for name in {OPTIONAL!r}:
        sys.modules[name] = None  # as if not installed: imports fail, find_spec returns None

    import torch
    import hf_posenc
    from hf_posenc.tiny import tiny_model

    model = tiny_model("llama", context=64)
    x = torch.randint(1, 90, (1, 100))
    hf_posenc.patch(model, "yarn", factor=2.0)
    with torch.no_grad():
        expected = model(x).logits
    folder = tempfile.mkdtemp()
    model.save_pretrained(folder)
    with torch.no_grad():
        again = hf_posenc.from_pretrained(folder).eval()(x).logits
    assert (again - expected).abs().max() < 1e-6
    print("ok")
    """
)


def test_patching_needs_no_training_or_evaluation_dependency():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def test_cli_names_the_extra_a_command_needs(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["matplotlib"] = None  # plots need the eval extra
        from hf_posenc.cli import main
        sys.exit(main(["eval", "tiny:llama", "--lengths", "32", "--out", {str(tmp_path)!r}]))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "pip install 'hf_posenc[eval]'" in proc.stderr and "Traceback" not in proc.stderr
