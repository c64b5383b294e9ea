"""Fetching registry packages without installing them.

- Debian: ``apt-get download NAME`` into a cache folder, then ``dpkg-deb -x`` into a folder of its own (nothing
  is installed, no maintainer script runs). When the download fails and apt's package lists are empty, the error
  says to run ``apt-get update``; running as root, the fetcher first tries ``apt-get update`` once itself
  (``allow_apt_update=True``), since that is the only step a fresh Debian machine lacks.
- PyPI: ``python -m pip download --no-deps --only-binary=:all: NAME==VERSION`` and the wheel is read as a zip
  file (no install, no build step, no dependency resolution).

Downloads are kept under ``<cache_dir>/debs``, ``<cache_dir>/wheels`` and ``<cache_dir>/unpacked`` and reused, so a
rebuild needs no network. Every command runs with a timeout; any failure raises ``FetchError`` naming the package
and the command.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from gradmix_kit.corpora.errors import FetchError

__all__ = [
    "APT_LISTS_DIR",
    "DirectorySource",
    "FetchedPackage",
    "FetchedSource",
    "WheelSource",
    "apt_lists_present",
    "fetch_deb",
    "fetch_wheel",
    "run_tool",
    "unpack_deb",
]

APT_LISTS_DIR = Path("/var/lib/apt/lists")
DOWNLOAD_TIMEOUT_S = 600.0
UNPACK_TIMEOUT_S = 300.0

_DEB_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_DEB_VERSION = re.compile(r"^[A-Za-z0-9.+~:-]+$")
_PYPI_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
_PYPI_VERSION = re.compile(r"^[A-Za-z0-9.+!_-]+$")


@dataclass(frozen=True)
class FetchedPackage:
    """A downloaded package file."""

    kind: str  # "deb" or "wheel"
    name: str
    version: str
    path: Path


def _command_text(cmd: Sequence[str]) -> str:
    return shlex.join(str(part) for part in cmd)


def _tail(text: str, lines: int = 8) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_tool(
    cmd: Sequence[str], *, package: str, timeout: float, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run one command with a timeout; a missing program or a timeout raises FetchError naming ``package``."""
    program = str(cmd[0])
    if os.sep not in program and shutil.which(program) is None:
        raise FetchError(
            f"cannot fetch {package!r}: the program {program!r} is not installed (needed for `{_command_text(cmd)}`)"
        )
    try:
        return subprocess.run(
            [str(part) for part in cmd],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise FetchError(f"cannot fetch {package!r}: `{_command_text(cmd)}` timed out after {timeout:.0f} s") from exc
    except OSError as exc:
        raise FetchError(f"cannot fetch {package!r}: `{_command_text(cmd)}` could not start ({exc})") from exc


def apt_lists_present(lists_dir: Path = APT_LISTS_DIR) -> bool:
    """Whether apt has package lists (``apt-get update`` has run); without them no package can be found."""
    lists_dir = Path(lists_dir)
    return lists_dir.is_dir() and any(lists_dir.glob("*_Packages*"))


def _deb_version(path: Path, package: str, timeout: float) -> str:
    cmd = ["dpkg-deb", "-f", str(path), "Version"]
    proc = run_tool(cmd, package=package, timeout=timeout)
    version = proc.stdout.strip()
    if proc.returncode != 0 or not version:
        raise FetchError(
            f"cannot read the version of Debian package {package!r}: `{_command_text(cmd)}` failed "
            f"(exit {proc.returncode}): {_tail(proc.stderr)}"
        )
    return version


def _safe_version(version: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+~-]", "_", version)


def fetch_deb(
    name: str,
    cache_dir: Path,
    *,
    version: str | None = None,
    allow_apt_update: bool = True,
    lists_dir: Path = APT_LISTS_DIR,
    timeout: float = DOWNLOAD_TIMEOUT_S,
) -> FetchedPackage:
    """The ``.deb`` of a Debian package, from ``<cache_dir>/debs`` or downloaded with ``apt-get download``.

    Args:
        name: binary package name.
        version: exact version to download (``apt-get download NAME=VERSION``); ``None`` takes the candidate
            version of the configured suite and records it.
        allow_apt_update: when the download fails, apt has no package lists and this process is root, run
            ``apt-get update`` once and retry. Otherwise the error tells the user to run it.
    """
    if not _DEB_NAME.match(name):
        raise FetchError(f"{name!r} is not a valid Debian package name")
    if version is not None and not _DEB_VERSION.match(version):
        raise FetchError(f"{version!r} is not a valid Debian version for package {name!r}")
    debs_dir = Path(cache_dir) / "debs"
    debs_dir.mkdir(parents=True, exist_ok=True)
    cached = sorted(debs_dir.glob(f"{name}_*.deb"))
    for path in cached:
        cached_version = _deb_version(path, name, UNPACK_TIMEOUT_S)
        if version is None or cached_version == version:
            return FetchedPackage("deb", name, cached_version, path)

    spec = name if version is None else f"{name}={version}"
    cmd = ["apt-get", "download", spec]
    with tempfile.TemporaryDirectory(dir=debs_dir, prefix=".download-") as tmp:
        proc = run_tool(cmd, package=name, timeout=timeout, cwd=Path(tmp))
        if proc.returncode != 0 and not apt_lists_present(lists_dir):
            if allow_apt_update and hasattr(os, "geteuid") and os.geteuid() == 0:
                update = ["apt-get", "update"]
                upd = run_tool(update, package=name, timeout=timeout)
                if upd.returncode != 0:
                    raise FetchError(
                        f"cannot fetch Debian package {name!r}: apt has no package lists and "
                        f"`{_command_text(update)}` failed (exit {upd.returncode}): {_tail(upd.stderr)}"
                    )
                proc = run_tool(cmd, package=name, timeout=timeout, cwd=Path(tmp))
            else:
                raise FetchError(
                    f"cannot fetch Debian package {name!r}: `{_command_text(cmd)}` failed and apt has no package "
                    f"lists in {lists_dir}; run `apt-get update` (as root) first. apt said: {_tail(proc.stderr)}"
                )
        if proc.returncode != 0:
            raise FetchError(
                f"cannot fetch Debian package {name!r}: `{_command_text(cmd)}` failed (exit {proc.returncode}): "
                f"{_tail(proc.stderr)}. If the package exists, `apt-get update` refreshes stale package lists."
            )
        downloaded = sorted(Path(tmp).glob("*.deb"))
        if len(downloaded) != 1:
            raise FetchError(
                f"cannot fetch Debian package {name!r}: `{_command_text(cmd)}` left {len(downloaded)} .deb files"
            )
        got_version = _deb_version(downloaded[0], name, UNPACK_TIMEOUT_S)
        target = debs_dir / f"{name}_{_safe_version(got_version)}.deb"
        os.replace(downloaded[0], target)
    for old in cached:
        if old != target:
            old.unlink(missing_ok=True)
    return FetchedPackage("deb", name, got_version, target)


def unpack_deb(package: FetchedPackage, cache_dir: Path, *, timeout: float = UNPACK_TIMEOUT_S) -> Path:
    """Unpack a ``.deb`` (its files only, nothing installed) into ``<cache_dir>/unpacked/NAME_VERSION``; reused
    when a previous unpack completed."""
    dest = Path(cache_dir) / "unpacked" / f"{package.name}_{_safe_version(package.version)}"
    marker = dest / ".complete"
    if marker.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        cmd = ["dpkg-deb", "-x", str(package.path), str(tmp)]
        proc = run_tool(cmd, package=package.name, timeout=timeout)
        if proc.returncode != 0:
            raise FetchError(
                f"cannot unpack Debian package {package.name!r}: `{_command_text(cmd)}` failed "
                f"(exit {proc.returncode}): {_tail(proc.stderr)}"
            )
        (tmp / ".complete").write_text(package.version + "\n", encoding="utf-8")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _normalized_wheel_name(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def fetch_wheel(name: str, version: str, cache_dir: Path, *, timeout: float = DOWNLOAD_TIMEOUT_S) -> FetchedPackage:
    """The wheel ``NAME==VERSION`` from ``<cache_dir>/wheels`` or downloaded with ``pip download`` (no deps, wheels
    only, nothing installed)."""
    if not _PYPI_NAME.match(name):
        raise FetchError(f"{name!r} is not a valid PyPI package name")
    if not version or not _PYPI_VERSION.match(version):
        raise FetchError(f"package {name!r}: {version!r} is not a valid pinned version (give NAME==VERSION)")
    wheels_dir = Path(cache_dir) / "wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    prefix = f"{_normalized_wheel_name(name)}-{version}-".lower()
    for path in sorted(wheels_dir.glob("*.whl")):
        if path.name.lower().startswith(prefix):
            return FetchedPackage("wheel", name, version, path)
    with tempfile.TemporaryDirectory(dir=wheels_dir, prefix=".download-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--no-input", "--retries", "2", "--timeout", "60",
            f"{name}=={version}", "-d", tmp,
        ]  # fmt: skip
        proc = run_tool(cmd, package=name, timeout=timeout)
        if proc.returncode != 0:
            raise FetchError(
                f"cannot fetch PyPI package {name}=={version}: `{_command_text(cmd)}` failed "
                f"(exit {proc.returncode}): {_tail(proc.stderr or proc.stdout)}"
            )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise FetchError(f"cannot fetch PyPI package {name}=={version}: pip left {len(wheels)} wheel files")
        target = wheels_dir / wheels[0].name
        os.replace(wheels[0], target)
    return FetchedPackage("wheel", name, version, target)


# ---------------------------------------------------------------------------------------------------------------
# read access to a fetched package, the same for an unpacked folder and a wheel
# ---------------------------------------------------------------------------------------------------------------


class FetchedSource(Protocol):
    """Files of a fetched package, addressed by POSIX paths relative to its root."""

    kind: str
    name: str
    version: str

    def list_files(self, prefix: str = "", suffix: str = "") -> list[str]: ...

    def read_bytes(self, path: str) -> bytes: ...


class DirectorySource:
    """A package unpacked into a folder (a Debian package, the Python standard library, a test fixture)."""

    def __init__(self, root: Path, *, kind: str, name: str, version: str) -> None:
        self.root = Path(root)
        self.kind = kind
        self.name = name
        self.version = version

    def list_files(self, prefix: str = "", suffix: str = "") -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.exists():
            return []
        found = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for filename in filenames:
                full = Path(dirpath) / filename
                if full.is_file() and filename.endswith(suffix):
                    found.append(PurePosixPath(full.relative_to(self.root)).as_posix())
        return sorted(found)

    def read_bytes(self, path: str) -> bytes:
        full = self.root / path
        if not full.is_file():
            raise FileNotFoundError(f"{self.kind} package {self.name} {self.version} has no file {path!r}")
        return full.read_bytes()


class WheelSource:
    """A wheel read as a zip file (kept open until ``close()``: reopening a 37,000-member zip per file is slow)."""

    def __init__(self, path: Path, *, name: str, version: str) -> None:
        self.path = Path(path)
        self.kind = "wheel"
        self.name = name
        self.version = version
        try:
            self._archive = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise FetchError(f"wheel of {name}=={version} at {self.path} is not a valid zip file; delete it") from exc
        self._names = sorted(n for n in self._archive.namelist() if not n.endswith("/"))

    def list_files(self, prefix: str = "", suffix: str = "") -> list[str]:
        return [n for n in self._names if n.startswith(prefix) and n.endswith(suffix)]

    def read_bytes(self, path: str) -> bytes:
        try:
            return self._archive.read(path)
        except KeyError:
            raise FileNotFoundError(f"wheel {self.name}=={self.version} has no file {path!r}") from None

    def close(self) -> None:
        self._archive.close()
