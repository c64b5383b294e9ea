"""Checkpoint files that are atomic, verified and never unpickle arbitrary objects.

Writes go to a temporary file next to the target, are fsynced and then renamed over it (``os.replace``), so a crash,
even SIGKILL, leaves either the old complete file or the new complete one.

A checkpoint file is a fixed header followed by a payload::

    MAGIC (16 bytes) | format version (uint32 LE) | payload length (uint64 LE) | SHA-256 of payload (32 bytes) | payload

The payload is written by ``torch.save`` and read back with ``torch.load(..., weights_only=True)``, which only
rebuilds tensors and plain Python containers/scalars, so a checkpoint cannot run code when loaded. ``save`` refuses
any other object up front, naming where it sits in the state, so a checkpoint that was written can always be read.
The header catches truncation, corruption and foreign files before anything is unpickled.

Temporary files are named ``.{target}.{host}.{pid}.{random}.tmp``. Every atomic write first removes stale temp
files *of the same target*: those written on this host by a process that no longer exists (or is a zombie), and
those of this process that no write in progress owns. Files from other hosts (shared file systems) are left alone,
because their writer's liveness cannot be checked from here. Temp files of the old naming scheme
(``.{target}.XXXXXXXX.tmp``, written before this format) are removed once they are over an hour old.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import io
import json
import os
import random
import re
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

__all__ = [
    "FORMAT_VERSION",
    "atomic_write",
    "capture_rng_state",
    "check_checkpoint_state",
    "load_checkpoint_file",
    "restore_rng_state",
    "save_checkpoint_file",
    "write_json_atomic",
]

MAGIC = b"\x89GRADMIXCKPT\r\n\x1a\n"  # PNG-style: non-ASCII first byte and CR/LF catch text-mode mangling
FORMAT_VERSION = 1
_HEADER = struct.Struct("<16sIQ32s")
HEADER_SIZE = _HEADER.size  # 60 bytes
assert len(MAGIC) == 16

RNG_FORMAT = "gradmix.rng/1"

# ------------------------------------------------------------------------------------------------------------------
# temp-file hygiene
# ------------------------------------------------------------------------------------------------------------------
_ACTIVE_TEMPS: set[str] = set()  # temp files this process is writing right now (other threads must not remove them)
_ACTIVE_LOCK = threading.Lock()
_LEGACY_TEMP_MAX_AGE_S = 3600.0
_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))  # no space left; disk quota exceeded


def _host_tag() -> str:
    """A file-name-safe tag for this host, so temp files from other hosts on a shared folder are never touched."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname() or "host")[:32]
    return host or "host"


