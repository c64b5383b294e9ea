"""HTML manuals to plain-text sections, with the standard library's ``html.parser`` only.

Sphinx (the Python docs) and DocBook (the Debian Reference) pages carry navigation bars, tables of contents,
sidebars and permalink anchors around the prose; the extractor keeps the text inside an optional root element,
skips elements by class or tag, and starts a new section at each heading so that one page gives several
topic-sized documents.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from html.parser import HTMLParser

__all__ = ["html_to_sections"]

_BLOCK_TAGS = frozenset(
    {
        "address", "article", "aside", "blockquote", "caption", "dd", "div", "dl", "dt", "figcaption", "figure",
        "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main", "ol", "p", "pre",
        "section", "table", "tbody", "thead", "tfoot", "tr", "ul",
    }
)  # fmt: skip
_CELL_TAGS = frozenset({"td", "th"})
_VOID_TAGS = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
)
_DEFAULT_SKIP_TAGS = frozenset({"head", "script", "style", "noscript", "nav", "template", "button"})
_SPACES = re.compile(r"[ \t\n\r\f\v]+")


class _SectionExtractor(HTMLParser):
    def __init__(
        self,
        root_class: str | None,
        skip_classes: frozenset[str],
        skip_tags: frozenset[str],
        section_tags: frozenset[str],
    ) -> None:
        super().__init__(convert_charrefs=True)
        self._root_class = root_class
        self._skip_classes = skip_classes
        self._skip_tags = skip_tags
        self._section_tags = section_tags
        # (tag, depth of that tag name when the element opened): the element closes when that tag's count
        # drops back below it. Counting per tag name survives HTML's unclosed <p>/<li> elements.
        self._open_counts: dict[str, int] = {}
        self._root: tuple[str, int] | None = None
        self._skip: tuple[str, int] | None = None
        self._pre_depth = 0
        self._line: list[str] = []
        self._paragraphs: list[str] = []
        self.sections: list[list[str]] = []

    # -- state -------------------------------------------------------------------------------------------------
    @property
    def _collecting(self) -> bool:
        inside_root = self._root_class is None or self._root is not None
        return inside_root and self._skip is None

    def _flush_paragraph(self) -> None:
        text = "".join(self._line)
        self._line = []
        if self._pre_depth:
            text = "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")
        else:
            text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n")).strip()
        if text.strip():
            self._paragraphs.append(text)

    def _flush_section(self) -> None:
        self._flush_paragraph()
        if self._paragraphs:
            self.sections.append(self._paragraphs)
        self._paragraphs = []

    # -- parser callbacks ----------------------------------------------------------------------------------------
    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID_TAGS:
            self._void(tag)
            return
        depth = self._open_counts.get(tag, 0) + 1
        self._open_counts[tag] = depth
        classes = set((dict(attrs).get("class") or "").split())
        if self._root_class is not None and self._root is None and self._root_class in classes:
            self._root = (tag, depth)
        if self._skip is None and (tag in self._skip_tags or classes & self._skip_classes):
            if self._collecting:
                self._flush_paragraph()
            self._skip = (tag, depth)
            return
        if not self._collecting:
            return
        if tag in self._section_tags:
            self._flush_section()
        elif tag in _BLOCK_TAGS:
            self._flush_paragraph()
        elif tag in _CELL_TAGS:
            self._line.append(" ")
        if tag == "pre":
            self._pre_depth += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._void(tag)  # XHTML's <a id="x"/> opens and closes at once

    def _void(self, tag: str) -> None:
        if not self._collecting:
            return
        if tag == "br":
            self._line.append("\n")
        elif tag == "hr":
            self._flush_paragraph()

    def handle_endtag(self, tag: str) -> None:
        depth = self._open_counts.get(tag, 0)
        if depth == 0:
            return  # stray closing tag
        self._open_counts[tag] = depth - 1
        if self._skip is not None:
            if self._skip == (tag, depth):
                self._skip = None
            return
        if self._collecting:
            if tag == "pre" and self._pre_depth:
                self._flush_paragraph()
                self._pre_depth -= 1
            elif tag in _BLOCK_TAGS:
                self._flush_paragraph()
        if self._root is not None and self._root == (tag, depth):
            self._flush_paragraph()
            self._root = None

    def handle_data(self, data: str) -> None:
        if self._collecting:
            # outside <pre>, source line breaks are just spaces; only <br> makes a line break
            self._line.append(data if self._pre_depth else _SPACES.sub(" ", data))

    def close(self) -> None:
        super().close()
        self._flush_section()


def html_to_sections(
    html: str,
    *,
    root_class: str | None = None,
    skip_classes: Iterable[str] = (),
    skip_tags: Iterable[str] = _DEFAULT_SKIP_TAGS,
    section_tags: Iterable[str] = ("h1", "h2", "h3"),
) -> list[str]:
    """Plain-text sections of an HTML page.

    Args:
        html: the page.
        root_class: keep only text inside the first element carrying this class (e.g. Sphinx's ``body``);
            ``None`` keeps the whole ``<body>``.
        skip_classes: elements with any of these classes are dropped with everything inside them.
        skip_tags: tags dropped with their content (scripts, styles, navigation).
        section_tags: a new section starts at each of these (headings); the heading text opens the section.

    Returns:
        one string per non-empty section, paragraphs separated by a blank line.
    """
    parser = _SectionExtractor(
        root_class=root_class,
        skip_classes=frozenset(skip_classes),
        skip_tags=frozenset(skip_tags),
        section_tags=frozenset(section_tags),
    )
    parser.feed(html)
    parser.close()
    return ["\n\n".join(paragraphs) for paragraphs in parser.sections]
