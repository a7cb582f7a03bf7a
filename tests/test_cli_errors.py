"""The CLI reports user errors in one line (exit 2), --debug shows the traceback, and bad paths given to
``patch`` and ``eval`` are named plainly instead of surfacing transformers' hub errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import char_tokenizer, tiny_model

import hf_posenc
from hf_posenc.cli import main


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-posenc: error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.fixture
def base(tmp_path):
    path = tmp_path / "base"
    tiny_model("llama").save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def test_patch_refuses_an_existing_file_as_out(tmp_path, base, capsys):
    target = tmp_path / "model.bin"
    target.write_text("keep me")
    assert main(["patch", str(base), "yarn:factor=2", "--out", str(target)]) == 2
    assert "is an existing file" in one_line_error(capsys)
    assert target.read_text() == "keep me"
    assert "saved" not in capsys.readouterr().out


def test_patch_refuses_a_folder_of_other_files_but_overwrites_a_previous_output(tmp_path, base, capsys):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("x")
    assert main(["patch", str(base), "yarn:factor=2", "--out", str(other)]) == 2
    assert "holds other files and no saved model" in one_line_error(capsys)
    out = tmp_path / "out"
    assert main(["patch", str(base), "yarn:factor=2", "--out", str(out)]) == 0
    assert main(["patch", str(base), "linear:factor=4", "--out", str(out)]) == 0
    assert hf_posenc.get_handle(hf_posenc.from_pretrained(str(out))).scheme.name == "linear"
    capsys.readouterr()  # the successful runs' progress bars
    assert main(["patch", str(base), "yarn:factor=2", "--out", str(base)]) == 2
    assert "is the model being patched" in one_line_error(capsys)


def test_patch_refuses_a_patched_checkpoint_and_a_missing_scheme(tmp_path, base, capsys):
    assert main(["patch", str(base), "yarn:factor=2", "--out", str(tmp_path / "once")]) == 0
    capsys.readouterr()
    assert main(["patch", str(tmp_path / "once"), "linear:factor=2", "--out", str(tmp_path / "twice")]) == 2
    assert "already patched (yarn:factor=2)" in one_line_error(capsys)
    assert main(["patch", str(base), "none", "--out", str(tmp_path / "x")]) == 2
    assert "needs a scheme" in one_line_error(capsys)
    assert main(["patch", str(base), "yarm:factor=2", "--out", str(tmp_path / "x")]) == 2
    assert "Did you mean 'yarn'" in one_line_error(capsys)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("command", ["patch", "eval"])
def test_bad_local_model_paths_are_named_plainly(tmp_path, capsys, command, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.bin").write_text("x")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    tail = ["yarn:factor=2", "--out", "o"] if command == "patch" else ["--out", "o", "--no-plots"]
    cases = {
        "./does-not-exist": "No such folder: ./does-not-exist",
        str(tmp_path / "missing"): "No such folder",
        "~/hf-posenc-no-such-folder": "No such folder",
        "empty": "has no config.json",
        "./weights.bin": "is a file",
        "adapter": "load_adapter_output",
    }
    for model, message in cases.items():
        assert main([command, model, *tail]) == 2
        line = one_line_error(capsys)
        assert message in line and "huggingface.co" not in line and "repo" not in line.lower(), line


def test_debug_shows_the_traceback_before_or_after_the_command(capsys):
    from hf_posenc.errors import CheckpointNotFoundError

    for argv in (["--debug", "eval", "./nowhere"], ["eval", "./nowhere", "--debug"]):
        with pytest.raises(CheckpointNotFoundError, match="No such folder"):
            main(argv)
    assert capsys.readouterr().err == ""


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    import hf_posenc.cli

    def broken(_args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(hf_posenc.cli, "_ls", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["ls"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-size", "0"], "batch_size must be an integer >= 1"),
        (["--max-windows", "0"], "max_windows must be an integer >= 1"),
        (["--trials", "0"], "trials must be an integer >= 1"),
        (["--lengths", ""], "lengths is empty"),
        (["--lengths", "1"], "lengths must be integers >= 2"),
        (["--stride", "0"], "stride must be between 1 and the shortest length"),
        (["--depths", ""], "depths is empty"),
        (["--tasks", "ppl,rouge"], "Unknown task"),
        (["--schemes", "none,yarm:factor=2"], "Did you mean 'yarn'"),
        (["--tasks", "passkey", "--retrieval-lengths", "100"], "at least"),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_eval_user_errors_are_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["eval", "tiny:llama", "--lengths", "64", *args, "--out", str(out), "--no-plots"]) == 2
    assert message in one_line_error(capsys)
    assert not (out / "results.json").exists()


def test_eval_names_a_binary_data_file(tmp_path, capsys):
    data = tmp_path / "book.txt"
    data.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    assert main(["eval", "tiny:llama", "--lengths", "64", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    line = one_line_error(capsys)
    assert str(data) in line and "not UTF-8" in line


def test_the_installed_command_exits_2_with_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "hf_posenc.cli", "eval", "./does-not-exist"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "hf-posenc: error: No such folder: ./does-not-exist."
