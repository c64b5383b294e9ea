"""What each corpus is made of: the registry package behind every domain and the extractor that turns the
package's files into raw documents.

Corpora:
- ``multilingual``: Dasher's training texts (Debian ``dasher-data``), one domain per language, sizes left uneven
  (Spanish ~1.6 M characters ... Greek ~30 k by default).
- ``multilingual_ref``: the Debian Reference manual (``debian-reference-LANG``), the same manual in 8 languages
  (parallel content, near-equal sizes; parts not yet translated stay in English).
- ``domains``: distinct kinds of English text: encyclopedia (Wikipedia articles from the gensim wheel's test
  data), news (the Lee corpus of Australian news articles, same wheel), legal (ScanCode license texts,
  ``licensedcode-data``), technical (the Python 3.11 manual, ``python3.11-doc``), code (the running
  interpreter's standard library), dictionary (GCIDE entries, ``dict-gcide``), literature (poems and song lyrics
  of the fortune database, ``fortunes``: Dasher's English text is mixed prose, not literature).
- ``target_medical`` / ``target_math``: small target sets for DGA: the GCIDE entries whose main subject label is
  medical (Med., Anat., Physiol., Surg.) or mathematical (Math., Geom., Alg., Trig., Arith.). The ``domains``
  corpus leaves every target-labelled entry out of its dictionary domain, so target and training data never
  share a document.
"""

from __future__ import annotations

import bz2
import gzip
import platform
import sysconfig
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from gradmix_kit.corpora.errors import CorpusError
from gradmix_kit.corpora.fetch import FetchedSource
from gradmix_kit.corpora.html import html_to_sections
from gradmix_kit.corpora.parsers import (
    GcideEntry,
    clean_dasher_text,
    parse_fortunes,
    parse_gcide,
    parse_license_file,
    parse_mediawiki_xml,
    python_source_units,
    wikitext_to_text,
)
from gradmix_kit.corpora.text import DEFAULT_MAX_DOC_CHARS, chunk_text

__all__ = [
    "CORPORA",
    "DASHER_LANGUAGES",
    "DEBIAN_REFERENCE_LANGUAGES",
    "TARGET_LABELS",
    "CorpusSpec",
    "DomainSpec",
    "PackageSource",
]


@dataclass(frozen=True)
class PackageSource:
    """A registry package: ``kind`` is "deb" (Debian, via apt-get download), "wheel" (PyPI, pinned version) or
    "python-stdlib" (the running interpreter's standard library, versioned by the Python version)."""

    kind: str
    name: str
    version: str | None = None


GENSIM = PackageSource("wheel", "gensim", "4.4.0")
LICENSEDCODE_DATA = PackageSource("wheel", "licensedcode-data", "32.1.0")
DASHER_DATA = PackageSource("deb", "dasher-data")
DICT_GCIDE = PackageSource("deb", "dict-gcide")
PYTHON_DOC = PackageSource("deb", "python3.11-doc")
FORTUNES = PackageSource("deb", "fortunes")
PYTHON_STDLIB = PackageSource("python-stdlib", "python")


@dataclass(frozen=True)
class DomainSpec:
    """One domain: its package, the extractor of raw documents from the fetched package, and a line saying which
    files it reads."""

    name: str
    source: PackageSource
    extract: Callable[[FetchedSource], list[str]]
    detail: str


# ---------------------------------------------------------------------------------------------------------------
# multilingual: Dasher training texts
# ---------------------------------------------------------------------------------------------------------------

_DASHER_DIR = "usr/share/dasher/"