def _temp_stem(target: Path) -> str:
    """The target part of temp names; long names are shortened (with a hash) to stay under NAME_MAX."""
    name = target.name
    if len(name) > 150:
        name = name[:100] + "-" + hashlib.sha256(target.name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return name


def _temp_pattern(target: Path) -> re.Pattern[str]:
    return re.compile(
        r"^\." + re.escape(_temp_stem(target)) + r"\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.(?P<rand>[0-9a-f]+)\.tmp$"
    )


def _legacy_temp_pattern(target: Path) -> re.Pattern[str]:
    """``tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp")`` as used by earlier gradmix versions."""
    return re.compile(r"^\." + re.escape(target.name) + r"\.[a-z0-9_]{8}\.tmp$")


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process on this host; zombies (killed, not yet reaped) count as dead."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return True  # cannot tell: be conservative
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
        return stat[stat.rfind(b")") + 2 :][:1] not in (b"Z", b"X")
    except OSError:
        return True


def _remove_stale_temps(target: Path) -> None:
    """Delete temp files of ``target`` left behind by writers that were killed (see the module docstring)."""
    pattern, legacy = _temp_pattern(target), _legacy_temp_pattern(target)
    host, me = _host_tag(), os.getpid()
    try:
        names = os.listdir(target.parent)
    except OSError:
        return
    now = time.time()
    for name in names:
        candidate = target.parent / name
        m = pattern.match(name)
        if m is not None:
            if m["host"] != host:
                continue
            pid = int(m["pid"])
            if pid == me:
                with _ACTIVE_LOCK:
                    if str(candidate) in _ACTIVE_TEMPS:
                        continue
            elif _pid_alive(pid):
                continue
        elif legacy.match(name) is not None:
            try:
                if now - candidate.stat().st_mtime < _LEGACY_TEMP_MAX_AGE_S:
                    continue
            except OSError:
                continue
        else:
            continue
        with contextlib.suppress(OSError):  # already gone, or not ours to remove
            candidate.unlink()


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable; not every platform/file system can open or fsync a directory."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(
    path: str | Path, write: Callable[[Any], None], *, mode: str = "wb", encoding: str | None = None
) -> Path:
    """Call ``write(file_object)`` on a temp file next to ``path``, fsync it and atomically move it into place.

    The file gets the permissions of a normally created file (``0o666 & ~umask``). Text mode defaults to UTF-8.

    A ``path`` that is a symlink is written through: the file it points to is replaced (atomically, by a temp file in
    that file's folder) and the link stays. The link says where the data lives (a checkpoint kept on a bigger disk, a
    name pointing into a shared store): replacing the link by a regular file would move the data beside the link
    and leave the file it points to silently stale. A disk that fills up (ENOSPC, EDQUOT) is an ``OSError`` saying
    "disk full" and naming the file. Returns ``path`` as given.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    given = Path(path)
    path = Path(os.path.realpath(given)) if given.is_symlink() else given
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    prefix = f".{_temp_stem(path)}.{_host_tag()}.{os.getpid()}."
    while True:
        tmp = path.parent / f"{prefix}{secrets.token_hex(6)}.tmp"
        with _ACTIVE_LOCK:
            try:
                fd = os.open(tmp, flags, 0o666)  # the mode passes through the umask, unlike mkstemp's 0600
            except FileExistsError:
                continue
            except OSError as exc:  # a read-only folder, no permission: name the file being written, not the temp
                raise type(exc)(exc.errno, f"cannot write {path}: {exc.strerror}") from exc
            _ACTIVE_TEMPS.add(str(tmp))
        break
    try:
        fh: IO[Any]
        if mode == "wb":
            fh = os.fdopen(fd, "wb")
        else:
            fh = os.fdopen(fd, "w", encoding=encoding or "utf-8")
        with fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            kept = "the previous file is intact" if path.exists() else "nothing was written"
            raise OSError(
                exc.errno, f"disk full: cannot write {path} ({os.strerror(exc.errno or errno.ENOSPC)}); {kept}"
            ) from exc
        raise
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE_TEMPS.discard(str(tmp))
    return given


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented UTF-8 JSON, atomically."""
    return atomic_write(path, lambda fh: fh.write(json.dumps(obj, indent=2, sort_keys=False) + "\n"), mode="w")


# ------------------------------------------------------------------------------------------------------------------
# what a checkpoint may hold
# ------------------------------------------------------------------------------------------------------------------
_SCALARS = (str, bytes, bytearray, int, float, complex, bool, type(None), torch.dtype, torch.device)
_CONTAINERS = (dict, collections.OrderedDict, list, tuple, set, torch.Size)
_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _describe_unsafe(obj: Any) -> str:
    t = type(obj)
    name = f"{t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else t.__qualname__
    if isinstance(obj, np.ndarray):
        hint = "convert it with torch.from_numpy(a) or a.tolist()"
    elif isinstance(obj, np.generic):
        hint = "convert it with .item()"
    elif isinstance(obj, torch.Tensor):
        hint = "store a plain tensor instead (e.g. t.detach().clone() as torch.Tensor, or t.full_tensor() for DTensor)"
    else:
        hint = "store only tensors, dict/list/tuple/set and str/int/float/bool/None (e.g. an object's state_dict())"
    return f"is a {name}, which a safe (weights_only) load cannot rebuild; {hint}"


