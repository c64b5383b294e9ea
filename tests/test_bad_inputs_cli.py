"""Bad input and faults of issue 22 (items 7 and 8) through the real `gradmix` command, one process per case.

Each case was a traceback, a message naming no file, or a silent wrong before; now it is one line
``gradmix: error: ...`` naming the file / field / value, exit code 2, and nothing in the run folder is lost.
The disk-full and read-only cases need a real full / read-only file system: a small tmpfs or a read-only bind mount
in a private mount namespace (``unshare -rm``); they are skipped where user namespaces are not allowed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.toml"
TINY = ROOT / "src" / "gradmix_kit" / "data" / "tiny"
CLI = [sys.executable, "-m", "gradmix_kit.cli"]


def _gradmix(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *CLI, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    """The error line, after checking the contract: exit 2, no traceback, the last stderr line is the error."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("gradmix: error: "), result.stderr
    return line


def _run(out: Path, *extra: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return _gradmix("run", str(SMOKE), "--out", str(out), "--no-progress", "--method", "uniform", *extra, prefix=prefix)


def _corpus(folder: Path) -> Path:
    folder.mkdir()
    for name in ("code.txt", "legal.txt"):
        shutil.copy(TINY / name, folder / name)
    return folder


def _unshare_ok() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


needs_unshare = pytest.mark.skipif(not _unshare_ok(), reason="needs `unshare -rm` (user + mount namespaces)")


# -- item 7: errors that were tracebacks or named no file ------------------------------------------------------------
@pytest.mark.integration
def test_unknown_method_parameter_from_set_or_config(tmp_path):
    line = _one_line_error(_run(tmp_path / "r", "--method", "odm", "--set", "mixing.params.nope=1"))
    assert (
        "mixing.params: bad parameters for mixing method 'odm': it has no parameter 'nope' (its parameters: "
        "reward_scale, reward_smoothing)" in line
    )
    cfg = tmp_path / "c.toml"
    cfg.write_text('steps = 5\n[mixing]\nmethod = "famo"\nparams = {no_such_param = 1}\n')
    line = _one_line_error(_gradmix("run", str(cfg), "--out", str(tmp_path / "r2"), "--no-progress"))
    assert "mixing method 'famo': it has no parameter 'no_such_param'" in line


@pytest.mark.integration
def test_a_set_value_that_starts_like_json_must_parse(tmp_path):
    line = _one_line_error(_run(tmp_path / "r", "--set", "mixing.params.weights=[1,2"))
    assert "--set mixing.params.weights: '[1,2' is not valid JSON" in line


@pytest.mark.integration
def test_a_config_path_that_is_a_folder(tmp_path):
    line = _one_line_error(_gradmix("run", str(tmp_path), "--out", str(tmp_path / "r")))
    assert f"config {str(tmp_path)!r} is a folder" in line


@pytest.mark.integration
def test_out_that_is_a_file(tmp_path):
    out = tmp_path / "taken"
    out.write_text("not a folder")
    assert f"--out {str(out)!r} is a file" in _one_line_error(_run(out))
    assert out.read_text() == "not a folder"


@pytest.mark.integration
def test_invalid_utf8_in_a_corpus_file_names_the_file(tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    with (corpus / "legal.txt").open("ab") as fh:
        fh.write(b"\nend \xff\xfe of file\n")
    line = _one_line_error(_run(tmp_path / "r", "--set", f"data.corpus={corpus}"))
    assert f"{corpus / 'legal.txt'}:" in line and "not UTF-8 text (byte 0xff at offset" in line


@pytest.mark.integration
def test_a_batch_size_no_machine_can_hold(tmp_path):
    line = _one_line_error(_run(tmp_path / "r", "--set", "train.batch_size=100000000000"))
    assert "batch_size 100000000000 is too large for this machine" in line


@pytest.mark.integration
@needs_unshare
def test_disk_full_during_the_checkpoint_save_says_so_and_names_the_file(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ("unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size=256k tmpfs {disk} && exec "$@"', "sh")
    line = _one_line_error(_run(disk / "run", "--set", "steps=10", prefix=mount))  # a checkpoint is ~700 KB
    assert f"disk full: cannot write {disk / 'run' / 'checkpoint.pt'} (No space left on device)" in line


@pytest.mark.integration
@needs_unshare
def test_a_read_only_run_folder(tmp_path):
    folder = tmp_path / "ro"
    (folder / "run").mkdir(parents=True)
    mount = (
        "unshare",
        "-rm",
        "sh",
        "-c",
        f'mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} && exec "$@"',
        "sh",
    )
    line = _one_line_error(_run(folder / "run", "--set", "steps=5", prefix=mount))
    assert str(folder / "run") in line and "Read-only file system" in line


# -- item 8: silent wrongs ------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_a_domain_with_a_txt_and_a_jsonl_file_is_an_error_naming_both(tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    (corpus / "code.jsonl").write_text(json.dumps({"text": "def f():\n    return 1"}) + "\n")
    line = _one_line_error(_run(tmp_path / "r", "--set", f"data.corpus={corpus}"))
    assert "two files for domain 'code': code.jsonl and code.txt" in line


@pytest.mark.integration
def test_a_dangling_symlink_in_a_corpus_folder_is_an_error_naming_it(tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    (corpus / "medical.txt").symlink_to(tmp_path / "gone.txt")
    line = _one_line_error(_run(tmp_path / "r", "--set", f"data.corpus={corpus}"))
    assert f"{corpus / 'medical.txt'}" in line and "dangling symlink" in line


@pytest.mark.integration
def test_resume_with_fewer_steps_than_done_is_refused_and_changes_nothing(tmp_path):
    out = tmp_path / "run"
    assert _run(out, "--set", "steps=12").returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    line = _one_line_error(_run(out, "--set", "steps=5", "--resume"))
    assert "has already trained 12 steps, more than steps = 5" in line
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before  # summary.json still says 12 steps; config.json, metrics untouched
    assert json.loads((out / "summary.json").read_text())["steps"] == 12


def test_the_os_error_line_names_the_file():
    from gradmix_kit.cli import _os_error

    assert _os_error(PermissionError(13, "Permission denied", "runs/x/config.json")) == (
        "runs/x/config.json: Permission denied"
    )
    assert _os_error(OSError(28, "disk full: cannot write a.pt (No space left on device)")) == (
        "disk full: cannot write a.pt (No space left on device)"
    )
    assert os.strerror(28) == "No space left on device"
