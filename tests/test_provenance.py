"""Corpus records beside results tables, and the warning when a run's data or software differ from the record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradmix_kit.cli import main
from gradmix_kit.experiment.config import load_config
from gradmix_kit.experiment.provenance import corpus_record, documents_digest, record_differences
from gradmix_kit.experiment.runner import check_corpus_record, prepare_data

SMOKE = Path(__file__).parents[1] / "configs" / "smoke.toml"


def _record(**changes):
    train = {"a": ["one doc", "two doc"], "b": ["three"]}
    val = {"a": ["held out"], "b": ["four"]}
    manifest = {"domains": {"a": {"source_package": "pkg", "source_version": "1.0"}}}
    train.update(changes.get("train", {}))
    return corpus_record(train, val, corpus="c", manifest=manifest, target=changes.get("target"), threads=2)


def test_digest_depends_on_documents_and_their_boundaries():
    assert documents_digest(["ab", "c"]) != documents_digest(["a", "bc"])
    assert documents_digest(["ab", "c"]) == documents_digest(["ab", "c"])


def test_identical_records_have_no_differences_and_json_round_trips():
    rec = _record()
    assert record_differences(json.loads(json.dumps(rec)), rec) == []
    assert rec["domains"]["a"]["source"] == "pkg 1.0" and rec["domains"]["b"]["source"] is None
    assert rec["software"]["torch_threads"] == 2 and rec["software"]["torch"]


def test_differences_name_the_domain_and_what_changed():
    base = _record()
    changed = _record(train={"a": ["one doc", "two docs!"]})
    diffs = record_differences(base, changed)
    assert diffs == ["domain 'a': its documents differ from the recorded ones (SHA-256)"]
    fewer = _record(train={"b": []})
    assert any("domain 'b': 0 train docs, recorded 1" in d for d in record_differences(base, fewer))
    soft = json.loads(json.dumps(base))
    soft["software"]["torch"] = "0.0.1"
    assert any(d.startswith("torch: ") and "recorded 0.0.1" in d for d in record_differences(soft, base))
    with_target = _record(target=["t1", "t2"])
    assert any(d.startswith("target set") for d in record_differences(base, with_target))


def test_prepare_data_records_the_corpus_and_a_comparison_warns_on_a_different_record(tmp_path, recwarn):
    cfg = load_config(SMOKE)
    data = prepare_data(cfg)
    record = data.info["corpus_record"]
    assert set(record["domains"]) == set(data.train.names)
    path = tmp_path / "corpus_record.json"
    path.write_text(json.dumps(record))
    cfg["data"]["expected_corpus"] = str(path)
    lines: list[str] = []
    assert check_corpus_record(cfg, record, lines.append) == [] and "match" in lines[-1]
    name = data.train.names[0]
    tampered = json.loads(json.dumps(record))
    tampered["domains"][name]["train_sha256"] = "0" * 64
    path.write_text(json.dumps(tampered))
    with pytest.warns(UserWarning, match=f"domain '{name}'"):
        diffs = check_corpus_record(cfg, record, lines.append)
    assert diffs and lines[-1].startswith("WARNING")
    cfg["data"]["expected_corpus"] = str(tmp_path / "missing.json")
    with pytest.warns(UserWarning, match="does not exist"):
        assert check_corpus_record(cfg, record, lines.append)


def test_compare_writes_the_corpus_record(tmp_path):
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                str(SMOKE),
                "--methods",
                "uniform",
                "--seeds",
                "0",
                "--out",
                str(out),
                "--no-progress",
                "--set",
                "steps=3",
            ]
        )
        == 0
    )
    record = json.loads((out / "corpus_record.json").read_text())
    assert record["corpus"] == "tiny" and record["domains"]


def test_languages_on_a_corpus_without_languages_is_a_clear_error(tmp_path, capsys):
    args = [
        "run",
        str(SMOKE),
        "--out",
        str(tmp_path / "r"),
        "--set",
        "data.corpus=domains",
        "--set",
        'data.languages=["en"]',
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "data.languages" in err and "domains" in err


@pytest.mark.integration
def test_data_languages_choose_the_languages_of_a_real_multilingual_corpus():
    cfg = load_config(
        SMOKE,
        {
            "data": {
                "corpus": "multilingual",
                "languages": ["fi", "tr"],
                "max_docs_per_domain": 6,
                "tokenizer_docs_per_domain": 6,
            }
        },
    )
    data = prepare_data(cfg)
    assert data.train.names == ["fi", "tr"]
    record = data.info["corpus_record"]
    assert set(record["domains"]) == {"fi", "tr"}
    assert all(d["source"].startswith("dasher-data ") for d in record["domains"].values())
    assert data.info["folder"].endswith(tuple("0123456789abcdef"))  # its own folder, beside the default build
