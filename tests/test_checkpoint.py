"""Checkpoint files: exact round trips, no code execution on load, clear errors, crash safety, temp hygiene, RNG."""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import random
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch

import gradmix
from gradmix.checkpoint import (
    HEADER_SIZE,
    MAGIC,
    atomic_write,
    capture_rng_state,
    load_checkpoint_file,
    restore_rng_state,
    save_checkpoint_file,
    write_json_atomic,
)


# -- helpers ---------------------------------------------------------------------------------------------------------
def assert_same(a, b, where="state"):
    """Exact structural equality, including container/scalar types and tensor dtypes."""
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def small_state() -> dict:
    return {"step": 7, "w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "names": ["a", "b"], "x": None}


def expect_value_error(path: Path) -> str:
    with pytest.raises(ValueError) as info:
        load_checkpoint_file(path)
    message = str(info.value)
    assert str(path) in message, message
    return message


class _Pwn:
    """Pickles as ``os.system(cmd)``: what a malicious checkpoint would contain."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def with_gradmix_header(payload: bytes) -> bytes:
    import hashlib
    import struct

    return struct.pack("<16sIQ32s", MAGIC, 1, len(payload), hashlib.sha256(payload).digest()) + payload


# -- round trip ------------------------------------------------------------------------------------------------------
def test_round_trip_nested_state_is_exact(tmp_path):
    view_base = torch.arange(20, dtype=torch.int64)
    state = {
        "gradmix": {
            "format": "x/1",
            "step": 12,
            "weights": [0.25, 0.75],
            "names": ("web", "code"),
            "none": None,
            "flag": True,
            "big": 2**70,
            "neg_zero": -0.0,
            "inf": float("inf"),
            "nan": float("nan"),
        },
        "tensors": {
            "f32": torch.randn(3, 4),
            "bf16": torch.randn(5).to(torch.bfloat16),
            "bool": torch.tensor([True]),
            "i64": torch.tensor([-(2**62), 2**62]),
            "view": view_base[3:9],
            "scalar": torch.tensor(3.5),
            "empty": torch.empty(0, 7),
        },
        "nested": [[1, [2, [3, {"deep": "x" * 1000}]]], {5: "int key", (1, 2): "tuple key"}],
        "ordered": collections.OrderedDict([("b", 1), ("a", 2)]),
        "misc": {
            "bytes": b"\x00\xff",
            "dtype": torch.float16,
            "device": torch.device("cpu"),
            "size": torch.Size([2]),
            "set": {1, 2, 3},
            "complex": 1 + 2j,
            "unicode": "ünïcødé ✓",
        },
        "torch_rng": torch.get_rng_state(),
    }
    path = save_checkpoint_file(state, tmp_path / "ckpt.pt")
    assert path == tmp_path / "ckpt.pt"
    loaded = load_checkpoint_file(path)
    assert_same(state, loaded)
    assert loaded["tensors"]["view"].tolist() == list(range(3, 9))


def test_round_trip_model_and_optimizer(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    save_checkpoint_file({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "c.pt")
    loaded = load_checkpoint_file(tmp_path / "c.pt")
    assert_same(model.state_dict(), loaded["model"])
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1.0)
    model2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optimizer"])
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


def test_load_does_not_require_gradmix_section(tmp_path):
    save_checkpoint_file({"anything": 1}, tmp_path / "c.pt")
    assert load_checkpoint_file(tmp_path / "c.pt") == {"anything": 1}


# -- malicious files -------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_checkpoints_do_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Pwn(f"touch {marker}")

    raw_pickle = pickle.dumps({"gradmix": evil})
    buf = io.BytesIO()
    torch.save({"gradmix": evil, "w": torch.ones(2)}, buf)
    torch_payload = buf.getvalue()

    # control: the payloads are live, a plain unpickle would run the command
    pickle.loads(raw_pickle)
    assert marker.exists()
    marker.unlink()
    torch.load(io.BytesIO(torch_payload), weights_only=False)
    assert marker.exists()
    marker.unlink()

    files = {
        "raw.pkl": raw_pickle,
        "plain_torch.pt": torch_payload,
        "wrapped_torch.pt": with_gradmix_header(torch_payload),
        "wrapped_pickle.pt": with_gradmix_header(raw_pickle),
    }
    for name, data in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        message = expect_value_error(path)
        assert not marker.exists(), f"{name} ran code: {message}"
    assert "not a gradmix checkpoint" in expect_value_error(tmp_path / "plain_torch.pt")
    assert "safe loader refuses" in expect_value_error(tmp_path / "wrapped_torch.pt")


# -- corrupt and foreign files ---------------------------------------------------------------------------------------
def test_every_truncation_is_a_value_error(tmp_path):
    good = save_checkpoint_file(small_state(), tmp_path / "good.pt").read_bytes()
    assert good.startswith(MAGIC)
    path = tmp_path / "cut.pt"
    for n in range(len(good)):
        path.write_bytes(good[:n])
        message = expect_value_error(path)
        if n >= HEADER_SIZE:
            assert f"truncated: expected {len(good)} bytes" in message
    path.write_bytes(good + b"\0")
    assert "unexpected bytes" in expect_value_error(path)
    path.write_bytes(good)
    assert_same(small_state(), load_checkpoint_file(path))


def test_every_flipped_byte_is_a_value_error(tmp_path):
    good = save_checkpoint_file(small_state(), tmp_path / "good.pt").read_bytes()
    path = tmp_path / "flipped.pt"
    kinds: set[str] = set()
    for i in range(len(good)):
        data = bytearray(good)
        data[i] ^= 0x01 if i % 2 else 0x80
        path.write_bytes(bytes(data))
        message = expect_value_error(path)
        if i >= HEADER_SIZE:
            assert "checksum mismatch (file corrupted)" in message
        kinds.update(
            k
            for k in (
                "not a gradmix checkpoint",
                "format version",
                "truncated",
                "unexpected bytes",
                "checksum mismatch",
            )
            if k in message
        )
    assert len(kinds) >= 4, kinds  # magic, version, length and checksum failures are told apart


@pytest.mark.parametrize("kind", ["random", "text", "empty", "plain_torch_save", "npy", "json"])
def test_foreign_files_are_value_errors(tmp_path, kind):
    path = tmp_path / f"foreign.{kind}"
    rng = np.random.default_rng(0)
    if kind == "random":
        for size in (1, 10, 59, 60, 61, 1000, 100_000):
            path.write_bytes(rng.bytes(size))
            assert "not a gradmix checkpoint" in expect_value_error(path)
        return
    if kind == "text":
        path.write_text("step,loss\n1,2.5\n" * 50)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "plain_torch_save":
        torch.save({"gradmix": {}, "w": torch.ones(3)}, path)
    elif kind == "npy":
        np.save(path.open("wb"), np.ones(3))
    elif kind == "json":
        path.write_text('{"gradmix": {}}')
    message = expect_value_error(path)
    assert "not a gradmix checkpoint" in message
    if kind == "empty":
        assert "empty file" in message
    if kind == "plain_torch_save":
        assert "torch.save" in message


def test_wrong_version_and_missing_file(tmp_path):
    good = bytearray(save_checkpoint_file(small_state(), tmp_path / "good.pt").read_bytes())
    good[16:20] = (2).to_bytes(4, "little")
    (tmp_path / "v2.pt").write_bytes(bytes(good))
    assert "format version 2" in expect_value_error(tmp_path / "v2.pt")
    with pytest.raises(FileNotFoundError, match=r"missing.pt"):
        load_checkpoint_file(tmp_path / "missing.pt")


# -- save refuses what a safe load cannot rebuild --------------------------------------------------------------------
Point = collections.namedtuple("Point", "x y")


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"extra": {"foo": np.ones(3)}}, "state['extra']['foo']"),
        ({"extra": {"foo": [1, np.float64(2.0)]}}, "state['extra']['foo'][1]"),
        ({"a": (1, {"b": np.int64(3)})}, "state['a'][1]['b']"),
        ({"obj": object()}, "state['obj']"),
        ({"pt": Point(1, 2)}, "state['pt']"),
        ({"dd": collections.defaultdict(int)}, "state['dd']"),
        ({"fs": frozenset([1])}, "state['fs']"),
        ({"fn": len}, "state['fn']"),
        ({np.str_("k"): 1}, "state key"),
    ],
)
def test_save_refuses_unsafe_objects_naming_the_key_path(tmp_path, bad, where):
    path = tmp_path / "c.pt"
    save_checkpoint_file({"old": 1}, path)
    with pytest.raises(ValueError) as info:
        save_checkpoint_file(bad, path)
    assert where in str(info.value)
    assert load_checkpoint_file(path) == {"old": 1}  # the previous checkpoint is untouched
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]


def test_save_refuses_tensor_attributes_and_cycles(tmp_path):
    t = torch.ones(2)
    cast(Any, t).meta = np.ones(1)  # an attribute torch.Tensor does not declare
    with pytest.raises(ValueError, match=r"state\['t'\].__dict__\['meta'\]"):
        save_checkpoint_file({"t": t}, tmp_path / "c.pt")
    cyc: list = []
    cyc.append(cyc)
    with pytest.raises(ValueError, match="cycle"):
        save_checkpoint_file({"c": cyc}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="must be a dict"):
        save_checkpoint_file([1, 2], tmp_path / "c.pt")  # type: ignore[arg-type]


def test_shared_references_are_allowed(tmp_path):
    shared = [1, 2]
    save_checkpoint_file({"a": shared, "b": shared}, tmp_path / "c.pt")
    assert load_checkpoint_file(tmp_path / "c.pt") == {"a": [1, 2], "b": [1, 2]}


# -- permissions -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_files_get_normal_permissions(tmp_path, umask, expected):
    old = os.umask(umask)
    try:
        files = [
            atomic_write(tmp_path / "a.bin", lambda fh: fh.write(b"x")),
            atomic_write(tmp_path / "a.txt", lambda fh: fh.write("ü"), mode="w"),
            write_json_atomic(tmp_path / "a.json", {"k": "ü"}),
            save_checkpoint_file(small_state(), tmp_path / "a.pt"),
        ]
    finally:
        os.umask(old)
    for f in files:
        assert f.stat().st_mode & 0o777 == expected, f
    assert (tmp_path / "a.txt").read_bytes() == "ü".encode()


# -- temp-file hygiene -----------------------------------------------------------------------------------------------
def _temp_name(target: str, pid: int, host: str | None = None) -> str:
    from gradmix.checkpoint import _host_tag

    return f".{target}.{host or _host_tag()}.{pid}.0123456789ab.tmp"


def test_stale_temp_files_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "dead": _temp_name("c.pt", dead.pid),
            "own": _temp_name("c.pt", os.getpid()),
            "live": _temp_name("c.pt", live.pid),
            "other_host": _temp_name("c.pt", dead.pid, host="elsewhere-node"),
            "other_target": _temp_name("d.pt", dead.pid),
            "legacy_old": ".c.pt.ab_cd123.tmp",
            "legacy_new": ".c.pt.xy_zw987.tmp",
            "unrelated": "c.pt.tmp",
        }
        for name in names.values():
            (tmp_path / name).write_bytes(b"junk")
        hour_ago = time.time() - 7200
        os.utime(tmp_path / names["legacy_old"], (hour_ago, hour_ago))
        save_checkpoint_file(small_state(), tmp_path / "c.pt")
        left = set(os.listdir(tmp_path))
    finally:
        live.kill()
        live.wait()
    for key in ("dead", "own", "legacy_old"):
        assert names[key] not in left, key
    for key in ("live", "other_host", "other_target", "legacy_new", "unrelated"):
        assert names[key] in left, key


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="zombie detection reads /proc")
def test_temp_file_of_a_killed_unreaped_writer_is_removed(tmp_path):
    """A SIGKILLed writer whose parent has not reaped it yet (a zombie) still counts as dead."""
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.time() + 20
        while Path(f"/proc/{zombie.pid}/stat").read_bytes().rsplit(b")", 1)[1][1:2] != b"Z":
            assert time.time() < deadline, "child did not exit"
            time.sleep(0.01)
        name = _temp_name("c.pt", zombie.pid)
        (tmp_path / name).write_bytes(b"junk")
        save_checkpoint_file(small_state(), tmp_path / "c.pt")
        assert os.listdir(tmp_path) == ["c.pt"]
    finally:
        zombie.wait()


def test_failed_write_leaves_no_temp_file(tmp_path):
    def boom(fh):
        fh.write(b"partial")
        raise RuntimeError("disk on fire")

    atomic_write(tmp_path / "f.bin", lambda fh: fh.write(b"old"))
    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "f.bin", boom)
    assert os.listdir(tmp_path) == ["f.bin"]
    assert (tmp_path / "f.bin").read_bytes() == b"old"


def test_concurrent_threads_do_not_remove_each_others_temp_files(tmp_path):
    errors: list[BaseException] = []
    path = tmp_path / "c.pt"

    def work(k: int) -> None:
        try:
            for i in range(15):
                save_checkpoint_file({"k": k, "i": i, "w": torch.full((20_000,), float(k))}, path)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    loaded = load_checkpoint_file(path)
    assert torch.all(loaded["w"] == float(loaded["k"]))
    assert os.listdir(tmp_path) == ["c.pt"]


_SAVER = r"""
import os, sys, traceback
import torch
from gradmix.checkpoint import save_checkpoint_file
path = sys.argv[1]
for line in sys.stdin:
    base = int(line)
    pid = os.fork()
    if pid == 0:
        try:
            v = base
            while True:
                save_checkpoint_file({"version": v, "data": torch.full((1 << 20,), float(v))}, path)
                v += 1
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(1)
    print(pid, flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


def _read_line(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    assert proc.stdout is not None and proc.stderr is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError("saver process did not answer")
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"saver process died: {proc.stderr.read()}")
    return line.strip()


@pytest.mark.integration
def test_sigkill_during_saves_never_leaves_a_broken_checkpoint_or_orphans(tmp_path):
    """A writer saving ~4 MB checkpoints in a loop is SIGKILLed at random times (forked from one warm process)."""
    target = tmp_path / "ckpt.pt"
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(Path(gradmix.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVER, str(target)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
        env=env,
    )
    assert proc.stdin is not None
    rng = random.Random(1234)
    last_version, orphans_seen, loads = -1, 0, 0
    try:
        for k in range(20):
            proc.stdin.write(f"{k * 10_000}\n")
            proc.stdin.flush()
            pid = int(_read_line(proc))
            time.sleep(rng.uniform(0.0, 0.2) if k else 0.3)
            os.kill(pid, signal.SIGKILL)  # raises ProcessLookupError if the writer died on its own
            assert _read_line(proc) == "reaped"
            orphans_seen += len(list(tmp_path.glob("*.tmp")))
            if target.exists():
                state = load_checkpoint_file(target)
                loads += 1
                v = state["version"]
                assert v >= last_version, "an older checkpoint replaced a newer one"
                assert k * 10_000 <= v < (k + 1) * 10_000 or v == last_version
                assert state["data"].shape == (1 << 20,) and torch.all(state["data"] == float(v))
                last_version = v
    finally:
        proc.stdin.close()
        proc.kill()
        proc.wait()
    assert loads >= 19
    assert orphans_seen > 0, "no kill landed mid-save; the test did not exercise the crash path"
    save_checkpoint_file({"version": -1}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


# -- RNG -------------------------------------------------------------------------------------------------------------
def _draw() -> tuple:
    return torch.rand(5).tolist(), np.random.rand(5).tolist(), [random.random() for _ in range(5)], random.gauss(0, 1)


def test_rng_capture_restore_reproduces_draws(tmp_path):
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    random.gauss(0, 1)
    state = capture_rng_state()
    expected = _draw()
    _draw()
    restore_rng_state(state)
    assert _draw() == expected

    save_checkpoint_file({"rng": state}, tmp_path / "rng.pt")
    loaded = load_checkpoint_file(tmp_path / "rng.pt")["rng"]
    _draw()
    restore_rng_state(loaded)
    assert _draw() == expected


def _corruptions():
    def set_path(state, keys, value):
        d = state
        for k in keys[:-1]:
            d = d[k]
        if value is KeyError:
            del d[keys[-1]]
        else:
            d[keys[-1]] = value
        return state

    return [
        ("format", lambda s: set_path(s, ["format"], "other/1"), "'format'"),
        ("no numpy", lambda s: set_path(s, ["numpy"], KeyError), "'numpy'"),
        ("torch dtype", lambda s: set_path(s, ["torch"], s["torch"].float()), "'torch'"),
        ("torch size", lambda s: set_path(s, ["torch"], s["torch"][:10]), "'torch'"),
        ("numpy key len", lambda s: set_path(s, ["numpy", "key"], s["numpy"]["key"][:5]), "numpy.key"),
        ("numpy key range", lambda s: set_path(s, ["numpy", "key"], s["numpy"]["key"] - 2**40), "numpy.key"),
        ("numpy pos", lambda s: set_path(s, ["numpy", "pos"], 999), "numpy.pos"),
        ("numpy kind", lambda s: set_path(s, ["numpy", "kind"], "PCG64"), "numpy.kind"),
        ("python state", lambda s: set_path(s, ["python", "state"], s["python"]["state"][:10]), "python.state"),
        (
            "python value",
            lambda s: set_path(s, ["python", "state"], [*s["python"]["state"][:-2], "x", 0]),
            "python.state",
        ),
        ("python version", lambda s: set_path(s, ["python", "version"], 2), "python.version"),
        ("python gauss", lambda s: set_path(s, ["python", "gauss_next"], "1.0"), "python.gauss_next"),
        (
            "cuda count",
            lambda s: set_path(s, ["cuda"], [*list(s["cuda"]), torch.zeros(16, dtype=torch.uint8)]),
            "'cuda'",
        ),
    ]


@pytest.mark.parametrize("name, corrupt, field", _corruptions(), ids=[c[0] for c in _corruptions()])
def test_malformed_rng_state_changes_nothing(name, corrupt, field):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = corrupt(capture_rng_state())  # differs from the state below in every generator
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    before = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    with pytest.raises(ValueError) as info:
        restore_rng_state(state)
    assert field in str(info.value)
    assert torch.equal(torch.get_rng_state(), before[0])
    after_np = np.random.get_state()
    # numpy's stubs type get_state() (legacy=True by default: a tuple) as the legacy=False dict
    assert np.array_equal(after_np[1], before[1][1]) and after_np[2:] == before[1][2:]  # type: ignore[index]
    assert random.getstate() == before[2]
