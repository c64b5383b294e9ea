"""Plain-text utilities shared by every corpus: normalisation, splitting into documents, dedupe and sampling.

Every source ends up as a list of natural units (an article, a dictionary entry, a source file, a manual section,
a poem). Units longer than ``max_chars`` are cut into paragraph groups, so that documents are comparable across
domains (a 40 KB license and a 200-character dictionary entry are not the same kind of "example"), and short
enough for sentence-embedding clustering (MiniLM reads ~256 tokens) and for byte/token windows.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence

__all__ = [
    "DEFAULT_MAX_DOC_CHARS",
    "DEFAULT_MIN_DOC_CHARS",
    "chunk_text",
    "clean_documents",
    "dedupe",
    "group_units",
    "normalize_text",
    "select_documents",
    "split_long",
    "split_paragraphs",
    "split_sentences",
]

DEFAULT_MAX_DOC_CHARS = 2000
"""Longest document kept whole: ~500 tokens, a section or a few paragraphs: one topic, and mostly inside the
window of a sentence encoder (MiniLM reads 256 tokens) used to cluster documents."""

DEFAULT_MIN_DOC_CHARS = 16
"""Shorter documents are dropped: below this a "document" is a stray heading or an empty file."""

_LINE_BREAKS = re.compile(r"\r\n|\r|\x85|\u2028|\u2029")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TRAILING_SPACE = re.compile(r"[ \t\u3000]+\n")
_MANY_BLANK_LINES = re.compile(r"\n{3,}")
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")
# a sentence ends at . ! ? (optionally followed by closing quotes/brackets) and whitespace, or right after a CJK
# full stop, which needs no space after it
_SENTENCE_END = re.compile(
    r"(?<=[.!?])\s+|(?<=[.!?][\"'\u201d\u2019)\]])\s+|(?<=[\u3002\uff01\uff1f])(?![\u300d\u300f\uff09])"
)


def normalize_text(text: str) -> str:
    """One newline convention, no control characters or byte-order marks, no trailing spaces, at most one blank
    line in a row, no leading/trailing blank space."""
    text = text.replace("\ufeff", "")
    text = _LINE_BREAKS.sub("\n", text)
    text = _CONTROL.sub("", text)
    text = _TRAILING_SPACE.sub("\n", text + "\n")
    text = _MANY_BLANK_LINES.sub("\n\n", text)
    return _strip_blank(text)


def _strip_blank(text: str) -> str:
    """Drop leading blank lines and trailing blank space, but keep the first line's indentation (code, verse)."""
    return _LEADING_BLANK_LINES.sub("", text).rstrip()


def split_paragraphs(text: str) -> list[str]:
    """Blank-line separated blocks (indentation kept), empty ones dropped."""
    return [_strip_blank(p) for p in _BLANK_LINE.split(text) if p.strip()]


def split_sentences(text: str) -> list[str]:
    """Sentences by end punctuation (Latin and CJK); text without any stays one piece."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def _hard_cut(text: str, max_chars: int) -> list[str]:
    """Cut at the last whitespace before ``max_chars`` (or exactly there when a piece has no whitespace, as in
    unpunctuated Chinese)."""
    pieces: list[str] = []
    rest = text.strip()
    while len(rest) > max_chars:
        cut = rest.rfind(" ", max_chars // 2, max_chars + 1)
        if cut <= 0:
            cut = max_chars
        pieces.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    if rest:
        pieces.append(rest)
    return pieces


def split_long(unit: str, max_chars: int) -> list[str]:
    """Split one unit into pieces of at most ``max_chars``: first at blank lines, then at line breaks, then at
    sentence ends, then at whitespace. Pieces are regrouped greedily so that the split keeps as much context
    together as fits; indentation is kept (code stays readable)."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    unit = _strip_blank(unit)
    if len(unit) <= max_chars:
        return [unit] if unit.strip() else []
    paragraphs = split_paragraphs(unit)
    if len(paragraphs) > 1:
        return group_units(paragraphs, max_chars, separator="\n\n")
    lines = [line.rstrip() for line in unit.split("\n") if line.strip()]
    if len(lines) > 1:
        return group_units(lines, max_chars, separator="\n")
    sentences = split_sentences(unit)
    if len(sentences) > 1:
        # scripts written without spaces (Chinese, Japanese) rejoin sentences without one
        separator = " " if unit.count(" ") * 100 >= len(unit) else ""
        return group_units(sentences, max_chars, separator=separator)
    return _hard_cut(unit, max_chars)


def group_units(units: Iterable[str], max_chars: int, separator: str = "\n\n") -> list[str]:
    """Pack consecutive units into groups of at most ``max_chars`` (joined by ``separator``); a unit longer than
    ``max_chars`` is split first (``split_long``). Order is kept, nothing is dropped but blank space."""
    groups: list[str] = []
    current: list[str] = []
    size = 0
    for unit in units:
        for piece in split_long(unit, max_chars):
            extra = len(piece) + (len(separator) if current else 0)
            if current and size + extra > max_chars:
                groups.append(separator.join(current))
                current, size = [], 0
                extra = len(piece)
            current.append(piece)
            size += extra
    if current:
        groups.append(separator.join(current))
    return groups


def chunk_text(text: str, max_chars: int = DEFAULT_MAX_DOC_CHARS) -> list[str]:
    """A natural unit as documents: itself if short enough, else groups of its paragraphs (``split_long``)."""
    return split_long(normalize_text(text), max_chars)


def _dedupe_key(doc: str) -> str:
    return " ".join(doc.split())


def dedupe(docs: Iterable[str]) -> list[str]:
    """Drop exact duplicates (up to whitespace), keeping the first occurrence and the order."""
    seen: set[str] = set()
    kept: list[str] = []
    for doc in docs:
        key = _dedupe_key(doc)
        if key not in seen:
            seen.add(key)
            kept.append(doc)
    return kept


def clean_documents(
    docs: Iterable[str],
    *,
    max_chars: int = DEFAULT_MAX_DOC_CHARS,
    min_chars: int = DEFAULT_MIN_DOC_CHARS,
) -> list[str]:
    """Normalise, chunk long documents, drop short ones, dedupe."""
    out: list[str] = []
    for doc in docs:
        out.extend(piece for piece in chunk_text(doc, max_chars) if len(piece) >= min_chars)
    return dedupe(out)


def _rank_key(doc: str) -> bytes:
    return hashlib.sha256(doc.encode("utf-8")).digest()


def select_documents(docs: Sequence[str], *, max_docs: int | None = None, max_chars: int | None = None) -> list[str]:
    """A deterministic, content-addressed sample of at most ``max_docs`` documents and ``max_chars`` characters.

    Documents are taken in the order of the SHA-256 of their text (a pseudo-random order that depends on nothing
    but the text, so the same documents are picked on every machine and a source that gains a document keeps the
    rest of its sample), skipping any document that would overflow ``max_chars``; the sample keeps the source
    order. The first ``max_docs`` of a source would be one letter of a dictionary or one chapter of a manual.
    """
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"max_docs must be >= 1 or None, got {max_docs}")
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars must be >= 1 or None, got {max_chars}")
    if max_docs is None and max_chars is None:
        return list(docs)
    order = sorted(range(len(docs)), key=lambda i: _rank_key(docs[i]))
    chosen: list[int] = []
    total = 0
    for index in order:
        if max_docs is not None and len(chosen) >= max_docs:
            break
        length = len(docs[index])
        if max_chars is not None and total + length > max_chars:
            continue
        chosen.append(index)
        total += length
    return [docs[i] for i in sorted(chosen)]
