"""Tests of the corpus builders.

Fast tests run the parsers, splitting, sampling, storage and the whole build pipeline on small synthetic package
trees (a fetcher that serves folders and zip files made here). Tests marked ``integration`` fetch the real
packages (apt-get download, pip download) and build small slices of every corpus.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import os
import re
import zipfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradmix.sources import read_documents
from gradmix_kit.corpora import (
    CorpusError,
    FetchError,
    Manifest,
    available_corpora,
    available_languages,
    available_targets,
    build_corpus,
    build_target,
    corpus_folder,
    default_data_dir,
    load_corpus,
    load_manifest,
    load_tiny_corpus,
)
from gradmix_kit.corpora.fetch import (
    DirectorySource,
    FetchedPackage,
    WheelSource,
    fetch_deb,
    fetch_wheel,
    run_tool,
    unpack_deb,
)
from gradmix_kit.corpora.html import html_to_sections
from gradmix_kit.corpora.parsers import (
    clean_dasher_text,
    parse_fortunes,
    parse_gcide,
    parse_license_file,
    parse_mediawiki_xml,
    python_source_units,
    wikitext_to_text,
)
from gradmix_kit.corpora.sources import PackageSource
from gradmix_kit.corpora.store import (
    MANIFEST_NAME,
    atomic_write_bytes,
    read_jsonl,
    read_manifest,
    sha256_file,
    write_jsonl,
)
from gradmix_kit.corpora.text import (
    chunk_text,
    clean_documents,
    dedupe,
    normalize_text,
    select_documents,
    split_long,
    split_sentences,
)
from gradmix_kit.corpora.tiny import TINY_DOC_SEPARATOR, _format_tiny_file


def _non_space(text: str) -> str:
    return "".join(text.split())


# ---------------------------------------------------------------------------------------------------------------
# text utilities
# ---------------------------------------------------------------------------------------------------------------


def test_normalize_text_unifies_line_breaks_and_drops_junk() -> None:
    raw = "\ufeff\n\n  Title\r\nline two\t \rline three\x85\x00\x07four\n\n\n\n\nend   \n\n"
    assert normalize_text(raw) == "  Title\nline two\nline three\nfour\n\nend"


def test_split_sentences_keeps_closing_quotes_and_handles_cjk() -> None:
    assert split_sentences('He said "hi." Then left! Ok? yes') == ['He said "hi."', "Then left!", "Ok?", "yes"]
    assert split_sentences("ねこである。なまえはまだない。「どこで。」うまれた") == [
        "ねこである。",
        "なまえはまだない。",
        "「どこで。」うまれた",
    ]


def test_chunk_text_groups_paragraphs_up_to_the_limit() -> None:
    text = "alpha one\n\nbeta two\n\ngamma three\n\ndelta four"
    # 9 + 2 + 8 = 19 fits in 20; adding "gamma three" would need 19 + 2 + 11 = 32
    assert chunk_text(text, 20) == ["alpha one\n\nbeta two", "gamma three", "delta four"]
    assert chunk_text(text, 1000) == [text]


def test_split_long_keeps_code_indentation() -> None:
    source = "class A:\n    def f(self):\n        return 1\n\n    def g(self):\n        return 2\n"
    pieces = split_long(source, 45)
    assert pieces == ["class A:\n    def f(self):\n        return 1", "    def g(self):\n        return 2"]


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(alphabet=st.sampled_from(list("ab .!?\n\u3002\u732b")), min_size=0, max_size=400),
    max_chars=st.integers(min_value=1, max_value=60),
)
def test_chunk_text_respects_limit_and_loses_no_characters(text: str, max_chars: int) -> None:
    pieces = chunk_text(text, max_chars)
    assert all(0 < len(piece) <= max_chars for piece in pieces)
    assert all(piece.strip() for piece in pieces)
    assert _non_space("".join(pieces)) == _non_space(text)


def test_dedupe_ignores_whitespace_and_keeps_first() -> None:
    docs = ["a b", "c", "a  b", " a\nb ", "d", "c"]
    assert dedupe(docs) == ["a b", "c", "d"]


def test_clean_documents_drops_short_and_duplicate_documents() -> None:
    docs = ["", "   ", "tiny", "a long enough document", "a long enough   document", "x" * 50]
    assert clean_documents(docs, max_chars=30, min_chars=10) == ["a long enough document", "x" * 30, "x" * 20]


def _brute_force_sample(docs: list[str], max_docs: int | None, max_chars: int | None) -> list[str]:
    ranked = sorted(range(len(docs)), key=lambda i: hashlib.sha256(docs[i].encode()).hexdigest())
    picked: list[int] = []
    total = 0
    for i in ranked:
        if max_docs is not None and len(picked) == max_docs:
            break
        if max_chars is not None and total + len(docs[i]) > max_chars:
            continue
        picked.append(i)
        total += len(docs[i])
    return [docs[i] for i in sorted(picked)]


@settings(max_examples=100, deadline=None)
@given(
    docs=st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=40, unique=True),
    max_docs=st.one_of(st.none(), st.integers(1, 50)),
    max_chars=st.one_of(st.none(), st.integers(1, 400)),
)
def test_select_documents_matches_brute_force(docs: list[str], max_docs: int | None, max_chars: int | None) -> None:
    chosen = select_documents(docs, max_docs=max_docs, max_chars=max_chars)
    assert chosen == _brute_force_sample(docs, max_docs, max_chars)
    if max_chars is not None:
        assert sum(map(len, chosen)) <= max_chars
    positions = [docs.index(doc) for doc in chosen]
    assert positions == sorted(positions)  # source order kept


def test_select_documents_is_stable_when_the_source_grows() -> None:
    old = [f"document number {i}" for i in range(200)]
    new_doc = "a document added in a later package version"
    before = set(select_documents(old, max_docs=30))
    after = set(select_documents([*old, new_doc], max_docs=30))
    assert after - {new_doc} <= before
    assert len(before - after) <= 1


def test_select_documents_rejects_bad_limits() -> None:
    with pytest.raises(ValueError, match="max_docs"):
        select_documents(["a"], max_docs=0)
    with pytest.raises(ValueError, match="max_chars"):
        select_documents(["a"], max_chars=-5)


# ---------------------------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------------------------

_SPHINX_PAGE = """<!DOCTYPE html><html><head><title>ignored title</title><script>var x = "<p>no</p>";</script>
<style>p {color: red}</style></head><body>
<div class="related"><ul><li>Navigation</li></ul></div>
<div class="document"><div class="body" role="main">
<section id="json"><h1>json &mdash; JSON encoder<a class="headerlink" href="#json">\u00b6</a></h1>
<p>Source code:
<a href="x">Lib/json</a></p>
<div class="admonition note"><p>Be careful<br>with input.</p></div>
<p>An unclosed paragraph
<pre>&gt;&gt;&gt; import json
&gt;&gt;&gt; json.dumps([1,   2])
'[1, 2]'</pre>
<section id="usage"><h2>Basic Usage<a class="headerlink" href="#usage">\u00b6</a></h2>
<table><tr><th>Option</th><th>Meaning</th></tr><tr><td>indent</td><td>spaces</td></tr></table>
<div class="sphinxsidebar"><div><p>sidebar text</p></div><p>more sidebar</p></div>
<ul><li><p>first item</p></li><li>second item</li></ul>
</section></section></div></div>
<div class="footer">Copyright footer</div></body></html>"""


def test_html_to_sections_keeps_prose_of_the_root_only() -> None:
    sections = html_to_sections(
        _SPHINX_PAGE, root_class="body", skip_classes=("headerlink", "sphinxsidebar", "related", "footer")
    )
    assert sections == [
        "json \u2014 JSON encoder\n\nSource code: Lib/json\n\nBe careful\nwith input.\n\nAn unclosed paragraph\n\n"
        ">>> import json\n>>> json.dumps([1,   2])\n'[1, 2]'",
        "Basic Usage\n\nOption Meaning\n\nindent spaces\n\nfirst item\n\nsecond item",
    ]


def test_html_to_sections_without_root_skips_by_class() -> None:
    page = (
        '<?xml version="1.0"?><html><body><div class="navheader"><div><p>Prev</p></div></div>'
        '<div class="chapter"><h1 class="title"><a id="x"/>Chapter 1</h1><div class="toc"><p>1.1 Intro</p></div>'
        "<p>Text of the chapter.</p><h2>1.1 Intro</h2><p>Intro text.</p></div>"
        '<div class="navfooter">Next</div></body></html>'
    )
    assert html_to_sections(page, skip_classes=("navheader", "navfooter", "toc")) == [
        "Chapter 1\n\nText of the chapter.",
        "1.1 Intro\n\nIntro text.",
    ]


# ---------------------------------------------------------------------------------------------------------------
# format parsers
# ---------------------------------------------------------------------------------------------------------------

_MEDIAWIKI = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">
<siteinfo><sitename>Wikipedia</sitename></siteinfo>
<page><title>Albedo</title><ns>0</ns><id>1</id><revision><id>5</id><text xml:space="preserve">{{Infobox|name={{nested|x}}}}
'''Albedo''' is the [[diffuse reflection|diffuse]] reflection of [[sunlight]].&lt;ref name="a"&gt;Cite&lt;/ref&gt;
[[File:Albedo.png|thumb|A [[picture]] caption]]
&lt;!-- hidden comment --&gt;
== Terrestrial albedo ==
* Snow reflects up to 90%&amp;nbsp;of light.&lt;ref&gt;Book&lt;/ref&gt;
{| class="wikitable"
|-
| cell || cell
|}
See [http://example.invalid the site] for more.
== See also ==
* [[Reflectance]]
[[Category:Radiometry]]
[[de:Albedo]]</text></revision></page>
<page><title>AccessibleComputing</title><ns>0</ns><id>2</id><redirect title="Computer accessibility" />
<revision><text>#REDIRECT [[Computer accessibility]]</text></revision></page>
<page><title>Talk:Albedo</title><ns>1</ns><id>3</id><revision><text>Talk text</text></revision></page>
</mediawiki>"""


