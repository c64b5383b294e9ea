"""Progress bars (issue 24, item 2): corpus builds, k-means and training show a bar on a terminal only, never with
--no-progress / GRADMIX_NO_PROGRESS, and never in a metrics file (bars go to standard error)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tqdm")

from gradmix_kit.progress import QUIET_ENV, NullBar, progress_bar, progress_enabled

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.toml"


class Terminal(io.StringIO):
    """Standard error as a terminal (what tqdm writes is kept for the test)."""

    def isatty(self) -> bool:
        return True


def use_terminal(monkeypatch) -> Terminal:
    """Standard error becomes a terminal, in the test's body (pytest puts its own capture back between phases)."""
    stream = Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.delenv(QUIET_ENV, raising=False)
    return stream


def test_a_bar_only_on_a_terminal_and_not_when_quiet(monkeypatch):
    use_terminal(monkeypatch)
    assert progress_enabled() and progress_enabled(None)
    assert not progress_enabled(False)
    monkeypatch.setenv(QUIET_ENV, "1")
    assert not progress_enabled() and isinstance(progress_bar(3, "x"), NullBar)
    monkeypatch.setenv(QUIET_ENV, "0")
    assert progress_enabled()
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file or a pipe
    assert not progress_enabled() and isinstance(progress_bar(3, "x"), NullBar)


def test_the_corpus_build_shows_its_domains_on_a_terminal(tmp_path, monkeypatch):
    terminal = use_terminal(monkeypatch)
    from gradmix_kit.corpora import build_corpus
    from test_corpora import FakeFetcher, _dasher_package

    fetcher = FakeFetcher({"dasher-data": _dasher_package(tmp_path)})
    build_corpus("multilingual", tmp_path / "data", languages=["en", "el"], fetcher=fetcher)
    shown = terminal.getvalue()
    assert "building corpus multilingual" in shown and "2/2" in shown
    again = len(shown)
    build_corpus("multilingual", tmp_path / "data", languages=["en", "el"], fetcher=fetcher)
    assert len(terminal.getvalue()) == again  # a cached build shows nothing
    build_corpus("multilingual", tmp_path / "data2", languages=["en"], fetcher=fetcher, progress=False)
    assert len(terminal.getvalue()) == again


def test_the_corpus_build_is_silent_off_a_terminal(tmp_path, capsys):
    from gradmix_kit.corpora import build_corpus
    from test_corpora import FakeFetcher, _dasher_package

    build_corpus(
        "multilingual",
        tmp_path / "data",
        languages=["en"],
        fetcher=FakeFetcher({"dasher-data": _dasher_package(tmp_path)}),
    )
    assert capsys.readouterr().err == ""


def test_kmeans_shows_its_fits_on_a_terminal(monkeypatch):
    terminal = use_terminal(monkeypatch)
    pytest.importorskip("sklearn")
    from gradmix_kit.clustering import cluster_corpus
    from gradmix_kit.clustering.granularity import granularity_report

    points = np.random.default_rng(0).normal(size=(60, 4))
    result = cluster_corpus(None, 6, 2, embeddings=points, show_progress=True)
    assert "k-means" in terminal.getvalue() and "2/2" in terminal.getvalue()
    granularity_report(points, [3, 6], show_progress=True)
    assert "granularity report" in terminal.getvalue()
    quiet = cluster_corpus(None, 6, 2, embeddings=points, show_progress=False)
    np.testing.assert_array_equal(quiet.fine_labels, result.fine_labels)  # a bar changes nothing


def test_the_training_bar_never_reaches_the_metrics_files(tmp_path, monkeypatch):
    terminal = use_terminal(monkeypatch)
    from gradmix_kit.cli import main

    out = tmp_path / "run"
    args = [
        "run",
        str(SMOKE),
        "--out",
        str(out),
        "--method",
        "uniform",
        "--set",
        "steps=6",
        "--set",
        "train.eval_every=3",
    ]
    assert main([*args, "--set", 'logging.writers=["jsonl", "csv"]']) == 0
    assert "smoke:uniform:s0" in terminal.getvalue()  # the bar was on (standard error)
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line)
    text = (out / "metrics.jsonl").read_text() + (out / "metrics.csv").read_text()
    assert "\r" not in text and "it/s" not in text and "smoke:uniform" not in text
    before = len(terminal.getvalue())
    assert main([*args, "--out", str(tmp_path / "quiet"), "--no-progress"]) == 0
    assert "smoke:uniform" not in terminal.getvalue()[before:]