# code -> (file, markup). The duplicate variants (frenchC, englishLC, hiragana60, ...) are left out.
DASHER_LANGUAGES: Mapping[str, tuple[str, str | None]] = MappingProxyType(
    {
        "sq": ("training_albanian_SQ.txt", None),
        "eu": ("training_basque_ES.txt", None),
        "bn": ("training_bengali_BD.txt", None),
        "cs": ("training_czech_CS.txt", None),
        "cy": ("training_welsh_GB.txt", None),
        "da": ("training_danish_DK.txt", None),
        "de": ("training_german_DE.txt", None),
        "el": ("training_greek_GR.txt", None),
        "en": ("training_english_GB.txt", None),
        "es": ("training_spanish_ES.txt", None),
        "fa": ("training_persian_IR.txt", None),
        "fi": ("training_finnish_FI.txt", None),
        "fr": ("training_french_FR.txt", None),
        "he": ("training_hebrew_IL.txt", None),
        "hu": ("training_hungarian_HU.txt", None),
        "it": ("training_italian_IT.txt", None),
        "ja": ("training_canna_JP.txt", "segments"),
        "mn": ("training_mongolian_MN.txt", None),
        "nl": ("training_dutch_NL.txt", None),
        "pl": ("training_polish_PL.txt", None),
        "pt": ("training_portuguese_BR.txt", None),
        "ru": ("training_russian_RU.txt", None),
        "sv": ("training_swedish_SE.txt", None),
        "sw": ("training_swahili_KE.txt", None),
        "tr": ("training_turkish_TR.txt", None),
        "zh": ("training_spyNew.txt", "pinyin"),
    }
)

# 8 languages, 5 scripts' worth of variety, sizes from ~1.6 M (es) down to ~30 k characters (el): uneven on purpose
DEFAULT_DASHER_LANGUAGES = ("en", "es", "de", "fr", "ru", "fi", "tr", "el")


def _decode(data: bytes) -> str:
    """UTF-8, tolerating the odd stray byte some of these files carry (it becomes U+FFFD)."""
    return data.decode("utf-8", errors="replace")


def _dasher_extractor(code: str) -> Callable[[FetchedSource], list[str]]:
    filename, markup = DASHER_LANGUAGES[code]

    def extract(source: FetchedSource) -> list[str]:
        text = clean_dasher_text(_decode(source.read_bytes(_DASHER_DIR + filename)), markup)
        return chunk_text(text, DEFAULT_MAX_DOC_CHARS)

    return extract


def _dasher_domains(languages: Sequence[str]) -> list[DomainSpec]:
    return [
        DomainSpec(code, DASHER_DATA, _dasher_extractor(code), _DASHER_DIR + DASHER_LANGUAGES[code][0])
        for code in languages
    ]


# ---------------------------------------------------------------------------------------------------------------
# multilingual_ref: the Debian Reference in 8 languages
# ---------------------------------------------------------------------------------------------------------------

DEBIAN_REFERENCE_LANGUAGES = ("en", "de", "fr", "es", "it", "ja", "pt", "zh-cn")
_DEBIAN_REFERENCE_DIR = "usr/share/debian-reference/"
_DOCBOOK_SKIP_CLASSES = ("navheader", "navfooter", "toc")


def _debian_reference_extractor(lang: str) -> Callable[[FetchedSource], list[str]]:
    def extract(source: FetchedSource) -> list[str]:
        pages = [
            path
            for path in source.list_files(_DEBIAN_REFERENCE_DIR, f".{lang}.html")
            if not path.rsplit("/", 1)[-1].startswith("index.")  # the index page is the table of contents
        ]
        if not pages:
            raise CorpusError(f"debian-reference-{lang} {source.version}: no HTML pages under {_DEBIAN_REFERENCE_DIR}")
        docs: list[str] = []
        for path in pages:
            docs.extend(html_to_sections(_decode(source.read_bytes(path)), skip_classes=_DOCBOOK_SKIP_CLASSES))
        return docs

    return extract


def _debian_reference_domains(languages: Sequence[str]) -> list[DomainSpec]:
    return [
        DomainSpec(
            lang,
            PackageSource("deb", f"debian-reference-{lang}"),
            _debian_reference_extractor(lang),
            f"{_DEBIAN_REFERENCE_DIR}*.{lang}.html (preface, chapters, appendix)",
        )
        for lang in languages
    ]


# ---------------------------------------------------------------------------------------------------------------
# domains
# ---------------------------------------------------------------------------------------------------------------

_GENSIM_TEST_DATA = "gensim/test/test_data/"
_ENWIKI = _GENSIM_TEST_DATA + "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_LEE_FILES = (_GENSIM_TEST_DATA + "lee_background.cor", _GENSIM_TEST_DATA + "lee.cor")
_LICENSES_DIR = "licensedcode/data/licenses/"
_PYTHON_DOC_DIR = "usr/share/doc/python3.11/html/"
_SPHINX_SKIP_CLASSES = ("headerlink", "sphinxsidebar", "related", "footer")
_PYTHON_DOC_SKIP_PAGES = ("genindex", "search.html", "py-modindex.html", "contents.html", "index.html")
_FORTUNE_FILE = "usr/share/games/fortunes/songs-poems"
_GCIDE_FILE = "usr/share/dictd/gcide.dict.dz"
_STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "pydoc_data", "lib2to3"}
)