def test_mediawiki_articles_skip_redirects_and_other_namespaces() -> None:
    articles = parse_mediawiki_xml(_MEDIAWIKI.encode("utf-8"))
    assert [title for title, _ in articles] == ["Albedo"]


def test_wikitext_to_text_strips_markup_and_tail_sections() -> None:
    ((title, wikitext),) = parse_mediawiki_xml(_MEDIAWIKI.encode("utf-8"))
    assert wikitext_to_text(wikitext, title) == (
        "Albedo\n\nAlbedo is the diffuse reflection of sunlight.\n\nTerrestrial albedo\n\n"
        "Snow reflects up to 90% of light.\n\nSee the site for more."  # the table left a blank line
    )


_GCIDE = """

00-database-short
   The Collaborative International Dictionary of English v.0.48

GCIDE is free software; preamble text.

Appendicitis \\Ap*pend`i*ci"tis\\, n. (Med.)
   Inflammation of the vermiform appendix.
   [1913 Webster]

Heart \\Heart\\ (h[aum]rt), n. [OE. harte; Goth. ha['i]rt[=o].
   Cf. {Cordial}.]
   1. (Anat.) A hollow, muscular organ.
      [1913 Webster]

   2. Courage; spirit. [Obs.]
      [1913 Webster] Stray

Cycloid \\Cy"cloid\\, n. (Geom.)
   A curve generated by a point of a rolling circle.
   [1913 Webster]

Launce \\Launce\\, n.
   A lance. [R.]
   [1913 Webster]

Pentathlon \\Pen*tath"lon\\, n. (Gr. Antiq.)
   A fivefold athletic contest.
   [Webster 1913 Suppl.]
"""


