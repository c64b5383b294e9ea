"""Gradient-conflict diagnosis (issue 12): the pure estimators, and `gradmix diagnose` end to end on a real GPT with
real gradients, on two domains built to conflict and two built to agree."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from gradmix.diagnostics import diagnose, gram_cosines
from gradmix_kit.cli import main

# -- pure ----------------------------------------------------------------------------------------------------------


def _grams(cos: float, steps: int = 20, noise: float = 0.05, seed: int = 0) -> list[np.ndarray]:
    """Gramians of two unit-norm gradients at the given cosine, with unbiased-looking noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        g = np.array([[1.0, cos], [cos, 1.0]]) + rng.normal(0, noise, (2, 2))
        out.append((g + g.T) / 2)
    return out


def test_gram_cosines():
    g = np.array([[4.0, -2.0, 0.0], [-2.0, 1.0, 5.0], [0.0, 5.0, -1.0]])
    cos = gram_cosines(g)
    assert cos[0, 1] == pytest.approx(-1.0) and cos[0, 0] == 1.0
    assert np.isnan(cos[1, 2]) and np.isnan(cos[2, 2])  # a negative squared-norm estimate: no direction


def test_conflicting_gradients_are_reported_with_c_and_pairs():
    d = diagnose(_grams(-0.8), ["a", "b"])
    assert d.verdict == "strong" and d.c == pytest.approx(0.8, abs=0.05) and d.c_bar == 0.0
    assert d.conflict_fraction == 1.0 and d.conflict_fraction_threshold == 1.0
    assert d.cosine[0][1] == pytest.approx(-0.8, abs=0.05)
    assert d.conflicting_pairs[0]["domains"] == ["a", "b"]
    assert d.c is not None
    assert d.beta_uniform == pytest.approx(1 - 2 * d.c)
    assert "Strong gradient conflict" in d.recommendation and "a / b" in d.recommendation


def test_agreeing_gradients_are_low_conflict():
    d = diagnose(_grams(0.9), ["a", "b"])
    assert d.verdict == "low" and d.c == 0.0 and d.c_bar == pytest.approx(0.9, abs=0.05)
    assert d.conflict_fraction == 0.0 and "PiKE's low-conflict assumption holds" in d.recommendation


def test_a_conflict_phase_is_found_even_when_the_run_mean_is_positive():
    grams = _grams(0.9, 10) + _grams(-0.6, 15, seed=1) + _grams(0.9, 15, seed=2)
    d = diagnose(grams, ["a", "b"])
    assert d.cosine[0][1] is not None
    assert d.cosine[0][1] > 0  # the run mean hides it ...
    assert d.c == pytest.approx(0.6, abs=0.1) and d.verdict == "strong"  # ... the blocks of steps do not
    assert 11 <= d.conflicting_pairs[0]["steps"][0] <= 16


def test_moderate_and_threshold_and_three_domains():
    g = np.array([[1.0, -0.15, 0.5], [-0.15, 1.0, 0.5], [0.5, 0.5, 1.0]])
    d = diagnose([g] * 6, ["x", "y", "z"], threshold=0.1)
    assert d.verdict == "moderate" and d.c == pytest.approx(0.15)
    assert d.conflict_fraction == pytest.approx(1 / 3) and d.conflict_fraction_threshold == pytest.approx(1 / 3)
    d2 = diagnose([g] * 6, ["x", "y", "z"], threshold=0.2)
    assert d2.conflict_fraction_threshold == 0.0
    assert len(d.to_dict()["cosine"]) == 3 and set(d.cosine_over_time) == {"x|y", "x|z", "y|z"}


def test_bad_input():
    with pytest.raises(ValueError, match="at least 2 domains"):
        diagnose([np.eye(1)], ["a"])
    with pytest.raises(ValueError, match="shape"):
        diagnose([np.eye(3)], ["a", "b"])
    d = diagnose([-np.eye(2)] * 3, ["a", "b"])
    assert d.verdict == "unknown" and d.c is None


