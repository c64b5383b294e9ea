"""Parsers for the formats the registry packages ship: MediaWiki XML dumps, dictd dictionaries (GCIDE), ScanCode
license files with YAML front matter, fortune files, Dasher training texts and Python source files.

Each parser takes text (or bytes) and returns units of plain text; it knows nothing of packages or caches, so it
is tested on small synthetic inputs.
"""

from __future__ import annotations

import html as html_lib
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from gradmix_kit.corpora.text import group_units, normalize_text

__all__ = [
    "GcideEntry",
    "clean_dasher_text",
    "parse_fortunes",
    "parse_gcide",
    "parse_license_file",
    "parse_mediawiki_xml",
    "python_source_units",
    "wikitext_to_text",
]

# ---------------------------------------------------------------------------------------------------------------
# MediaWiki
# ---------------------------------------------------------------------------------------------------------------


def parse_mediawiki_xml(xml_bytes: bytes) -> list[tuple[str, str]]:
    """(title, wikitext) of every article in a MediaWiki XML export: main namespace (0), no redirects."""
    articles: list[tuple[str, str]] = []
    for _, element in ElementTree.iterparse(_BytesReader(xml_bytes), events=("end",)):
        if _local_name(element.tag) != "page":
            continue
        fields = {_local_name(child.tag): child for child in element}
        namespace = (fields["ns"].text or "").strip() if "ns" in fields else "0"
        revision = fields.get("revision")
        text_el = None
        if revision is not None:
            text_el = next((c for c in revision if _local_name(c.tag) == "text"), None)
        text = (text_el.text or "") if text_el is not None else ""
        title = (fields["title"].text or "").strip() if "title" in fields else ""
        if namespace == "0" and "redirect" not in fields and not text.lstrip().upper().startswith("#REDIRECT"):
            articles.append((title, text))
        element.clear()
    return articles