def _check_safe(obj: Any, where: str, on_path: set[int]) -> None:
    """Raise ValueError naming ``where`` if ``obj`` holds anything ``torch.load(weights_only=True)`` refuses.

    Exact types are compared on purpose: subclasses (numpy.float64 is a float, namedtuples are tuples, defaultdict
    is a dict) pickle as their own class, which the safe loader does not rebuild.
    """
    t = type(obj)
    if t in _SCALARS:
        return
    if t in _TENSORS:
        extra = getattr(obj, "__dict__", None)
        if extra:  # attributes set on a tensor are pickled with it
            _check_container(extra, f"{where}.__dict__", on_path)
        return
    if t in _CONTAINERS:
        _check_container(obj, where, on_path)
        return
    raise ValueError(f"cannot save checkpoint: {where} {_describe_unsafe(obj)}")


def _check_container(obj: Any, where: str, on_path: set[int]) -> None:
    if id(obj) in on_path:
        raise ValueError(f"cannot save checkpoint: {where} contains itself (a reference cycle)")
    on_path.add(id(obj))
    try:
        if isinstance(obj, dict):
            for key, value in obj.items():
                _check_safe(key, f"{where} key {key!r}", on_path)
                _check_safe(value, f"{where}[{key!r}]", on_path)
        elif isinstance(obj, (set, torch.Size)):
            for item in obj:
                _check_safe(item, f"{where} item {item!r}", on_path)
        else:
            for i, item in enumerate(obj):
                _check_safe(item, f"{where}[{i}]", on_path)
    finally:
        on_path.discard(id(obj))


def check_checkpoint_state(state: Any) -> None:
    """Raise ValueError (naming the key path) unless ``state`` is a dict that a weights_only load rebuilds."""
    if type(state) not in (dict, collections.OrderedDict):
        raise ValueError(f"cannot save checkpoint: state must be a dict, got {type(state).__qualname__}")
    _check_safe(state, "state", set())


# ------------------------------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------------------------------
class _HashingWriter:
    """Streams ``torch.save`` output into the file while hashing it, so the payload is never held in memory twice."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh
        self.sha256 = hashlib.sha256()
        self.length = 0
        self.error: OSError | None = None  # torch.save turns a failed write into a RuntimeError without the cause

    def write(self, data: Any) -> int:
        view = memoryview(data)
        try:
            self._fh.write(view)
        except OSError as exc:
            self.error = exc
            raise
        self.sha256.update(view)
        self.length += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self._fh.flush()


def save_checkpoint_file(state: dict[str, Any], path: str | Path) -> Path:
    """Atomically write ``state`` as a verified checkpoint; refuses (ValueError) objects a safe load cannot rebuild."""
    check_checkpoint_state(state)

    def write(fh: Any) -> None:
        fh.write(b"\0" * HEADER_SIZE)  # placeholder until the payload's length and hash are known
        sink = _HashingWriter(fh)
        try:
            # torch.save only needs write()/flush() (documented), but its stub demands IO[bytes]
            torch.save(state, sink)  # type: ignore[arg-type]
        except RuntimeError:
            if sink.error is not None:  # "[enforce fail at inline_container.cc] unexpected pos": the real cause
                raise sink.error from None
            raise
        fh.flush()
        fh.seek(0)
        fh.write(_HEADER.pack(MAGIC, FORMAT_VERSION, sink.length, sink.sha256.digest()))

    return atomic_write(path, write)


def _guess_kind(head: bytes) -> str:
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (e.g. a plain torch.save file)"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "a raw pickle (it will not be unpickled)"
    if head.startswith(b"\x93NUMPY"):
        return "a numpy .npy file"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "unknown binary data"


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Read and verify a checkpoint written by ``save_checkpoint_file``; returns its dict (tensors on CPU).

    Raises FileNotFoundError if ``path`` does not exist and ValueError, naming the file and the problem, for anything
    that is not an intact checkpoint. Never unpickles anything but tensors and plain containers/scalars.
    """
    path = Path(path)
    name = str(path)
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the `with fh:` below; opened apart to name a missing file
    except FileNotFoundError:
        raise FileNotFoundError(2, f"checkpoint {name!r} does not exist", name) from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        header = fh.read(HEADER_SIZE)
        if header[: len(MAGIC)] != MAGIC[: len(header)] or not header:
            raise ValueError(
                f"{name!r} is not a gradmix checkpoint: it is {_guess_kind(header[:64])}, "
                "with no gradmix checkpoint header"
            )
        if len(header) < HEADER_SIZE:
            raise ValueError(
                f"{name!r} is truncated: expected at least {HEADER_SIZE} header bytes, the file has {size}"
            )
        _, version, length, digest = _HEADER.unpack(header)
        if version != FORMAT_VERSION:
            newer = " (written by a newer gradmix?)" if version > FORMAT_VERSION else ""
            raise ValueError(
                f"{name!r} has checkpoint format version {version}{newer}; this gradmix reads version {FORMAT_VERSION}"
            )
        have = size - HEADER_SIZE
        if have < length:
            raise ValueError(
                f"{name!r} is truncated: expected {HEADER_SIZE + length} bytes, the file has {size} "
                "(or its header is corrupted)"
            )
        if have > length:
            raise ValueError(
                f"{name!r} is corrupted: {have - length} unexpected bytes after the "
                f"{HEADER_SIZE + length}-byte checkpoint"
            )
        payload = fh.read(length)
    if len(payload) != length:
        raise ValueError(
            f"{name!r} is truncated: expected {HEADER_SIZE + length} bytes, "
            f"read {HEADER_SIZE + len(payload)} (file changed while reading?)"
        )
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError(f"{name!r}: checksum mismatch (file corrupted)")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # a well-formed but foreign or malicious payload: the safe unpickler refused it
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"{name!r} holds a payload the safe loader refuses ({type(exc).__name__}: {first}); "
            "checkpoints may only contain tensors and plain Python values"
        ) from exc
    if not isinstance(state, dict):
        raise ValueError(f"{name!r} holds a {type(state).__qualname__}, not a checkpoint dict")
    return state


