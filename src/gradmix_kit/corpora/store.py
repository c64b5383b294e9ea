"""On-disk layout of a built corpus: ``DATA/<corpus>/<domain>.jsonl`` (one ``{"text": ...}`` per line) and
``DATA/<corpus>/manifest.json`` (sources, sizes and SHA-256 of every domain file, build parameters and time).

Every file is written to a temporary file in the same folder and renamed into place, so a reader never sees half
a file; the manifest is written last, so a build that dies midway leaves either the old manifest (whose checksums
then fail) or none.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gradmix_kit.corpora.errors import CorpusError

__all__ = [
    "DATA_DIR_ENV",
    "DEFAULT_DATA_DIR",
    "MANIFEST_FORMAT_VERSION",
    "MANIFEST_NAME",
    "DomainRecord",
    "Manifest",
    "atomic_write_bytes",
    "default_data_dir",
    "find_corrupt_files",
    "read_jsonl",
    "read_manifest",
    "resolve_data_dir",
    "sha256_file",
    "write_jsonl",
    "write_manifest",
]

MANIFEST_NAME = "manifest.json"

# Where corpora, downloads, tokenizers and embedding caches live: ``$GRADMIX_DATA`` if set, else this folder.
DATA_DIR_ENV = "GRADMIX_DATA"
DEFAULT_DATA_DIR = Path("~") / ".cache" / "gradmix"
MANIFEST_FORMAT_VERSION = 1


@dataclass(frozen=True)
class DomainRecord:
    """What the manifest says about one domain file."""

    file: str
    source_kind: str  # "deb", "wheel" or "python-stdlib"
    source_package: str
    source_version: str
    num_docs: int
    num_chars: int
    sha256: str
    source_detail: str = ""  # which files of the package, which labels, ...


@dataclass(frozen=True)
class Manifest:
    """A built corpus: its domains in order, the parameters it was built with and when."""

    corpus: str
    domains: dict[str, DomainRecord]
    params: dict[str, Any]
    built_at: str
    build_seconds: float
    format_version: int = MANIFEST_FORMAT_VERSION
    targets: dict[str, str] = field(default_factory=dict)  # target name -> corpus that holds it

    @property
    def num_docs(self) -> dict[str, int]:
        return {name: record.num_docs for name, record in self.domains.items()}

    @property
    def num_chars(self) -> dict[str, int]:
        return {name: record.num_chars for name, record in self.domains.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "corpus": self.corpus,
            "built_at": self.built_at,
            "build_seconds": self.build_seconds,
            "params": self.params,
            "targets": self.targets,
            "domains": {name: asdict(record) for name, record in self.domains.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "manifest") -> Manifest:
        try:
            version = int(data["format_version"])
            if version != MANIFEST_FORMAT_VERSION:
                raise CorpusError(
                    f"{where}: format_version {version} is not supported (expected {MANIFEST_FORMAT_VERSION}); "
                    "rebuild the corpus"
                )
            domains = {str(name): DomainRecord(**record) for name, record in data["domains"].items()}
            return cls(
                corpus=str(data["corpus"]),
                domains=domains,
                params=dict(data["params"]),
                built_at=str(data["built_at"]),
                build_seconds=float(data["build_seconds"]),
                format_version=version,
                targets=dict(data.get("targets", {})),
            )
        except CorpusError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CorpusError(f"{where}: malformed manifest ({type(exc).__name__}: {exc}); rebuild the corpus") from exc


def default_data_dir() -> Path:
    """The kit's data folder: ``$GRADMIX_DATA`` if set, else ``DEFAULT_DATA_DIR`` (``~/.cache/gradmix``)."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else DEFAULT_DATA_DIR.expanduser()


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """``data_dir`` (``~`` expanded) when given, else ``default_data_dir()``."""
    return Path(data_dir).expanduser() if data_dir not in (None, "") else default_data_dir()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with ``gradmix.checkpoint.atomic_write`` (temp file in the same folder, fsync,
    rename; normal file permissions)."""
    from gradmix.checkpoint import atomic_write

    atomic_write(path, lambda handle: handle.write(data))


def write_jsonl(path: Path, docs: Iterable[str]) -> str:
    """Write documents as JSON lines (``{"text": ...}``) atomically; returns the SHA-256 of the file."""
    data = "".join(json.dumps({"text": doc}, ensure_ascii=False) + "\n" for doc in docs).encode("utf-8")
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def read_jsonl(path: Path) -> list[str]:
    """The documents of a JSON-lines file, read by ``gradmix.sources.read_documents`` (the one document reader);
    a malformed line raises ``CorpusError`` naming file and line."""
    from gradmix.sources import read_documents

    try:
        return read_documents(Path(path))
    except (ValueError, AttributeError) as exc:  # AttributeError: a non-string "text" (see read_documents)
        raise CorpusError(str(exc)) from exc


def write_manifest(corpus_dir: Path, manifest: Manifest) -> Path:
    path = Path(corpus_dir) / MANIFEST_NAME
    text = json.dumps(manifest.to_dict(), ensure_ascii=False, indent=2, sort_keys=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def read_manifest(corpus_dir: Path) -> Manifest | None:
    """The manifest of a corpus folder, or ``None`` when there is none; unreadable -> CorpusError."""
    path = Path(corpus_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorpusError(f"{path}: not valid JSON ({exc}); delete it or rebuild the corpus") from exc
    return Manifest.from_dict(data, where=str(path))


def find_corrupt_files(corpus_dir: Path, manifest: Manifest) -> list[str]:
    """Problems with the domain files of a manifest (missing file, checksum mismatch); empty when all is well."""
    problems: list[str] = []
    for name, record in manifest.domains.items():
        path = Path(corpus_dir) / record.file
        if not path.is_file():
            problems.append(f"domain {name!r}: file {path} is missing")
        elif sha256_file(path) != record.sha256:
            problems.append(f"domain {name!r}: file {path} does not match its SHA-256 in the manifest")
    return problems