def test_parse_gcide_entries_labels_and_cleaning() -> None:
    entries = parse_gcide(_GCIDE)
    assert [(e.headword, e.labels) for e in entries] == [
        ("Appendicitis", ("Med.",)),
        ("Heart", ("Anat.",)),
        ("Cycloid", ("Geom.",)),
        ("Launce", ()),
        ("Pentathlon", ("Gr.", "Antiq.")),
    ]
    assert entries[0].text == "Appendicitis, n. (Med.) Inflammation of the vermiform appendix."
    assert entries[1].text == (
        "Heart, n. [OE. harte; Goth. hairto. Cf. Cordial.] 1. (Anat.) A hollow, muscular organ.\n"
        "2. Courage; spirit. [Obs.]"
    )
    assert entries[3].text == "Launce, n. A lance. [R.]"


def test_parse_license_file_splits_front_matter() -> None:
    text = "---\nkey: mit\ncategory: Permissive\nother_urls:\n  - http://x.invalid\nis_deprecated: yes\n---\n\nBody\n"
    meta, body = parse_license_file(text)
    assert meta == {"key": "mit", "category": "Permissive", "is_deprecated": "yes"}
    assert body == "\nBody\n"
    assert parse_license_file("no front matter") == ({}, "no front matter")


def test_parse_fortunes_splits_on_percent_lines() -> None:
    text = "First cookie\n\tline two\n%\nSecond %not a separator\n%\n\n%\nThird\n\t\t-- Author\n"
    assert parse_fortunes(text) == ["First cookie\n\tline two", "Second %not a separator", "Third\n\t\t-- Author"]


def test_clean_dasher_text_markup() -> None:
    assert clean_dasher_text("<d\u00e0>\u5927<ji\u0101>\u5bb6\u597d", "pinyin") == "\u5927\u5bb6\u597d"
    assert clean_dasher_text("\u308f\u304c>\u306f\u3044>\u306f", "segments") == "\u308f\u304c\u306f\u3044\u306f"
    assert clean_dasher_text("\ufeffplain <kept> text\r\n", None) == "plain <kept> text"
    with pytest.raises(ValueError, match="unknown Dasher markup"):
        clean_dasher_text("x", "bogus")


def test_python_source_units_split_at_top_level_only() -> None:
    funcs = [f"def f{i}(x):\n    y = x + {i}\n\n    return y * 2\n" for i in range(6)]
    source = '"""Module."""\n\nimport os\n\n\n' + "\n\n".join(funcs)
    units = python_source_units(source, 80)
    assert all(len(u) <= 80 for u in units)
    for unit in units:  # every chunk starts at a top-level statement, never inside a function
        assert not unit.startswith((" ", "\t"))
    assert _non_space("".join(units)) == _non_space(source)
    assert python_source_units("x = 1\n", 80) == ["x = 1"]


# ---------------------------------------------------------------------------------------------------------------
# storage
# ---------------------------------------------------------------------------------------------------------------