# ------------------------------------------------------------------------------------------------------------------
# RNG state
# ------------------------------------------------------------------------------------------------------------------
_MT_WORDS = 624  # MT19937 key length (numpy and Python's random)


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG a training loop typically draws from, as weights_only-safe values.

    Keys: ``torch`` (CPU generator), ``cuda`` (one state per device, empty without CUDA), ``numpy`` (legacy global
    MT19937), ``python`` (``random`` module). Restore with ``restore_rng_state``.
    """
    kind, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    return {
        "format": RNG_FORMAT,
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(kind),
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(version),
            "state": [int(x) for x in internal],
            "gauss_next": None if gauss_next is None else float(gauss_next),
        },
    }


def _byte_tensor(value: Any, field: str, numel: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise ValueError(f"RNG state field {field!r} must be a 1-D uint8 tensor, got {_short(value)}")
    if value.numel() != numel:
        raise ValueError(f"RNG state field {field!r} has {value.numel()} bytes, expected {numel}")
    return value.detach().cpu().contiguous()


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__qualname__}"


def _int(value: Any, field: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise ValueError(f"RNG state field {field!r} must be an int in [{lo}, {hi}], got {value!r}")
    return value


def _words(value: Any, field: str, count: int) -> list[int]:
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(f"RNG state field {field!r} must be a 1-D integer tensor, got {_short(value)}")
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or len(value) != count:
        length = len(value) if isinstance(value, (list, tuple)) else None
        raise ValueError(
            f"RNG state field {field!r} must hold {count} integers, got {_short(value)}"
            + (f" of length {length}" if length is not None else "")
        )
    for i, word in enumerate(value):
        _int(word, f"{field}[{i}]", 0, 2**32 - 1)
    return list(value)


def restore_rng_state(state: dict[str, Any], *, strict_cuda: bool = True) -> None:
    """Restore what ``capture_rng_state`` returned; everything is validated before any generator is touched.

    A bad state raises ValueError naming the field, with all RNGs unchanged. CUDA states must match the visible
    devices (count and availability) unless ``strict_cuda=False``, which restores the devices both sides have.
    """
    if not isinstance(state, dict):
        raise ValueError(f"RNG state must be a dict, got {_short(state)}")
    if state.get("format") != RNG_FORMAT:
        raise ValueError(f"RNG state field 'format' must be {RNG_FORMAT!r}, got {state.get('format')!r}")
    for key in ("torch", "cuda", "numpy", "python"):
        if key not in state:
            raise ValueError(f"RNG state field {key!r} is missing")

    torch_state = _byte_tensor(state["torch"], "torch", torch.get_rng_state().numel())

    cuda = state["cuda"]
    if not isinstance(cuda, (list, tuple)):
        raise ValueError(f"RNG state field 'cuda' must be a list of tensors, got {_short(cuda)}")
    n_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if strict_cuda and len(cuda) != n_devices:
        raise ValueError(
            f"RNG state field 'cuda' holds {len(cuda)} device states but {n_devices} CUDA devices are "
            "visible; pass strict_cuda=False to restore only the devices both have"
        )
    cuda_states = [
        _byte_tensor(s, f"cuda[{i}]", torch.cuda.get_rng_state(i).numel()) for i, s in enumerate(cuda[:n_devices])
    ]

    np_state = state["numpy"]
    if not isinstance(np_state, dict):
        raise ValueError(f"RNG state field 'numpy' must be a dict, got {_short(np_state)}")
    for key in ("kind", "key", "pos", "has_gauss", "cached_gaussian"):
        if key not in np_state:
            raise ValueError(f"RNG state field 'numpy.{key}' is missing")
    if np_state["kind"] != "MT19937":
        raise ValueError(f"RNG state field 'numpy.kind' must be 'MT19937', got {np_state['kind']!r}")
    np_key = np.asarray(_words(np_state["key"], "numpy.key", _MT_WORDS), dtype=np.uint32)
    np_pos = _int(np_state["pos"], "numpy.pos", 0, _MT_WORDS)
    np_has_gauss = _int(np_state["has_gauss"], "numpy.has_gauss", 0, 1)
    if type(np_state["cached_gaussian"]) is not float:
        raise ValueError(
            f"RNG state field 'numpy.cached_gaussian' must be a float, got {_short(np_state['cached_gaussian'])}"
        )
    np_tuple = ("MT19937", np_key, np_pos, np_has_gauss, np_state["cached_gaussian"])

    py = state["python"]
    if not isinstance(py, dict):
        raise ValueError(f"RNG state field 'python' must be a dict, got {_short(py)}")
    for key in ("version", "state", "gauss_next"):
        if key not in py:
            raise ValueError(f"RNG state field 'python.{key}' is missing")
    if py["version"] != 3:
        raise ValueError(f"RNG state field 'python.version' must be 3, got {py['version']!r}")
    py_words = _words(py["state"], "python.state", _MT_WORDS + 1)
    _int(py_words[-1], f"python.state[{_MT_WORDS}]", 0, _MT_WORDS)
    if py["gauss_next"] is not None and type(py["gauss_next"]) is not float:
        raise ValueError(f"RNG state field 'python.gauss_next' must be a float or None, got {_short(py['gauss_next'])}")
    py_tuple = (3, tuple(py_words), py["gauss_next"])

    # Dry runs on throw-away generators, so a state the libraries themselves reject fails before anything changes.
    try:
        random.Random().setstate(py_tuple)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ValueError(f"RNG state field 'python' is rejected by random.setstate: {exc}") from None
    try:
        np.random.RandomState().set_state(np_tuple)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"RNG state field 'numpy' is rejected by numpy: {exc}") from None
    try:
        torch.Generator().set_state(torch_state)
    except RuntimeError as exc:
        raise ValueError(f"RNG state field 'torch' is rejected by torch: {exc}") from None

    random.setstate(py_tuple)
    np.random.set_state(np_tuple)
    torch.set_rng_state(torch_state)
    for i, s in enumerate(cuda_states):
        torch.cuda.set_rng_state(s, i)
