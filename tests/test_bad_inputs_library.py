"""Bad input and faults of issue 22 (items 7 and 8) at the library's level: real files, real tensors, a real full
disk (a small tmpfs in a private mount namespace, skipped where ``unshare -rm`` is not allowed)."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import make_toy_domains
from gradmix import Mixer, MixtureSampler, make_method
from gradmix.checkpoint import load_checkpoint_file, save_checkpoint_file
from gradmix.sources import DocumentSplitError, TokenFileDomain, read_documents


# -- weights as tensors -------------------------------------------------------------------------------------------
def test_weights_as_a_tensor_that_requires_grad_are_read_as_numbers():
    w = torch.tensor([0.25, 0.75], requires_grad=True)  # np.asarray raised "Can't call numpy() on Tensor ..."
    np.testing.assert_allclose(MixtureSampler([10, 10], 4, w).weights, [0.25, 0.75])
    np.testing.assert_allclose(make_method("fixed", 2, weights=w).weights, [0.25, 0.75])
    np.testing.assert_allclose(MixtureSampler([10, 10], 4, [w[0], w[1]]).weights, [0.25, 0.75])
    sampler = MixtureSampler([10, 10], 4, [0.5, 0.5])
    sampler.set_weights(w.to(torch.bfloat16))
    np.testing.assert_allclose(sampler.weights, [0.25, 0.75])
    with pytest.raises(ValueError, match="weights must be a vector of numbers, got str"):
        make_method("fixed", 2, weights="ab")


# -- token files with ids that are not ids ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["int64", "int32"])
def test_negative_token_ids_are_refused_naming_file_position_and_value(tmp_path, dtype):
    tokens = np.arange(200, dtype=dtype)
    tokens[123] = -7
    path = tmp_path / "toks.bin"
    tokens.tofile(path)
    with pytest.raises(ValueError, match=r"toks\.bin.*token id -7 at position 123 is not a valid id"):
        TokenFileDomain("web", path, 8, dtype=dtype)
    np.save(tmp_path / "w.npy", tokens.reshape(20, 10))
    with pytest.raises(ValueError, match=r"w\.npy.*token id -7 at position 123"):
        TokenFileDomain("web", tmp_path / "w.npy", None)
    tokens[123] = 5  # all valid: accepted
    tokens.tofile(path)
    assert TokenFileDomain("web", path, 8, dtype=dtype).size == 24


def test_uint64_ids_past_int64_are_refused(tmp_path):
    tokens = np.arange(50, dtype=np.uint64)
    tokens[3] = 2**63 + 1  # would wrap to a negative index when read as int64
    np.save(tmp_path / "u.npy", tokens)
    with pytest.raises(ValueError, match="token id 9223372036854775809 at position 3"):
        TokenFileDomain("web", tmp_path / "u.npy", 4)


# -- text sources ---------------------------------------------------------------------------------------------------
def test_text_sources_name_the_file_that_is_not_utf8_or_not_there(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DocumentSplitError, match=r"a\.jsonl:2: not UTF-8 text \(byte 0xe9 at offset 30\)"):
        read_documents(tmp_path / "a.jsonl")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "b.txt").write_text("one doc\n\nanother")
    (folder / "c.txt").symlink_to(tmp_path / "missing.txt")
    with pytest.raises(DocumentSplitError, match=r"c\.txt in folder .* is a dangling symlink"):
        read_documents(folder)
    with pytest.raises(FileNotFoundError, match="is a dangling symlink"):
        read_documents(folder / "c.txt")


# -- checkpoints --------------------------------------------------------------------------------------------------
def test_saving_through_a_symlinked_checkpoint_path_keeps_the_link(tmp_path):
    """Written through (see gradmix.checkpoint.atomic_write): the link stays, the file it points to is replaced."""
    store = tmp_path / "big_disk"
    store.mkdir()
    target = store / "ckpt.pt"
    link = tmp_path / "checkpoint.pt"
    link.symlink_to(target)  # dangling at first: the first save creates the target
    mixer = Mixer(make_toy_domains(), "uniform", 12)
    assert mixer.save_checkpoint(link) == link
    assert link.is_symlink() and target.is_file()
    first = target.read_bytes()
    for batch in mixer.batches(2):
        mixer.observe(batch["domain"], torch.ones(len(batch["domain"])))
        mixer.step()
    mixer.save_checkpoint(link)
    assert link.is_symlink() and link.resolve() == target  # the link was not replaced by a regular file
    assert target.read_bytes() != first
    assert load_checkpoint_file(link)["gradmix"]["core"]["step"] == 2
    assert sorted(p.name for p in store.iterdir()) == ["ckpt.pt"]  # no temp file left next to the target


CRAFTED = [
    ("odm", {}, "rounds", -1, "odm: checkpointed rounds must be an integer >= 0, got -1"),
    ("odm", {}, "rounds", 2.5, "rounds must be an integer >= 0, got 2.5"),
    ("odm", {}, "rounds", True, "rounds must be an integer >= 0, got True"),
    ("odm", {}, "estimated_reward", [0.0, math.inf, 0.0], "estimated_reward has a non-finite value inf at index 1"),
    ("famo", {}, "adam_steps", [1, -1, 1], "adam_steps has a negative value -1.0 at index 1"),
    ("famo", {}, "adam_sq_mean", [0.1, -0.5, 0.1], "adam_sq_mean has a negative value -0.5 at index 1"),
    ("famo", {}, "adam_mean", [0.1, 0.2], r"adam_mean has shape \(2,\), expected \(3,\)"),
    ("doremi", {"reference_loss": [1, 1, 1]}, "averaged_updates", -3, "averaged_updates must be an integer >= 0"),
    ("doremi", {"reference_loss": [1, 1, 1]}, "average_weights", [0.5, -0.5, 1.0], "has a negative value -0.5"),
    ("round_robin", {}, "next", "x", "round_robin: checkpointed next must be an integer >= 0, got 'x'"),
    ("random", {}, "draws", -1, "random: checkpointed draws must be an integer >= 0, got -1"),
    ("uniform", {}, "num_updates", -2, "uniform: checkpointed num_updates must be an integer >= 0, got -2"),
]


@pytest.mark.parametrize("name, params, field, value, message", CRAFTED, ids=[f"{c[0]}.{c[2]}" for c in CRAFTED])
def test_a_crafted_method_state_is_refused_at_load_and_changes_nothing(name, params, field, value, message):
    method = make_method(name, 3, **params)
    state = method.state_dict()
    before = repr(state)
    state[field] = value
    with pytest.raises(ValueError, match=message):
        method.load_state_dict(state)
    assert repr(method.state_dict()) == before  # all or nothing


def test_a_crafted_checkpoint_file_fails_at_load_naming_the_file_not_at_the_next_update(tmp_path):
    mixer = Mixer(make_toy_domains(), "odm", 12, update_every=1)
    for batch in mixer.batches(3):
        mixer.observe(batch["domain"], torch.ones(len(batch["domain"])))
        mixer.step()
    path = tmp_path / "ckpt.pt"
    mixer.save_checkpoint(path)
    state = load_checkpoint_file(path)
    state["gradmix"]["core"]["method"]["rounds"] = -1
    crafted = tmp_path / "crafted.pt"
    save_checkpoint_file(state, crafted)  # a valid file (header, checksum) with an invalid method state
    fresh = Mixer(make_toy_domains(), "odm", 12, update_every=1)
    with pytest.raises(ValueError, match=r"crafted\.pt.*odm: checkpointed rounds must be an integer >= 0, got -1"):
        fresh.load_checkpoint(crafted)
    assert fresh.step_count == 0 and fresh.method.rounds == 0


def _unshare_ok() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _unshare_ok(), reason="needs `unshare -rm` (user + mount namespaces)")
def test_disk_full_during_a_save_names_the_file_and_keeps_the_previous_checkpoint(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    script = textwrap.dedent(f"""
        import os, torch
        from gradmix.checkpoint import load_checkpoint_file, save_checkpoint_file
        path = {str(disk / "ckpt.pt")!r}
        save_checkpoint_file({{"step": 1}}, path)
        try:
            save_checkpoint_file({{"step": 2, "big": torch.zeros(200_000)}}, path)  # 800 KB on a 256 KB disk
        except OSError as exc:
            print("ERROR", exc.strerror)
        print("STEP", load_checkpoint_file(path)["step"])
        print("FILES", sorted(os.listdir({str(disk)!r})))
    """)
    result = subprocess.run(
        [
            "unshare",
            "-rm",
            "sh",
            "-c",
            f'mount -t tmpfs -o size=256k tmpfs {disk} && exec "$@"',
            "sh",
            sys.executable,
            "-c",
            script,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == (
        f"ERROR disk full: cannot write {disk / 'ckpt.pt'} (No space left on device); the previous file is intact"
    )  # was: RuntimeError [enforce fail at inline_container.cc]
    assert lines[1:] == ["STEP 1", "FILES ['ckpt.pt']"]