def test_jsonl_roundtrip_and_checksum(tmp_path: Path) -> None:
    docs = ["plain", "line one\nline two", 'quotes " and \\ backslash', "\u00e9\u4e2d\U0001f600"]
    path = tmp_path / "sub" / "d.jsonl"
    digest = write_jsonl(path, docs)
    assert read_jsonl(path) == docs
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() == sha256_file(path)
    assert len(path.read_text(encoding="utf-8").splitlines()) == len(docs)
    assert [p.name for p in path.parent.iterdir()] == ["d.jsonl"]  # no temporary file left


def test_read_jsonl_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"txt": "no"}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2"):
        read_jsonl(path)


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    atomic_write_bytes(path, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_manifest_roundtrip_and_validation(tmp_path: Path) -> None:
    data = {
        "format_version": 1,
        "corpus": "c",
        "built_at": "2025-01-01T00:00:00+00:00",
        "build_seconds": 1.5,
        "params": {"max_docs_per_domain": None},
        "targets": {},
        "domains": {
            "a": {
                "file": "a.jsonl", "source_kind": "deb", "source_package": "p", "source_version": "1",
                "num_docs": 2, "num_chars": 10, "sha256": "0" * 64, "source_detail": "",
            }
        },
    }  # fmt: skip
    manifest = Manifest.from_dict(data)
    assert manifest.to_dict() == data
    assert manifest.num_docs == {"a": 2}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**data, "format_version": 99}), encoding="utf-8")
    with pytest.raises(CorpusError, match="format_version 99"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"corpus": "c"}), encoding="utf-8")
    with pytest.raises(CorpusError, match="malformed manifest"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json", encoding="utf-8")
    with pytest.raises(CorpusError, match="not valid JSON"):
        read_manifest(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# the build pipeline on synthetic packages
# ---------------------------------------------------------------------------------------------------------------


class FakeFetcher:
    """Serves synthetic package trees by package name and counts what was asked for."""

    def __init__(self, sources: dict[str, object]) -> None:
        self.sources = sources
        self.calls: list[str] = []

    def get(self, source: PackageSource):
        self.calls.append(source.name)
        if source.name not in self.sources:
            raise FetchError(f"no synthetic package {source.name!r}")
        return self.sources[source.name]


def _write(root: Path, relative: str, data: bytes | str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def _dasher_package(tmp_path: Path) -> DirectorySource:
    root = tmp_path / "dasher"
    english = "\n".join(f"English sentence number {i} talks about the weather and tea." for i in range(120))
    greek_words = "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03cc \u03ba\u03b5\u03af\u03bc\u03b5\u03bd\u03bf"
    greek = "\n\n".join(f"{greek_words} {i}." for i in range(10))
    _write(root, "usr/share/dasher/training_english_GB.txt", "\ufeff" + english)
    _write(root, "usr/share/dasher/training_greek_GR.txt", greek)
    _write(root, "usr/share/dasher/training_spyNew.txt", "<d\u00e0>\u5927<ji\u0101>\u5bb6\u597d\u5417" * 30)
    return DirectorySource(root, kind="deb", name="dasher-data", version="5.0-test")


def test_build_multilingual_from_synthetic_package(tmp_path: Path) -> None:
    fetcher = FakeFetcher({"dasher-data": _dasher_package(tmp_path)})
    data = tmp_path / "data"
    manifest = build_corpus("multilingual", data, languages=["en", "el", "zh"], fetcher=fetcher)
    docs = load_corpus("multilingual", data, languages=["en", "el", "zh"])
    assert list(docs) == ["en", "el", "zh"] == list(manifest.domains)
    english_lines = [f"English sentence number {i} talks about the weather and tea." for i in range(120)]
    assert "\n".join(docs["en"]) == "\n".join(english_lines)  # chunks at line breaks, nothing lost or added
    assert all(len(d) <= manifest.params["max_doc_chars"] for d in docs["en"])
    assert len(docs["el"]) == 1 and "<" not in docs["zh"][0]
    for name, record in manifest.domains.items():
        path = corpus_folder("multilingual", data, languages=["en", "el", "zh"]) / record.file
        assert record.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert record.num_docs == len(docs[name]) and record.num_chars == sum(map(len, docs[name]))
        assert (record.source_package, record.source_version) == ("dasher-data", "5.0-test")
    assert manifest.params["languages"] == ["en", "el", "zh"]


def test_build_fast_path_rebuild_on_corruption_and_parameter_change(tmp_path: Path) -> None:
    fetcher = FakeFetcher({"dasher-data": _dasher_package(tmp_path)})
    data = tmp_path / "data"
    first = build_corpus("multilingual", data, languages=["en", "el"], fetcher=fetcher)
    assert fetcher.calls == ["dasher-data"] * 2
    again = build_corpus("multilingual", data, languages=["en", "el"], fetcher=fetcher)
    assert again == first and len(fetcher.calls) == 2  # valid cache: nothing fetched, same manifest

    folder = corpus_folder("multilingual", data, languages=["en", "el"])
    assert folder.parent == data and folder.name.startswith("multilingual-")  # not the default languages
    en_file = folder / "en.jsonl"
    en_file.write_text('{"text": "tampered"}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match="damaged"):
        load_corpus(folder)
    assert load_corpus(folder, verify=False)["en"] == ["tampered"]
    rebuilt = build_corpus("multilingual", data, languages=["en", "el"], fetcher=fetcher)
    assert len(fetcher.calls) == 4
    assert rebuilt.domains == first.domains  # deterministic: same files, same checksums

    # other parameters build beside the first build: nothing of it is replaced or deleted
    capped = build_corpus("multilingual", data, languages=["en"], max_docs_per_domain=1, fetcher=fetcher)
    assert capped.num_docs == {"en": 1}
    capped_folder = corpus_folder("multilingual", data, languages=["en"], max_docs_per_domain=1)
    assert capped_folder != folder
    assert sorted(p.name for p in capped_folder.iterdir() if not p.name.startswith(".")) == ["en.jsonl", MANIFEST_NAME]
    assert load_corpus(folder) == load_corpus(folder, verify=True) and set(load_corpus(folder)) == {"en", "el"}


def test_build_rebuilds_when_manifest_is_garbage(tmp_path: Path) -> None:
    fetcher = FakeFetcher({"dasher-data": _dasher_package(tmp_path)})
    data = tmp_path / "data"
    build_corpus("multilingual", data, languages=["el"], fetcher=fetcher)
    (corpus_folder("multilingual", data, languages=["el"]) / MANIFEST_NAME).write_text("garbage", encoding="utf-8")
    manifest = build_corpus("multilingual", data, languages=["el"], fetcher=fetcher)
    assert len(fetcher.calls) == 2 and manifest.num_docs == {"el": 1}


@pytest.mark.parametrize("manifest", [None, "other", "garbage"])
def test_a_custom_folder_under_a_corpus_name_is_never_rebuilt_or_deleted(tmp_path: Path, manifest) -> None:
    fetcher = FakeFetcher({"dasher-data": _dasher_package(tmp_path)})
    data = tmp_path / "data"
    folder = corpus_folder("multilingual", data, languages=["el"])
    folder.mkdir(parents=True)
    (folder / "mine.jsonl").write_text('{"text": "my own data"}\n', encoding="utf-8")
    if manifest == "other":
        (folder / MANIFEST_NAME).write_text(json.dumps({"corpus": "my_corpus", "domains": {}, "params": {}}))
    elif manifest == "garbage":
        (folder / MANIFEST_NAME).write_text("garbage", encoding="utf-8")
    before = sorted((p.name, p.read_bytes()) for p in folder.iterdir())
    with pytest.raises(CorpusError, match=r"did not|not made"):
        build_corpus("multilingual", data, languages=["el"], fetcher=fetcher)
    assert sorted((p.name, p.read_bytes()) for p in folder.iterdir()) == before and fetcher.calls == []


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


@pytest.fixture()
def synthetic_domain_packages(tmp_path: Path) -> FakeFetcher:
    test_data = "gensim/test/test_data/"
    gensim = _zip(
        tmp_path / "gensim.whl",
        {
            test_data + "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2": bz2.compress(
                _MEDIAWIKI.encode("utf-8")
            ),
            test_data + "lee_background.cor": b"First news story about a bushfire near Sydney.\n"
            b"Second news story about cricket scores.\n",
            test_data + "lee.cor": b"Second news story about cricket scores.\nThird story about elections.\n",
        },
    )
    licenses = _zip(
        tmp_path / "licensedcode.whl",
        {
            "licensedcode/data/licenses/mit.LICENSE": b"---\nkey: mit\n---\nPermission is hereby granted, free.\n",
            "licensedcode/data/licenses/old.LICENSE": b"---\nkey: old\nis_deprecated: yes\n---\nOld license text.\n",
            "licensedcode/data/licenses/fr.LICENSE": b"---\nkey: fr\nlanguage: fr\n---\nLicence en fran\xc3\xa7ais.\n",
        },
    )
    doc_root = tmp_path / "pydoc"
    html_dir = "usr/share/doc/python3.11/html/"
    _write(doc_root, html_dir + "library/json.html", _SPHINX_PAGE)
    _write(doc_root, html_dir + "genindex-A.html", '<div class="body"><h1>Index A</h1><p>index entry</p></div>')
    _write(doc_root, html_dir + "_static/x.html", '<div class="body"><p>static junk page</p></div>')
    stdlib_root = tmp_path / "stdlib"
    _write(stdlib_root, "bisect.py", '"""Bisection algorithms."""\n\ndef f(a):\n    return a\n')
    _write(stdlib_root, "test/test_bisect.py", "def test_f():\n    assert True\n")
    _write(stdlib_root, "site-packages/thirdparty/x.py", "THIRD_PARTY = 1  # not the stdlib\n")
    gcide_root = tmp_path / "gcide"
    _write(gcide_root, "usr/share/dictd/gcide.dict.dz", gzip.compress(_GCIDE.encode("utf-8")))
    fortunes_root = tmp_path / "fortunes"
    poems = "A bit of talcum\nIs always walcum\n%\nA short poem, two\nlines of it\n"
    _write(fortunes_root, "usr/share/games/fortunes/songs-poems", poems)
    return FakeFetcher(
        {
            "gensim": WheelSource(gensim, name="gensim", version="4.4.0"),
            "licensedcode-data": WheelSource(licenses, name="licensedcode-data", version="32.1.0"),
            "python3.11-doc": DirectorySource(doc_root, kind="deb", name="python3.11-doc", version="3.11-test"),
            "python": DirectorySource(stdlib_root, kind="python-stdlib", name="python", version="3.11.0"),
            "dict-gcide": DirectorySource(gcide_root, kind="deb", name="dict-gcide", version="0.48-test"),
            "fortunes": DirectorySource(fortunes_root, kind="deb", name="fortunes", version="1.99-test"),
        }
    )


def test_build_domains_corpus_and_targets_from_synthetic_packages(
    tmp_path: Path, synthetic_domain_packages: FakeFetcher
) -> None:
    data = tmp_path / "data"
    manifest = build_corpus("domains", data, fetcher=synthetic_domain_packages)
    docs = load_corpus("domains", data)
    assert list(docs) == ["encyclopedia", "news", "legal", "technical", "code", "dictionary", "literature"]
    assert docs["encyclopedia"][0].startswith("Albedo\n\nAlbedo is the diffuse reflection")
    assert docs["news"] == [
        "First news story about a bushfire near Sydney.",
        "Second news story about cricket scores.",
        "Third story about elections.",
    ]
    assert docs["legal"] == ["Permission is hereby granted, free."]
    assert docs["technical"][0].startswith("json \u2014 JSON encoder") and len(docs["technical"]) == 2
    assert not any("index entry" in d or "static junk" in d for d in docs["technical"])
    assert docs["code"] == ['"""Bisection algorithms."""\n\ndef f(a):\n    return a']
    heads = [d.split(",", 1)[0] for d in docs["dictionary"]]
    assert heads == ["Launce", "Pentathlon"]  # Med./Anat./Geom. entries are targets, kept out of training
    assert docs["literature"] == ["A bit of talcum\nIs always walcum", "A short poem, two\nlines of it"]
    assert manifest.targets == {"medical": "target_medical", "math": "target_math"}
    assert manifest.domains["code"].source_kind == "python-stdlib"

    medical = build_corpus("target_medical", data, fetcher=synthetic_domain_packages)
    assert [d.split(",", 1)[0] for d in load_corpus("target_medical", data)["medical"]] == ["Appendicitis", "Heart"]
    assert medical.domains["medical"].source_package == "dict-gcide"
    fetched = len(synthetic_domain_packages.calls)
    # build_target finds the valid cache: same documents, nothing fetched
    assert build_target("medical", data)[0].startswith("Appendicitis")
    assert len(synthetic_domain_packages.calls) == fetched


def test_build_errors_name_the_problem(tmp_path: Path) -> None:
    fetcher = FakeFetcher({"dasher-data": _dasher_package(tmp_path)})
    data = tmp_path / "data"
    with pytest.raises(CorpusError, match="unknown corpus 'nope'"):
        build_corpus("nope", data)
    with pytest.raises(CorpusError, match=r"unknown language\(s\) \['xx'\]"):
        build_corpus("multilingual", data, languages=["en", "xx"], fetcher=fetcher)
    with pytest.raises(CorpusError, match="string"):
        build_corpus("multilingual", data, languages="en", fetcher=fetcher)
    with pytest.raises(CorpusError, match="repeat"):
        build_corpus("multilingual", data, languages=["en", "en"], fetcher=fetcher)
    with pytest.raises(CorpusError, match="has no languages"):
        build_corpus("domains", data, languages=["en"], fetcher=fetcher)
    with pytest.raises(CorpusError, match="max_docs_per_domain"):
        build_corpus("multilingual", data, max_docs_per_domain=0, fetcher=fetcher)
    with pytest.raises(CorpusError, match="smaller than every document"):
        build_corpus("multilingual", data, languages=["en"], max_chars_per_domain=3, fetcher=fetcher)
    with pytest.raises(FetchError, match="gensim"):
        build_corpus("domains", data, fetcher=FakeFetcher({}))
    with pytest.raises(CorpusError, match="unknown target"):
        build_target("astrology", data)
    assert fetcher.calls == ["dasher-data"]  # validation happens before any fetch


def test_load_corpus_errors_and_paths(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match=r"build_corpus\('domains'"):
        load_corpus("domains", tmp_path)
    with pytest.raises(CorpusError, match="neither a built corpus folder"):
        load_corpus(str(tmp_path / "nowhere"), tmp_path)
    fetcher = FakeFetcher({"dasher-data": _dasher_package(tmp_path)})
    build_corpus("multilingual", tmp_path / "d", languages=["el"], fetcher=fetcher)
    folder = corpus_folder("multilingual", tmp_path / "d", languages=["el"])
    by_name = load_corpus("multilingual", tmp_path / "d", languages=["el"])
    assert load_corpus(folder) == by_name == load_corpus(folder / MANIFEST_NAME)
    assert load_manifest(folder).corpus == "multilingual"


def test_registry_listing() -> None:
    assert {"multilingual", "multilingual_ref", "domains", "target_medical", "target_math"} <= set(available_corpora())
    assert set(available_targets()) == {"medical", "math"}
    assert {"en", "es", "de", "fr", "ru", "fi", "tr", "el", "zh", "ja"} <= set(available_languages("multilingual"))
    assert available_languages("multilingual_ref") == ["en", "de", "fr", "es", "it", "ja", "pt", "zh-cn"]
    assert available_languages("domains") == []


def test_default_data_dir_follows_environment() -> None:
    # read-only check of the documented rule against the current environment
    env = os.environ.get("GRADMIX_DATA")
    expected = Path(env).expanduser() if env else Path.home() / ".cache" / "gradmix"
    assert default_data_dir() == expected


# ---------------------------------------------------------------------------------------------------------------
# fetching: failures are fast and name the package and the command
# ---------------------------------------------------------------------------------------------------------------


def test_fetch_deb_unknown_package_fails_fast_naming_it(tmp_path: Path) -> None:
    with pytest.raises(FetchError) as info:
        fetch_deb("gradmix-no-such-package-xyz", tmp_path, allow_apt_update=False)
    message = str(info.value)
    assert "gradmix-no-such-package-xyz" in message
    assert "apt-get" in message


def test_fetch_deb_with_empty_apt_lists_says_to_update(tmp_path: Path) -> None:
    empty_lists = tmp_path / "lists"
    empty_lists.mkdir()
    with pytest.raises(FetchError) as info:
        fetch_deb("gradmix-no-such-package-xyz", tmp_path, allow_apt_update=False, lists_dir=empty_lists)
    message = str(info.value)
    assert "gradmix-no-such-package-xyz" in message
    assert "apt-get update" in message


def test_fetch_rejects_invalid_names_without_running_anything(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="not a valid Debian package name"):
        fetch_deb("Bad Name!", tmp_path)
    with pytest.raises(FetchError, match="not a valid PyPI package name"):
        fetch_wheel("bad name!", "1.0", tmp_path)
    with pytest.raises(FetchError, match="pinned version"):
        fetch_wheel("gensim", "", tmp_path)
    assert not (tmp_path / "debs").exists() and not (tmp_path / "wheels").exists()


def test_run_tool_missing_program_names_package(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="'no-such-program-gradmix' is not installed") as info:
        run_tool(["no-such-program-gradmix", "x"], package="somepkg", timeout=5)
    assert "somepkg" in str(info.value)


def test_unpack_deb_of_garbage_fails_clearly(tmp_path: Path) -> None:
    fake = tmp_path / "debs" / "fake_1.0_all.deb"
    fake.parent.mkdir()
    fake.write_bytes(b"this is not an ar archive")
    with pytest.raises(FetchError, match="fake"):
        unpack_deb(FetchedPackage("deb", "fake", "1.0", fake), tmp_path)
    assert not (tmp_path / "unpacked" / "fake_1.0").exists()


# ---------------------------------------------------------------------------------------------------------------
# the tiny built-in corpus
# ---------------------------------------------------------------------------------------------------------------


def test_tiny_corpus_ships_four_real_domains() -> None:
    corpus = load_tiny_corpus()
    assert list(corpus) == ["changelog", "code", "docs", "legal"]
    for domain, docs in corpus.items():
        size = sum(len(doc.encode("utf-8")) for doc in docs)
        assert 15_000 <= size <= 40_000, (domain, size)
        assert len(docs) >= 10
        assert all(doc.strip() and TINY_DOC_SEPARATOR not in doc for doc in docs)
        assert len(set(docs)) == len(docs)
        assert not any(re.search(r"GNU (Lesser )?General Public License", doc) for doc in docs)
    assert any("def insort_right" in doc for doc in corpus["code"])
    assert any("Permission is hereby granted, free of charge" in doc for doc in corpus["legal"])


def test_tiny_file_format_roundtrip(tmp_path: Path) -> None:
    # the tiny files are read by the library's one document reader
    docs = ["first doc\nwith two lines", "    indented code start\n    x = 1", "third"]
    text = _format_tiny_file(docs)
    assert text.count(f"\n{TINY_DOC_SEPARATOR}\n") == 2
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    assert read_documents(tmp_path / "a.txt") == docs
    (tmp_path / "b.txt").write_text(f"a\n{TINY_DOC_SEPARATOR}\n\n{TINY_DOC_SEPARATOR}\nb\n", encoding="utf-8")
    assert read_documents(tmp_path / "b.txt") == ["a", "b"]
    with pytest.raises(CorpusError, match="separator"):
        _format_tiny_file([f"bad\n{TINY_DOC_SEPARATOR}\ndoc"])


# ---------------------------------------------------------------------------------------------------------------
# integration: real packages from the registries
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh data folder; GRADMIX_TEST_DOWNLOADS may point at a download cache to reuse (saves ~100 MB)."""
    data = tmp_path_factory.mktemp("gradmix-data")
    reuse = os.environ.get("GRADMIX_TEST_DOWNLOADS")
    if reuse:
        (data / "_downloads").symlink_to(Path(reuse).expanduser().resolve(), target_is_directory=True)
    return data


@pytest.mark.integration
def test_real_multilingual_slice_and_uneven_full_sizes(real_data_dir: Path) -> None:
    manifest = build_corpus("multilingual", real_data_dir, max_docs_per_domain=5)
    assert list(manifest.domains) == ["en", "es", "de", "fr", "ru", "fi", "tr", "el"]
    assert manifest.num_docs == {lang: 5 for lang in manifest.domains}
    assert all(r.source_package == "dasher-data" and r.source_version for r in manifest.domains.values())
    docs = load_corpus("multilingual", real_data_dir, max_docs_per_domain=5)
    assert re.search(r"[\u0391-\u03c9]", docs["el"][0]) and re.search(r"[\u0430-\u044f]", docs["ru"][0])
    assert build_corpus("multilingual", real_data_dir, max_docs_per_domain=5) == manifest  # cached

    full = build_corpus("multilingual", real_data_dir)
    assert corpus_folder("multilingual", real_data_dir).name == "multilingual"  # defaults: the plain name
    assert load_corpus("multilingual", real_data_dir)["el"] != docs["el"]  # both builds kept, side by side
    chars = full.num_chars
    assert max(chars.values()) > 10 * min(chars.values())  # uneven on purpose
    assert chars["es"] > chars["de"] > chars["en"] > chars["el"]


@pytest.mark.integration
def test_real_multilingual_ref_slice(real_data_dir: Path) -> None:
    manifest = build_corpus("multilingual_ref", real_data_dir, max_docs_per_domain=8, languages=["en", "ja"])
    assert manifest.num_docs == {"en": 8, "ja": 8}
    docs = load_corpus("multilingual_ref", real_data_dir, max_docs_per_domain=8, languages=["en", "ja"])
    assert any("Debian" in d for d in docs["en"])
    assert any(re.search(r"[\u3040-\u30ff]", d) for d in docs["ja"])


@pytest.mark.integration
def test_real_domains_slice_and_medical_target(real_data_dir: Path) -> None:
    manifest = build_corpus("domains", real_data_dir, max_docs_per_domain=10)
    assert manifest.num_docs == {name: 10 for name in manifest.domains}
    assert {r.source_package for r in manifest.domains.values()} == {
        "gensim", "licensedcode-data", "python3.11-doc", "python", "dict-gcide", "fortunes",
    }  # fmt: skip
    assert manifest.domains["legal"].source_version == "32.1.0"
    docs = load_corpus("domains", real_data_dir, max_docs_per_domain=10)
    assert any("def " in d or "import " in d for d in docs["code"])
    medical = build_target("medical", real_data_dir, max_docs=20)
    assert len(medical) == 20
    assert all(re.search(r"\((Med|Anat|Physiol|Surg)\.", d) for d in medical)
    assert not set(medical) & set(docs["dictionary"])


@pytest.mark.integration
def test_real_build_is_deterministic(tmp_path: Path, real_data_dir: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "_downloads").symlink_to(real_data_dir / "_downloads", target_is_directory=True)
    a = build_corpus("multilingual", real_data_dir, languages=["fi", "tr"], max_chars_per_domain=50_000)
    b = build_corpus("multilingual", other, languages=["fi", "tr"], max_chars_per_domain=50_000)
    assert {k: r.sha256 for k, r in a.domains.items()} == {k: r.sha256 for k, r in b.domains.items()}
    assert all(r.num_chars <= 50_000 for r in a.domains.values())


@pytest.mark.integration
def test_real_fetch_wheel_unknown_package_names_it(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"gradmix-no-such-package-xyz==1.0.0"):
        fetch_wheel("gradmix-no-such-package-xyz", "1.0.0", tmp_path)


def test_read_documents_normalises_separators_and_rejects_non_string_text(tmp_path: Path) -> None:
    sep = TINY_DOC_SEPARATOR
    (tmp_path / "crlf.txt").write_bytes(f"one\r\n  {sep}  \r\ntwo\r\nlines\r\n{sep}\r\nthree\r\n".encode())
    assert read_documents(tmp_path / "crlf.txt") == ["one", "two\nlines", "three"]
    (tmp_path / "blank.txt").write_bytes(b"first\r\n\r\nsecond\r\n")
    assert read_documents(tmp_path / "blank.txt") == ["first", "second"]
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": 42}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'text' must be a string, got int"):
        read_documents(tmp_path / "bad.jsonl")
