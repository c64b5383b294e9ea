"""The tiny corpus shipped inside the package: four domains of real, permissively licensed English text (~30 KB
each), for smoke runs, examples and tests that must work without network.

Files: ``gradmix_kit/data/tiny/<domain>.txt``, documents separated by a line holding only ``<|doc|>``, read by
``gradmix.sources.read_documents`` like any other text source; the folder's README.txt names sources and licenses.
``write_tiny_corpus`` regenerates the files from the registry packages
(deterministic for the same package versions and Python version).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from gradmix.sources import DOC_SEPARATOR, read_documents
from gradmix_kit.corpora.errors import CorpusError

__all__ = ["TINY_DOC_SEPARATOR", "TINY_DOMAINS", "load_tiny_corpus", "write_tiny_corpus"]

TINY_DOC_SEPARATOR = DOC_SEPARATOR  # the library's document separator: the files are ordinary text sources
TINY_DOMAINS = ("changelog", "code", "docs", "legal")
TINY_CHARS_PER_DOMAIN = 30_000

# permissive licenses (ScanCode keys), well known and short enough to keep the domain near 30 KB
TINY_LICENSE_KEYS = (
    "mit", "mit-0", "bsd-simplified", "bsd-new", "bsd-zero", "isc", "zlib", "apache-2.0", "boost-1.0", "x11",
    "uoi-ncsa", "postgresql", "curl", "psf-2.0", "unlicense", "cc0-1.0",
)  # fmt: skip


# small, self-contained standard-library modules (whole files read better than fragments of big classes)
TINY_STDLIB_MODULES = ("bisect.py", "colorsys.py", "fnmatch.py", "glob.py", "copyreg.py", "genericpath.py")


def load_tiny_corpus() -> dict[str, list[str]]:
    """domain -> documents of the built-in tiny corpus (read with importlib.resources; no network, no cache)."""
    folder = resources.files("gradmix_kit").joinpath("data").joinpath("tiny")
    corpus: dict[str, list[str]] = {}
    for domain in TINY_DOMAINS:
        entry = folder.joinpath(f"{domain}.txt")
        if not entry.is_file():
            raise CorpusError(
                f"tiny corpus file data/tiny/{domain}.txt is missing from the installed gradmix_kit package"
            )
        with resources.as_file(entry) as path:
            docs = read_documents(path)
        if not docs:
            raise CorpusError(f"tiny corpus file data/tiny/{domain}.txt holds no documents")
        corpus[domain] = docs
    return corpus


def _format_tiny_file(docs: list[str]) -> str:
    for doc in docs:
        if any(line.strip() == TINY_DOC_SEPARATOR for line in doc.split("\n")):
            raise CorpusError(f"a document contains the separator line {TINY_DOC_SEPARATOR!r}")
    return f"\n{TINY_DOC_SEPARATOR}\n".join(docs) + "\n"


def write_tiny_corpus(
    out_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None
) -> dict[str, int]:
    """Regenerate the tiny corpus files into ``out_dir`` from the registry packages (downloads cached under
    ``data_dir``); returns characters per domain. Sources: the Python 3.11 manual's changelog and its tutorial and
    HOWTO prose (``python3.11-doc``), the running interpreter's standard library, and permissive license texts
    (``licensedcode-data``)."""
    # imported here: loading the tiny corpus must not pull in the fetching machinery
    from gradmix_kit.corpora.builder import SourceFetcher, _resolve_data_dir
    from gradmix_kit.corpora.parsers import parse_license_file, python_source_units
    from gradmix_kit.corpora.sources import (
        LICENSEDCODE_DATA,
        PYTHON_DOC,
        PYTHON_STDLIB,
        python_doc_pages,
        python_doc_sections,
    )
    from gradmix_kit.corpora.store import atomic_write_bytes
    from gradmix_kit.corpora.text import DEFAULT_MAX_DOC_CHARS, clean_documents, select_documents

    out = Path(out_dir)
    root = _resolve_data_dir(data_dir)
    raw: dict[str, list[str]] = {}
    with SourceFetcher(root / "_downloads") as fetcher:
        manual = fetcher.get(PYTHON_DOC)
        raw["changelog"] = python_doc_sections(manual, "usr/share/doc/python3.11/html/whatsnew/changelog.html.gz")
        raw["docs"] = [
            section
            for page in python_doc_pages(manual, subdirs=("tutorial", "howto"))
            for section in python_doc_sections(manual, page)
        ]
        stdlib = fetcher.get(PYTHON_STDLIB)
        raw["code"] = [
            unit
            for path in TINY_STDLIB_MODULES
            for unit in python_source_units(stdlib.read_bytes(path).decode("utf-8"), DEFAULT_MAX_DOC_CHARS)
        ]
        licenses = fetcher.get(LICENSEDCODE_DATA)
        raw["legal"] = [
            parse_license_file(licenses.read_bytes(f"licensedcode/data/licenses/{key}.LICENSE").decode("utf-8"))[1]
            for key in TINY_LICENSE_KEYS
        ]
    sizes: dict[str, int] = {}
    for domain in TINY_DOMAINS:
        docs = clean_documents(raw[domain])
        if domain in ("changelog", "docs"):  # the module and license lists are already selections
            docs = select_documents(docs, max_chars=TINY_CHARS_PER_DOMAIN)
        atomic_write_bytes(out / f"{domain}.txt", _format_tiny_file(docs).encode("utf-8"))
        sizes[domain] = sum(len(doc) for doc in docs)
    return sizes
