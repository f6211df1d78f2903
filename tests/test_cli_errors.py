"""The CLI prints one line for user errors (no traceback): OS errors on paths, bad npz data, broken installs."""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import numpy as np
import pytest

from misleader import cli
from misleader.cli import main, os_error_message

TRAIN = ["train-victim", "--dataset", "digits", "--arch", "lenet5_fifth", "--epochs", "1", "--device", "cpu"]


def _one_line_error(capsys, argv: list[str]) -> str:
    rc = main(["-q", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("misleader: error: ")
    return err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_out_under_proc_is_not_called_file_not_found(capsys):
    err = _one_line_error(capsys, [*TRAIN, "--out", "/proc/misleader-test"])
    assert "file not found" not in err and "/proc/misleader-test" in err and "cannot be written" in err


def test_out_under_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    err = _one_line_error(capsys, [*TRAIN, "--out", str(tmp_path / "f" / "sub")])
    assert "which is a file" in err and str(tmp_path / "f") in err


@pytest.mark.parametrize("code,words", [
    (errno.EACCES, "permission denied"), (errno.EROFS, "read-only file system"),
    (errno.ENOTDIR, "is a file, not a folder"), (errno.ENOSPC, "no space left"),
    (errno.EIO, "Input/output error: check the path"),
])
def test_os_error_message_names_the_path_and_the_fix(code, words):
    import os

    msg = os_error_message(OSError(code, os.strerror(code), "/some/path"))
    assert msg.startswith("/some/path: ") and words in msg and "\n" not in msg


def test_os_error_message_missing_parent(tmp_path):
    msg = os_error_message(FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / "a" / "b")))
    assert "no such file or folder: check the path" in msg


def test_npz_of_unsupported_size_through_the_cli(tmp_path, capsys):
    path = tmp_path / "big.npz"
    np.savez(path, x_train=np.zeros((30, 64, 64, 3), np.uint8), y_train=np.arange(30) % 3,
             x_test=np.zeros((6, 64, 64, 3), np.uint8), y_test=np.arange(6) % 3)
    argv = [a if a != "digits" else f"npz:{path}" for a in TRAIN]
    err = _one_line_error(capsys, [*argv, "--out", str(tmp_path / "v")])
    assert "64x64" in err and "28x28 or 32x32" in err


def test_a_command_module_that_fails_to_import_is_an_error(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, "no_such_command_module"])
    with pytest.raises(ModuleNotFoundError, match="no_such_command_module"):
        cli.build_parser()


def test_an_attack_module_that_fails_to_import_is_an_error():
    """The attack registry imports every attack module; a broken one must surface, not vanish."""
    import os
    import subprocess

    code = "import sys; sys.modules['misleader.attacks.dfme'] = None; import misleader.attacks"
    src = str(Path(cli.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0 and "misleader.attacks.dfme" in proc.stderr


def test_figures_are_written_atomically(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from misleader.experiments.plots import save_figure

    fig = plt.figure()
    path = tmp_path / "fig.png"
    save_figure(fig, path)
    first = path.read_bytes()
    assert first.startswith(b"\x89PNG") and [p.name for p in tmp_path.iterdir()] == ["fig.png"]

    def broken(*args, **kwargs):
        raise RuntimeError("renderer crashed mid-way")

    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(RuntimeError):
        save_figure(fig, path)
    assert path.read_bytes() == first and [p.name for p in tmp_path.iterdir()] == ["fig.png"]
    plt.close(fig)


@pytest.mark.parametrize("flag,value,words", [("--lr", "-1", "finite number > 0"), ("--lr", "nan", "finite number > 0"),
                                              ("--lr", "fast", "expected a number"),
                                              ("--epochs", "abc", "expected a whole number")])
def test_bad_numbers_are_argparse_errors(tmp_path, capsys, flag, value, words):
    argv = ["train-victim", "--dataset", "digits", "--arch", "lenet5_fifth", "--device", "cpu",
            "--epochs", value if flag == "--epochs" else "1", "--out", str(tmp_path / "v")]
    if flag != "--epochs":
        argv += [flag, value]
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and words in err and "Traceback" not in err
    assert not (tmp_path / "v").exists()