class _BytesReader:
    """File-like view on bytes for iterparse (keeps memory to one copy of the dump)."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size is None or size < 0 else min(len(self._data), self._pos + size)
        chunk = bytes(self._data[self._pos : end])
        self._pos = end
        return chunk


def _local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


_WIKI_COMMENT = re.compile(r"<!--.*?-->", re.S)
_WIKI_REF = re.compile(r"<ref\b[^>/]*/>|<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)
_WIKI_DROP_ELEMENTS = re.compile(
    r"<(math|gallery|timeline|score|syntaxhighlight|source|imagemap|hiero|chem)\b[^>]*>.*?</\1\s*>", re.S | re.I
)
_WIKI_TAG = re.compile(r"</?[a-zA-Z][^<>]*?/?>")
_WIKI_TEMPLATE = re.compile(r"\{\{(?:(?!\{\{|\}\}).)*\}\}", re.S)
_WIKI_TABLE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*\|\}", re.S)
_WIKI_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_WIKI_UNCLOSED_FILE = re.compile(r"\[\[(?:File|Image):[^\n]*", re.I)
_WIKI_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+(?:\s+([^\]]*))?\]")
_WIKI_BOLD_ITALIC = re.compile(r"'{2,5}")
_WIKI_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$", re.M)
_WIKI_LIST_MARKER = re.compile(r"^[*#:;]+\s*", re.M)
_WIKI_DROP_LINK_PREFIXES = ("file", "image", "category", "media")
_WIKI_TAIL_SECTIONS = frozenset(
    {"see also", "references", "external links", "further reading", "notes", "bibliography", "sources",
     "footnotes", "citations", "notes and references"}
)  # fmt: skip
_INTERWIKI = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)?:")


def _replace_until_stable(pattern: re.Pattern[str], replacement, text: str) -> str:
    while True:
        new = pattern.sub(replacement, text)
        if new == text:
            return text
        text = new


def _wiki_link_text(match: re.Match[str]) -> str:
    target, _, label = match.group(1).partition("|")
    prefix = target.split(":", 1)[0].strip().lower() if ":" in target else ""
    if prefix in _WIKI_DROP_LINK_PREFIXES or _INTERWIKI.match(target.strip()):
        return ""
    text = match.group(1).rsplit("|", 1)[-1] if label else target
    return text.lstrip(":")


def wikitext_to_text(wikitext: str, title: str = "") -> str:
    """Readable text of a Wikipedia article: templates, tables, references, files and categories removed, links
    replaced by their label, headings kept as lines, the trailing link sections (See also, References, ...)
    dropped. Not a full MediaWiki renderer: infobox values and citation templates go, prose stays."""
    text = html_lib.unescape(wikitext)
    text = _WIKI_COMMENT.sub("", text)
    text = _WIKI_REF.sub("", text)
    text = _WIKI_DROP_ELEMENTS.sub("", text)
    text = _replace_until_stable(_WIKI_TEMPLATE, "", text)
    text = _replace_until_stable(_WIKI_TABLE, "", text)
    text = _replace_until_stable(_WIKI_LINK, _wiki_link_text, text)
    text = _WIKI_UNCLOSED_FILE.sub("", text)  # a caption holding stray brackets defeats the link pattern
    text = _WIKI_EXTERNAL_LINK.sub(lambda m: m.group(1) or "", text)
    text = _WIKI_TAG.sub("", text)
    text = _WIKI_BOLD_ITALIC.sub("", text)
    text = html_lib.unescape(text)  # entities written as &amp;nbsp; in the XML come out only now
    kept: list[str] = []
    dropping = False
    for line in text.split("\n"):
        heading = _WIKI_HEADING.match(line)
        if heading:
            name = heading.group(2).strip()
            dropping = name.lower() in _WIKI_TAIL_SECTIONS
            if not dropping and name:
                kept.extend(["", name, ""])
            continue
        if dropping or line.strip().startswith(("|", "!", "{|", "|}", "__")):
            continue
        kept.append(_WIKI_LIST_MARKER.sub("", line).replace("\u00a0", " "))
    body = normalize_text("\n".join(kept))
    if title and body:
        body = f"{title}\n\n{body}"
    return body


# ---------------------------------------------------------------------------------------------------------------
# GCIDE (dictd format)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GcideEntry:
    """One dictionary entry: headword, the subject labels of its first labelled sense (e.g. ``("Med.",)`` or
    ``("Anat.", "Zool.")``; empty when unlabelled) and the cleaned text."""

    headword: str
    labels: tuple[str, ...]
    text: str


# an entry starts at column 0 with "Headword \Pro*nun"ci*a`tion\" after a blank line
_GCIDE_ENTRY_START = re.compile(r"^(?=[^\s\\][^\n\\]*\\[^\\\n]+\\)", re.M)
_GCIDE_LABEL_GROUP = re.compile(r"\(((?:[A-Z][A-Za-z]*\.)(?:\s*(?:,|&|and|or)?\s*[A-Z][A-Za-z]*\.)*)\)")
_GCIDE_LABEL = re.compile(r"[A-Z][A-Za-z]*\.")
# "[1913 Webster]", "[WordNet 1.5]", "[PJC]": where a sense came from. They end a line; the few words that
# sometimes follow one on the same line are stray headwords of the next entry, so they go too.
_GCIDE_SOURCE_TAG = re.compile(r"\[[^\[\]\n]*(?:Webster|WordNet|PJC|Century|Suppl\.|Source)[^\[\]\n]*\][^\n]*")
_GCIDE_PRONUNCIATION = re.compile(r"\s*\\[^\\\n]*\\(?:\s*\([^()]{0,120}\))?")
# accented letters: a mark before or after one or two letters ("[=e]", "[a^]", "[oo^]", "[,c]") ...
_GCIDE_ACCENT = re.compile(r"\[(?:[=^'`\"~.,*-]{1,2}([a-zA-Z]{1,2})|([a-z]{1,2})[\^~-])\]")
# ... and named characters; "[Obs.]", "[R.]" and other labels are left alone
_GCIDE_NAMED_CHARS: Mapping[str, str] = MappingProxyType(
    {
        "ae": "ae", "AE": "AE", "oe": "oe", "OE": "OE", "imac": "i", "aum": "a", "eum": "e", "ium": "i",
        "oum": "o", "uum": "u", "asl": "a", "add": "d", "udd": "u", "eth": "th", "thorn": "th", "ng": "ng",
        "th": "th", "yogh": "gh", "dsdot": "d", "deg": "\u00b0", "sect": "\u00a7", "root": "", "bar": "",
        "alpha": "\u03b1", "beta": "\u03b2",
    }
)  # fmt: skip
_GCIDE_NAMED = re.compile(r"\[(" + "|".join(sorted(_GCIDE_NAMED_CHARS, key=len, reverse=True)) + r")\]")
_GCIDE_BRACES = re.compile(r"\{([^{}]*)\}")


def _gcide_accent(match: re.Match[str]) -> str:
    """GCIDE writes accented letters as codes ("[=e]" = e macron, "[a^]" = a breve); plain text keeps the
    letters."""
    return match.group(1) or match.group(2)


def _gcide_clean(raw: str) -> str:
    text = _GCIDE_SOURCE_TAG.sub("", raw)
    text = _GCIDE_PRONUNCIATION.sub("", text, count=1)  # the headword's, right after it
    text = _GCIDE_ACCENT.sub(_gcide_accent, text)
    text = _GCIDE_NAMED.sub(lambda m: _GCIDE_NAMED_CHARS[m.group(1)], text)
    text = _replace_until_stable(_GCIDE_BRACES, r"\1", text)
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        joined = " ".join(block.split())
        if joined:
            paragraphs.append(joined)
    return "\n".join(paragraphs)


def _previous_line(text: str, line_start: int) -> str:
    return text[text.rfind("\n", 0, line_start - 1) + 1 : line_start - 1]


def parse_gcide(dict_text: str) -> list[GcideEntry]:
    """Entries of the GCIDE dictd data file (``gcide.dict`` after gunzip), in file order.

    The database header entries (``00-database-*``) and the license preamble are skipped. The subject labels of
    an entry are those of its first parenthesised label group such as "(Med.)" or "(Anat. & Zool.)": labels sit at
    the head of the entry or at its first sense, and the first one names the entry's main subject (the entry
    "Heart" opens with "1. (Anat.) A hollow, muscular organ ...").
    """
    entries: list[GcideEntry] = []
    starts = [
        m.start()
        for m in _GCIDE_ENTRY_START.finditer(dict_text)
        if m.start() == 0 or not _previous_line(dict_text, m.start()).strip()
    ]
    for begin, end in zip(starts, [*starts[1:], len(dict_text)]):
        raw = dict_text[begin:end]
        headword = raw.split("\\", 1)[0].strip()
        if not headword or headword.startswith("00-database"):
            continue
        group = _GCIDE_LABEL_GROUP.search(_GCIDE_SOURCE_TAG.sub("", raw))
        labels = tuple(_GCIDE_LABEL.findall(group.group(1))) if group else ()
        text = _gcide_clean(raw)
        if text:
            entries.append(GcideEntry(headword=headword, labels=labels, text=text))
    return entries


# ---------------------------------------------------------------------------------------------------------------
# ScanCode license files
# ---------------------------------------------------------------------------------------------------------------


def parse_license_file(text: str) -> tuple[dict[str, str], str]:
    """Split a ScanCode ``.LICENSE`` file into its front-matter scalars (``key: value`` lines between ``---``
    fences; lists are ignored) and the license text."""
    if not text.startswith("---\n"):
        return {}, text
    end = text.find("\n---\n", 3)
    if end < 0:
        return {}, text
    meta: dict[str, str] = {}
    for line in text[4:end].split("\n"):
        match = re.match(r"^([A-Za-z_][\w-]*):\s*(.*?)\s*$", line)
        if match and match.group(2):
            meta[match.group(1)] = match.group(2)
    return meta, text[end + 5 :]


# ---------------------------------------------------------------------------------------------------------------
# fortune files
# ---------------------------------------------------------------------------------------------------------------


def parse_fortunes(text: str) -> list[str]:
    """The cookies of a fortune file: blocks separated by lines holding only ``%``."""
    cookies = re.split(r"^%[ \t]*$", text.replace("\r\n", "\n"), flags=re.M)
    return [c.strip("\n").rstrip() for c in cookies if c.strip()]


# ---------------------------------------------------------------------------------------------------------------
# Dasher training texts
# ---------------------------------------------------------------------------------------------------------------

_DASHER_PINYIN = re.compile(r"<[^<>\n]{1,12}>")


def clean_dasher_text(text: str, markup: str | None = None) -> str:
    """Dasher's training files are plain text, except two that carry input-method annotations: the Chinese one
    marks readings as ``<pinyin>`` before characters (``markup="pinyin"``), the Japanese kana-kanji one separates
    conversion segments with ``>`` (``markup="segments"``)."""
    if markup == "pinyin":
        text = _DASHER_PINYIN.sub("", text)
    elif markup == "segments":
        text = text.replace(">", "")
    elif markup is not None:
        raise ValueError(f"unknown Dasher markup {markup!r}; expected None, 'pinyin' or 'segments'")
    return normalize_text(text)


# ---------------------------------------------------------------------------------------------------------------
# Python source
# ---------------------------------------------------------------------------------------------------------------

_TOP_LEVEL_BOUNDARY = re.compile(r"\n\s*\n(?=[^\s#)\]}])")


def python_source_units(source: str, max_chars: int) -> list[str]:
    """A Python file as documents of at most ``max_chars``: whole if it fits, else groups of its top-level blocks
    (split at blank lines followed by an unindented statement), so a chunk never starts inside a function."""
    source = normalize_text(source)
    if len(source) <= max_chars:
        return [source] if source else []
    blocks = [b for b in _TOP_LEVEL_BOUNDARY.split(source) if b.strip()]
    return group_units(blocks, max_chars)