def _extract_encyclopedia(source: FetchedSource) -> list[str]:
    articles = parse_mediawiki_xml(bz2.decompress(source.read_bytes(_ENWIKI)))
    return [wikitext_to_text(wikitext, title) for title, wikitext in articles]


def _extract_news(source: FetchedSource) -> list[str]:
    docs: list[str] = []
    for path in _LEE_FILES:  # one article per line
        docs.extend(line.strip() for line in _decode(source.read_bytes(path)).split("\n") if line.strip())
    return docs


def _extract_legal(source: FetchedSource) -> list[str]:
    """License texts, English only, deprecated entries (kept by ScanCode for old detections) left out."""
    docs: list[str] = []
    for path in source.list_files(_LICENSES_DIR, ".LICENSE"):
        meta, body = parse_license_file(_decode(source.read_bytes(path)))
        if meta.get("is_deprecated", "").lower() in ("yes", "true"):
            continue
        if meta.get("language", "en").lower() not in ("en", "en-us", "en-gb"):
            continue
        docs.append(body)
    return docs


def python_doc_pages(source: FetchedSource, subdirs: Sequence[str] | None = None) -> list[str]:
    """HTML pages of the Python manual, without the generated index/search/contents pages."""
    pages = []
    for path in source.list_files(_PYTHON_DOC_DIR, ".html"):
        relative = path[len(_PYTHON_DOC_DIR) :]
        if relative.startswith("_") or relative.rsplit("/", 1)[-1].startswith(_PYTHON_DOC_SKIP_PAGES):
            continue
        if subdirs is not None and relative.split("/", 1)[0] not in subdirs:
            continue
        pages.append(path)
    return pages


def python_doc_sections(source: FetchedSource, path: str) -> list[str]:
    """Sections of one Python manual page (plain ``.html`` or the gzipped changelog)."""
    data = source.read_bytes(path)
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    return html_to_sections(_decode(data), root_class="body", skip_classes=_SPHINX_SKIP_CLASSES)


def _extract_technical(source: FetchedSource) -> list[str]:
    docs: list[str] = []
    for path in python_doc_pages(source):
        docs.extend(python_doc_sections(source, path))
    return docs


def stdlib_files(source: FetchedSource) -> list[str]:
    """The standard library's own ``.py`` files: no tests, no third-party site-packages, no generated doc data."""
    return [
        path
        for path in source.list_files("", ".py")
        if not (set(path.split("/")[:-1]) & _STDLIB_SKIP_DIRS) and not path.rsplit("/", 1)[-1].startswith("test_")
    ]


def _extract_code(source: FetchedSource) -> list[str]:
    docs: list[str] = []
    for path in stdlib_files(source):
        docs.extend(python_source_units(_decode(source.read_bytes(path)), DEFAULT_MAX_DOC_CHARS))
    return docs


def _extract_literature(source: FetchedSource) -> list[str]:
    return parse_fortunes(_decode(source.read_bytes(_FORTUNE_FILE)))


# subject labels of GCIDE entries that make up each DGA target set
TARGET_LABELS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "medical": frozenset({"Med.", "Anat.", "Physiol.", "Surg."}),
        "math": frozenset({"Math.", "Geom.", "Alg.", "Trig.", "Arith."}),
    }
)
_ALL_TARGET_LABELS = frozenset().union(*TARGET_LABELS.values())


def _gcide_entries(source: FetchedSource) -> list[GcideEntry]:
    return parse_gcide(_decode(gzip.decompress(source.read_bytes(_GCIDE_FILE))))


def _extract_dictionary(source: FetchedSource) -> list[str]:
    return [entry.text for entry in _gcide_entries(source) if not set(entry.labels) & _ALL_TARGET_LABELS]


def _target_extractor(target: str) -> Callable[[FetchedSource], list[str]]:
    labels = TARGET_LABELS[target]

    def extract(source: FetchedSource) -> list[str]:
        return [entry.text for entry in _gcide_entries(source) if set(entry.labels) & labels]

    return extract


