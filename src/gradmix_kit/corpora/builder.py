"""Build, cache and load the named corpora.

``build_corpus(name, data_dir)`` fetches the registry packages behind a corpus (see ``sources``), extracts and
cleans documents, and writes ``DATA/<folder>/<domain>.jsonl`` plus ``DATA/<folder>/manifest.json``; the folder is
``<name>`` for the default parameters and ``<name>-<hash of the parameters>`` for others (``corpus_folder``), so builds
with other languages or caps live side by side and never replace one another. A second call with the same parameters
finds the manifest, checks every file's SHA-256 and returns at once without fetching; a missing or corrupted file
triggers a rebuild (with a warning) from the download cache (``DATA/_downloads``), which needs no network once the
packages are there. A folder the builder did not make (no build marker: e.g. a custom corpus a user put into the data
folder under a corpus's name) is never rebuilt or deleted: that is a ``CorpusError``. Output is deterministic for
the same package versions: documents keep source order and sampling (``max_docs_per_domain`` /
``max_chars_per_domain``) is content-addressed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from gradmix_kit.corpora.errors import CorpusError
from gradmix_kit.corpora.fetch import (
    DirectorySource,
    FetchedSource,
    WheelSource,
    fetch_deb,
    fetch_wheel,
    unpack_deb,
)
from gradmix_kit.corpora.sources import CORPORA, TARGET_LABELS, CorpusSpec, PackageSource, stdlib_root_and_version
from gradmix_kit.corpora.store import (
    DATA_DIR_ENV,
    MANIFEST_NAME,
    DomainRecord,
    Manifest,
    default_data_dir,
    find_corrupt_files,
    read_jsonl,
    read_manifest,
    resolve_data_dir,
    write_jsonl,
    write_manifest,
)
from gradmix_kit.corpora.text import DEFAULT_MAX_DOC_CHARS, DEFAULT_MIN_DOC_CHARS, clean_documents, select_documents
from gradmix_kit.progress import progress_bar

__all__ = [
    "DATA_DIR_ENV",
    "PackageFetcher",
    "SourceFetcher",
    "available_corpora",
    "available_languages",
    "available_targets",
    "build_corpus",
    "build_target",
    "corpus_folder",
    "default_data_dir",
    "load_corpus",
    "load_manifest",
]

DOWNLOADS_SUBDIR = "_downloads"
BUILD_MARKER = ".gradmix-build"  # written first into every folder the builder makes: only those may be rebuilt

_log = logging.getLogger(__name__)


def _resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    return resolve_data_dir(data_dir)


def available_corpora() -> list[str]:
    """Names ``build_corpus`` accepts (target sets included, as ``target_<name>``)."""
    return list(CORPORA)


def available_targets() -> list[str]:
    """Names ``build_target`` accepts."""
    return list(TARGET_LABELS)


def available_languages(name: str) -> list[str]:
    """Language codes a multilingual corpus can build (empty for the others)."""
    return list(_spec(name).languages)


def _spec(name: str) -> CorpusSpec:
    try:
        return CORPORA[name]
    except KeyError:
        raise CorpusError(f"unknown corpus {name!r}; available: {', '.join(CORPORA)}") from None


class PackageFetcher(Protocol):
    """Gives read access to the files of a package."""

    def get(self, source: PackageSource) -> FetchedSource: ...


class SourceFetcher:
    """Fetches each package at most once per build and gives read access to its files."""

    def __init__(self, cache_dir: Path, *, allow_apt_update: bool = True) -> None:
        self.cache_dir = Path(cache_dir)
        self.allow_apt_update = allow_apt_update
        self._opened: dict[PackageSource, FetchedSource] = {}

    def get(self, source: PackageSource) -> FetchedSource:
        if source not in self._opened:
            self._opened[source] = self._open(source)
        return self._opened[source]

    def _open(self, source: PackageSource) -> FetchedSource:
        if source.kind == "deb":
            package = fetch_deb(
                source.name, self.cache_dir, version=source.version, allow_apt_update=self.allow_apt_update
            )
            root = unpack_deb(package, self.cache_dir)
            return DirectorySource(root, kind="deb", name=package.name, version=package.version)
        if source.kind == "wheel":
            if source.version is None:
                raise CorpusError(f"PyPI source {source.name!r} needs a pinned version")
            package = fetch_wheel(source.name, source.version, self.cache_dir)
            return WheelSource(package.path, name=package.name, version=package.version)
        if source.kind == "python-stdlib":
            stdlib_root, version = stdlib_root_and_version()
            return DirectorySource(Path(stdlib_root), kind="python-stdlib", name=source.name, version=version)
        raise CorpusError(f"unknown source kind {source.kind!r} for package {source.name!r}")

    def close(self) -> None:
        for opened in self._opened.values():
            close = getattr(opened, "close", None)
            if close is not None:
                close()
        self._opened.clear()

    def __enter__(self) -> SourceFetcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _check_limit(value: int | None, field: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise CorpusError(f"{field} must be a positive integer or None, got {value!r}")


def build_corpus(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    max_docs_per_domain: int | None = None,
    max_chars_per_domain: int | None = None,
    languages: Sequence[str] | None = None,
    allow_apt_update: bool = True,
    fetcher: PackageFetcher | None = None,
    progress: bool | None = True,
) -> Manifest:
    """Build corpus ``name`` under ``data_dir`` (default ``$GRADMIX_DATA`` or ``~/.cache/gradmix``) and return its
    manifest; a complete, checksum-valid build with the same parameters is returned without fetching anything.

    Args:
        name: one of ``available_corpora()``.
        max_docs_per_domain, max_chars_per_domain: cap every domain (content-addressed sample, see
            ``text.select_documents``); ``None`` keeps everything.
        languages: language codes for the multilingual corpora (``available_languages(name)``); ``None`` takes
            the defaults. Must be ``None`` for the others.
        allow_apt_update: see ``fetch.fetch_deb``: when running as root with empty apt lists, run
            ``apt-get update`` once.
        fetcher: where packages come from; default a ``SourceFetcher`` on ``DATA/_downloads``. Any object with
            ``get(PackageSource) -> FetchedSource`` works (tests build from synthetic package trees).
        progress: a bar over the domains on standard error while building (a first build takes minutes); shown
            only on a terminal and without ``GRADMIX_NO_PROGRESS`` (``gradmix_kit.progress``). A cached build shows
            nothing.
    """
    spec = _spec(name)
    params = _build_params(spec, max_docs_per_domain, max_chars_per_domain, languages)
    domains = spec.domains(languages)
    root = _resolve_data_dir(data_dir)
    corpus_dir = root / _folder_name(name, spec, params)

    previous: Manifest | None = None
    if corpus_dir.exists():
        ours = (corpus_dir / BUILD_MARKER).is_file()
        try:
            previous = read_manifest(corpus_dir)
        except CorpusError as exc:
            if not ours:
                raise CorpusError(
                    f"corpus {name!r}: {corpus_dir} holds an unreadable manifest and was not made by "
                    f"gradmix's builder; move it away or choose another data_dir ({exc})"
                ) from exc
            _log.warning("corpus %s: %s; rebuilding", name, exc)
        if not ours and (previous is None or previous.corpus != name) and any(corpus_dir.iterdir()):
            what = "no manifest" if previous is None else f"a manifest of corpus {previous.corpus!r}"
            raise CorpusError(
                f"corpus {name!r}: {corpus_dir} already holds files ({what}) that gradmix's builder did not write; "
                "it never rebuilds or deletes such a folder - move it away, or point data.corpus at it as a custom "
                "corpus folder"
            )
    if previous is not None and previous.params == params:
        problems = find_corrupt_files(corpus_dir, previous)
        if not problems:
            _log.info("corpus %s: cached build in %s is complete and valid", name, corpus_dir)
            return previous
        _log.warning("corpus %s: rebuilding, the cache is damaged: %s", name, "; ".join(problems))
    corpus_dir.mkdir(parents=True, exist_ok=True)
    (corpus_dir / BUILD_MARKER).write_text(json.dumps({"corpus": name, "params": params}) + "\n", encoding="utf-8")

    started = time.monotonic()
    records: dict[str, DomainRecord] = {}
    owned: SourceFetcher | None = None
    active: PackageFetcher
    if fetcher is None:
        active = owned = SourceFetcher(root / DOWNLOADS_SUBDIR, allow_apt_update=allow_apt_update)
    else:
        active = fetcher
    bar = progress_bar(len(domains), f"building corpus {name}", progress=progress, unit="domain", leave=True)
    try:
        for domain in domains:
            bar.set_postfix_str(f"{domain.name}: fetching {domain.source.name}")
            source = active.get(domain.source)
            _log.info("corpus %s: domain %s from %s %s", name, domain.name, source.name, source.version)
            bar.set_postfix_str(f"{domain.name}: extracting from {source.name} {source.version}")
            docs = clean_documents(domain.extract(source))
            if not docs:
                raise CorpusError(
                    f"corpus {name!r}, domain {domain.name!r}: no documents found in {source.kind} package "
                    f"{source.name} {source.version} ({domain.detail})"
                )
            docs = select_documents(docs, max_docs=max_docs_per_domain, max_chars=max_chars_per_domain)
            if not docs:
                raise CorpusError(
                    f"corpus {name!r}, domain {domain.name!r}: max_chars_per_domain={max_chars_per_domain} is "
                    "smaller than every document; raise it"
                )
            filename = f"{domain.name}.jsonl"
            digest = write_jsonl(corpus_dir / filename, docs)
            records[domain.name] = DomainRecord(
                file=filename,
                source_kind=source.kind,
                source_package=source.name,
                source_version=source.version,
                num_docs=len(docs),
                num_chars=sum(len(doc) for doc in docs),
                sha256=digest,
                source_detail=domain.detail,
            )
            bar.update(1)
    finally:
        bar.close()
        if owned is not None:
            owned.close()
    manifest = Manifest(
        corpus=name,
        domains=records,
        params=params,
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        build_seconds=round(time.monotonic() - started, 3),
        targets={target: f"target_{target}" for target in spec.targets},
    )
    write_manifest(corpus_dir, manifest)
    if previous is not None:  # domain files the new build no longer lists (same parameters, other sources)
        for old_name, record in previous.domains.items():
            if old_name not in records and (corpus_dir / record.file).exists():
                _log.warning("corpus %s: removing %s, a domain the new build no longer has", name, record.file)
                (corpus_dir / record.file).unlink()
    return manifest


def _build_params(
    spec: CorpusSpec, max_docs: int | None, max_chars: int | None, languages: Sequence[str] | None
) -> dict[str, Any]:
    _check_limit(max_docs, "max_docs_per_domain")
    _check_limit(max_chars, "max_chars_per_domain")
    domains = spec.domains(languages)
    return {
        "max_docs_per_domain": max_docs,
        "max_chars_per_domain": max_chars,
        "languages": [d.name for d in domains] if spec.languages else None,
        "max_doc_chars": DEFAULT_MAX_DOC_CHARS,
        "min_doc_chars": DEFAULT_MIN_DOC_CHARS,
    }


def _folder_name(name: str, spec: CorpusSpec, params: dict[str, Any]) -> str:
    if params == _build_params(spec, None, None, None):
        return name
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    return f"{name}-{digest}"


def corpus_folder(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    max_docs_per_domain: int | None = None,
    max_chars_per_domain: int | None = None,
    languages: Sequence[str] | None = None,
) -> Path:
    """The folder ``build_corpus`` uses for these parameters: ``DATA/<name>`` for the defaults, else
    ``DATA/<name>-<hash of the parameters>`` (pass it to ``load_corpus``)."""
    spec = _spec(name)
    params = _build_params(spec, max_docs_per_domain, max_chars_per_domain, languages)
    return _resolve_data_dir(data_dir) / _folder_name(name, spec, params)


def _corpus_dir(name_or_path: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None) -> Path:
    candidate = Path(name_or_path).expanduser()
    if candidate.is_file() and candidate.name == MANIFEST_NAME:
        return candidate.parent
    if (candidate / MANIFEST_NAME).is_file():
        return candidate
    if isinstance(name_or_path, str) and name_or_path in CORPORA:
        return _resolve_data_dir(data_dir) / name_or_path
    raise CorpusError(
        f"{str(name_or_path)!r} is neither a built corpus folder (no {MANIFEST_NAME} there) nor a corpus name "
        f"({', '.join(CORPORA)})"
    )


def _require_manifest(corpus_dir: Path, label: str) -> Manifest:
    manifest = read_manifest(corpus_dir)
    if manifest is None:
        raise CorpusError(
            f"corpus {label!r} is not built in {corpus_dir}; build it first with "
            f"gradmix_kit.corpora.build_corpus({label!r}, data_dir=...)"
        )
    return manifest


def load_manifest(name_or_path: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None) -> Manifest:
    """The manifest of a built corpus (by name under ``data_dir``, or by folder path)."""
    return _require_manifest(_corpus_dir(name_or_path, data_dir), str(name_or_path))


def load_corpus(
    name_or_path: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    *,
    verify: bool = True,
    max_docs_per_domain: int | None = None,
    max_chars_per_domain: int | None = None,
    languages: Sequence[str] | None = None,
) -> dict[str, list[str]]:
    """Documents of a built corpus, domain -> list of texts, in manifest order. A corpus name with the build's
    parameters (the same ``max_docs_per_domain`` / ``max_chars_per_domain`` / ``languages`` given to
    ``build_corpus``) or a corpus folder. Nothing is fetched: an unbuilt corpus raises CorpusError saying how to
    build it; with ``verify`` a file that fails its checksum raises too."""
    if isinstance(name_or_path, str) and name_or_path in CORPORA and not Path(name_or_path).exists():
        corpus_dir = corpus_folder(
            name_or_path,
            data_dir,
            max_docs_per_domain=max_docs_per_domain,
            max_chars_per_domain=max_chars_per_domain,
            languages=languages,
        )
    else:
        corpus_dir = _corpus_dir(name_or_path, data_dir)
    manifest = _require_manifest(corpus_dir, str(name_or_path))
    if verify:
        problems = find_corrupt_files(corpus_dir, manifest)
        if problems:
            raise CorpusError(
                f"corpus {manifest.corpus!r} in {corpus_dir} is damaged ({'; '.join(problems)}); rebuild it with "
                f"gradmix_kit.corpora.build_corpus({manifest.corpus!r}, ...), which rebuilds damaged files"
            )
    return {name: read_jsonl(corpus_dir / record.file) for name, record in manifest.domains.items()}


def build_target(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    max_docs: int | None = None,
    allow_apt_update: bool = True,
    progress: bool | None = True,
) -> list[str]:
    """Documents of a DGA target set (``available_targets()``), built and cached as corpus ``target_<name>``.

    The "domains" corpus lists its matching targets in ``Manifest.targets`` and keeps their documents out of its
    own dictionary domain, so a target never overlaps the training data.
    """
    if name not in TARGET_LABELS:
        raise CorpusError(f"unknown target {name!r}; available: {', '.join(TARGET_LABELS)}")
    corpus = f"target_{name}"
    build_corpus(corpus, data_dir, max_docs_per_domain=max_docs, allow_apt_update=allow_apt_update, progress=progress)
    return load_corpus(corpus, data_dir, max_docs_per_domain=max_docs)[name]