# -- the command, on a real model ----------------------------------------------------------------------------------

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _write_corpus(folder: Path, shift_b: int) -> None:
    """Two domains of letter sequences: each next letter is the previous one shifted (10% random). Domain a shifts by
    1; domain b by ``shift_b``: 1 = the same distribution (agree), 7 = the same contexts with other continuations,
    so the two domains' gradients on the next-letter prediction point apart (conflict)."""
    rng = random.Random(0)
    folder.mkdir(parents=True)

    def doc(shift: int) -> str:
        i, out = rng.randrange(26), []
        for _ in range(80):
            out.append(LETTERS[i])
            i = rng.randrange(26) if rng.random() < 0.1 else (i + shift) % 26
        return "".join(out)

    (folder / "a.txt").write_text("\n\n".join(doc(1) for _ in range(60)))
    (folder / "b.txt").write_text("\n\n".join(doc(shift_b) for _ in range(60)))


def _config(tmp_path: Path, kind: str) -> Path:
    corpus = tmp_path / f"corpus-{kind}"
    _write_corpus(corpus, 7 if kind == "conflict" else 1)
    path = tmp_path / f"{kind}.toml"
    path.write_text(f"""
name = "diagnose-{kind}"
seed = 0
threads = 2
[data]
corpus = "{corpus}"
data_dir = "{tmp_path / "cache"}"
window = 32
vocab_size = 260
[model]
d_model = 16
n_layers = 1
n_heads = 1
[train]
batch_size = 32
lr = 0.03
warmup_steps = 2
""")
    return path


@pytest.mark.parametrize("kind", ["conflict", "agree"])
def test_gradmix_diagnose_reports_conflict_and_agreement(tmp_path, kind, capsys):
    out = tmp_path / f"out-{kind}"
    assert main(["diagnose", str(_config(tmp_path, kind)), "--steps", "40", "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "diagnosis.json").read_text())
    assert {"domains", "cosine", "conflict_fraction", "c", "c_bar", "recommendation"} <= set(result)
    assert result["domains"] == ["a", "b"] and result["usable_measurements"] >= 20
    assert len(result["cosine"]) == 2 and result["cosine"][0][0] == 1.0
    for name in ("cosine_heatmap.png", "cosine_over_time.png", "diagnosis.html"):
        assert (out / name).is_file(), name
    page = (out / "diagnosis.html").read_text()
    printed = capsys.readouterr().out
    if kind == "conflict":
        assert result["verdict"] == "strong" and result["c"] > 0.3 and result["conflict_fraction"] == 1.0
        assert result["conflicting_pairs"][0]["domains"] == ["a", "b"]
        assert "Strong gradient conflict" in result["recommendation"] and "strong" in printed
    else:
        assert result["verdict"] == "low" and result["c"] < 0.1 and result["conflict_fraction"] == 0.0
        assert result["cosine"][0][1] > 0.5 and result["c_bar"] > 0.5
        assert "low-conflict assumption holds" in result["recommendation"]
    assert "Recommendation" in page and "cosine_heatmap.png" in page
    assert result["c_interval"][0] <= result["c"] <= result["c_interval"][1] and "interval" in printed
    # the case: 5 steps once said "low conflict" on the conflicting corpus; now: not enough evidence
    short = tmp_path / f"short-{kind}"
    config = tmp_path / f"{kind}.toml"
    assert main(["diagnose", str(config), "--steps", "5", "--out", str(short), "--no-progress"]) == 0
    result = json.loads((short / "diagnosis.json").read_text())
    assert result["verdict"] == "not enough evidence" and result["usable_measurements"] == 5
    assert "Not enough evidence yet (5 usable steps" in result["recommendation"]
    assert "not enough evidence" in capsys.readouterr().out


def test_gradmix_diagnose_from_a_checkpoint_does_not_train(tmp_path):
    config = _config(tmp_path, "agree")
    run = tmp_path / "run"
    assert (
        main(
            [
                "run",
                str(config),
                "--out",
                str(run),
                "--no-progress",
                "--set",
                "steps=4",
                "--set",
                "eval.continuation_items=0",
            ]
        )
        == 0
    )
    out = tmp_path / "diag"
    assert (
        main(
            [
                "diagnose",
                str(config),
                "--checkpoint",
                str(run / "checkpoint.pt"),
                "--steps",
                "3",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    result = json.loads((out / "diagnosis.json").read_text())
    assert result["source"].startswith("checkpoint") and result["num_measurements"] == 3
    assert result["window"] == 3 and len(result["blocks"]) == 1  # one iterate: one block
    assert main(["diagnose", str(config), "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(out)]) == 2