def _domains_corpus(languages: Sequence[str]) -> list[DomainSpec]:
    excluded = ", ".join(sorted(_ALL_TARGET_LABELS))
    return [
        DomainSpec("encyclopedia", GENSIM, _extract_encyclopedia, _ENWIKI),
        DomainSpec("news", GENSIM, _extract_news, ", ".join(_LEE_FILES)),
        DomainSpec("legal", LICENSEDCODE_DATA, _extract_legal, _LICENSES_DIR + "*.LICENSE (English, not deprecated)"),
        DomainSpec("technical", PYTHON_DOC, _extract_technical, _PYTHON_DOC_DIR + "**/*.html (sections)"),
        DomainSpec("code", PYTHON_STDLIB, _extract_code, "stdlib *.py (no tests, no site-packages)"),
        DomainSpec("dictionary", DICT_GCIDE, _extract_dictionary, f"{_GCIDE_FILE} without entries labelled {excluded}"),
        DomainSpec("literature", FORTUNES, _extract_literature, _FORTUNE_FILE),
    ]


def _target_corpus(target: str) -> Callable[[Sequence[str]], list[DomainSpec]]:
    def domains(languages: Sequence[str]) -> list[DomainSpec]:
        labels = ", ".join(sorted(TARGET_LABELS[target]))
        return [DomainSpec(target, DICT_GCIDE, _target_extractor(target), f"{_GCIDE_FILE} entries labelled {labels}")]

    return domains


# ---------------------------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusSpec:
    """A named corpus: how to list its domains (for the chosen languages, where it has languages)."""

    name: str
    description: str
    make_domains: Callable[[Sequence[str]], list[DomainSpec]]
    languages: tuple[str, ...] = ()  # every language it can build; empty: not a multilingual corpus
    default_languages: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()  # target corpora meant to go with it

    def domains(self, languages: Sequence[str] | None) -> list[DomainSpec]:
        if not self.languages:
            if languages is not None:
                raise CorpusError(f"corpus {self.name!r} has no languages; pass languages=None")
            return self.make_domains(())
        if isinstance(languages, str):
            raise CorpusError(f"languages must be a list of codes, got the string {languages!r}")
        chosen = tuple(self.default_languages if languages is None else languages)
        unknown = [code for code in chosen if code not in self.languages]
        if unknown:
            raise CorpusError(
                f"corpus {self.name!r}: unknown language(s) {unknown}; available: {', '.join(self.languages)}"
            )
        if not chosen:
            raise CorpusError(f"corpus {self.name!r}: languages is empty")
        if len(set(chosen)) != len(chosen):
            raise CorpusError(f"corpus {self.name!r}: languages {list(chosen)} repeat a code")
        return self.make_domains(chosen)


CORPORA: Mapping[str, CorpusSpec] = MappingProxyType(
    {
        "multilingual": CorpusSpec(
            "multilingual",
            "Dasher training texts (dasher-data), one domain per language, uneven sizes",
            _dasher_domains,
            languages=tuple(sorted(DASHER_LANGUAGES)),
            default_languages=DEFAULT_DASHER_LANGUAGES,
        ),
        "multilingual_ref": CorpusSpec(
            "multilingual_ref",
            "The Debian Reference manual (debian-reference-*) in 8 languages, near-equal sizes",
            _debian_reference_domains,
            languages=DEBIAN_REFERENCE_LANGUAGES,
            default_languages=DEBIAN_REFERENCE_LANGUAGES,
        ),
        "domains": CorpusSpec(
            "domains",
            "Seven kinds of English text: encyclopedia, news, legal, technical, code, dictionary, literature",
            _domains_corpus,
            targets=tuple(TARGET_LABELS),
        ),
        **{
            f"target_{target}": CorpusSpec(
                f"target_{target}",
                f"DGA target set: GCIDE entries labelled {', '.join(sorted(labels))}",
                _target_corpus(target),
            )
            for target, labels in TARGET_LABELS.items()
        },
    }
)


def stdlib_root_and_version() -> tuple[str, str]:
    """Where the running interpreter's standard library lives, and the Python version that names it."""
    return sysconfig.get_paths()["stdlib"], platform.python_version()
