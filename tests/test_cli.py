"""The `gradmix` command end to end on the tiny built-in corpus (real text, real tokenizer, real GPT)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gradmix_kit.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.toml"


def test_run_smoke_writes_the_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(SMOKE), "--out", str(out), "--no-progress"]) == 0
    for name in ("config.json", "metrics.jsonl", "summary.json", "report.html", "checkpoint.pt"):
        assert (out / name).is_file(), name
    assert list(out.glob("*.png"))
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "pike" and config["domains"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    domains = set(config["domains"])
    for r in records:
        assert {"step", "weights", "train_loss"} <= set(r)
        assert set(r["weights"]) == domains and abs(sum(r["weights"].values()) - 1) < 1e-9
    evals = [r for r in records if "val_loss" in r]
    assert evals and set(evals[-1]["val_loss"]) == domains
    assert evals[-1]["val_loss"]["code"] < evals[0]["val_loss"]["code"]  # it trained
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 60 and 0 <= summary["avg_val_accuracy"] <= 1
    assert "report:" in capsys.readouterr().out


def test_compare_and_report(tmp_path):
    out = tmp_path / "cmp"
    args = [
        "compare",
        str(SMOKE),
        "--methods",
        "uniform,round_robin",
        "--seeds",
        "0,1",
        "--out",
        str(out),
        "--set",
        "steps=20",
        "--no-progress",
    ]
    assert main(args) == 0
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["runs"] == ["uniform-seed0", "uniform-seed1", "round_robin-seed0", "round_robin-seed1"]
    html = (out / "report.html").read_text()
    assert "uniform" in html and "round_robin" in html
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.html").is_file()


def test_bad_config_key_is_a_clear_error(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("steps = 5\n[train]\nbatchsize = 8\n")
    assert main(["run", str(cfg), "--out", str(tmp_path / "r")]) == 2
    assert "unknown config key 'train.batchsize'" in capsys.readouterr().err


def test_unknown_domain_subset_is_a_clear_error(tmp_path, capsys):
    assert main(["run", str(SMOKE), "--out", str(tmp_path / "r"), "--set", 'data.domains=["code","poetry"]']) == 2
    assert "data.domains names ['poetry'], not in the corpus" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["dga", "importance"])
def test_target_methods_without_a_target_fail_clearly(tmp_path, capsys, method):
    assert main(["run", str(SMOKE), "--out", str(tmp_path / "r"), "--method", method, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "target" in err


TINY_LEGAL = ROOT / "src" / "gradmix_kit" / "data" / "tiny" / "legal.txt"


@pytest.mark.parametrize(
    "method, extra",
    [
        ("dga", []),
        ("doge", []),
        ("importance", ["--set", 'mixing.params={"target_counts": [0, 1, 0, 9]}']),
    ],
)
def test_target_methods_run_from_a_config(tmp_path, method, extra):
    out = tmp_path / method
    args = [
        "run",
        str(SMOKE),
        "--out",
        str(out),
        "--method",
        method,
        "--no-progress",
        "--set",
        f'data.target="{TINY_LEGAL}"',
        "--set",
        "steps=30",
        *extra,
    ]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert np.isfinite(summary["target_val_loss"])
    weights = summary["final_weights"]
    if method == "importance":  # the smoothed target histogram, nothing adaptive
        assert max(weights, key=weights.get) == "legal"
    else:
        assert len({round(w, 12) for w in weights.values()}) > 1  # the method moved the weights


def test_importance_reads_target_counts_from_a_cluster_folder(tmp_path):
    from gradmix_kit.corpora import load_tiny_corpus

    texts = load_tiny_corpus()
    fine = tmp_path / "clusters" / "fine"
    fine.mkdir(parents=True)
    names = ["c0000", "c0001", "c0002"]
    for name, domain in zip(names, ["code", "docs", "legal"]):
        with (fine / f"{name}.jsonl").open("w") as fh:
            for doc in texts[domain]:
                fh.write(json.dumps({"text": doc}) + "\n")
    (tmp_path / "clusters" / "clusters.json").write_text(json.dumps({"domains": names, "target_counts": [1, 0, 7]}))
    out = tmp_path / "run"
    args = [
        "run",
        str(SMOKE),
        "--out",
        str(out),
        "--method",
        "importance",
        "--no-progress",
        "--set",
        "steps=10",
        "--set",
        f'data.corpus="{fine}"',
        "--set",
        f'data.target="{TINY_LEGAL}"',
    ]
    assert main(args) == 0
    weights = json.loads((out / "summary.json").read_text())["final_weights"]
    assert weights == pytest.approx({"c0000": 1 / 8, "c0001": 0.0, "c0002": 7 / 8})


def test_run_stops_cleanly_when_data_runs_out(tmp_path):
    out = tmp_path / "run"
    args = [
        "run",
        str(SMOKE),
        "--out",
        str(out),
        "--no-progress",
        "--method",
        "uniform",
        "--set",
        "mixing.max_repeats=1",
        "--set",
        "steps=100000",
    ]
    with pytest.warns(RuntimeWarning, match="data exhausted"):
        assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "data exhausted" in summary["stopped_early"] and 0 < summary["steps_done"] < 100000
    assert np.isfinite(summary["avg_val_loss"])


def test_resume_killed_before_its_first_checkpoint_does_not_duplicate_rows(tmp_path):
    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                str(SMOKE),
                "--out",
                str(out),
                "--no-progress",
                "--set",
                "steps=10",
                "--set",
                "train.checkpoint_every=0",
            ]
        )
        == 0
    )
    (out / "checkpoint.pt").unlink()  # as if killed before any checkpoint was written
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 11, "weigh')  # and during an append
    assert main(["run", str(SMOKE), "--out", str(out), "--no-progress", "--set", "steps=10", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == 10


def test_resume_after_a_checkpoint_truncates_explicitly_and_continues(tmp_path):
    out = tmp_path / "run"
    ref = tmp_path / "ref"
    assert (
        main(
            [
                "run",
                str(SMOKE),
                "--out",
                str(ref),
                "--no-progress",
                "--set",
                "steps=20",
                "--set",
                "train.checkpoint_every=5",
                "--method",
                "uniform",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "run",
                str(SMOKE),
                "--out",
                str(out),
                "--no-progress",
                "--set",
                "steps=20",
                "--set",
                "train.checkpoint_every=5",
                "--method",
                "uniform",
            ]
        )
        == 0
    )
    # pretend the run died at step 12: the checkpoint says 20 (final), so rebuild one at 10 by re-running to 10
    partial = tmp_path / "partial"
    assert (
        main(
            [
                "run",
                str(SMOKE),
                "--out",
                str(partial),
                "--no-progress",
                "--set",
                "steps=10",
                "--set",
                "train.checkpoint_every=5",
                "--method",
                "uniform",
            ]
        )
        == 0
    )
    with (partial / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 11, "weights": {}}\n{"step": 12, "weig')  # rows after the checkpoint, one half-written
    assert (
        main(
            [
                "run",
                str(SMOKE),
                "--out",
                str(partial),
                "--no-progress",
                "--set",
                "steps=20",
                "--set",
                "train.checkpoint_every=5",
                "--method",
                "uniform",
                "--resume",
            ]
        )
        == 0
    )
    got = [json.loads(line) for line in (partial / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert [r["weights"] for r in got] == [r["weights"] for r in want]


def test_a_diverging_run_stops_with_a_message_and_valid_json(tmp_path):
    out = tmp_path / "run"
    args = [
        "run",
        str(SMOKE),
        "--out",
        str(out),
        "--no-progress",
        "--method",
        "uniform",
        "--set",
        "train.lr=1e6",
        "--set",
        "train.grad_clip=0",
        "--set",
        "steps=40",
    ]
    with pytest.warns(RuntimeWarning, match="diverged"):
        assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())  # strict JSON: NaN became null
    assert "diverged" in summary["stopped_early"]
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


def test_resume_of_a_run_killed_after_its_final_checkpoint_still_writes_the_summary(tmp_path):
    """Found by the crash sweep: the final checkpoint was written, the kill came before summary.json."""
    out = tmp_path / "run"
    assert main(["run", str(SMOKE), "--out", str(out), "--no-progress", "--set", "steps=10"]) == 0
    first = json.loads((out / "summary.json").read_text())
    (out / "summary.json").unlink()
    assert main(["run", str(SMOKE), "--out", str(out), "--no-progress", "--set", "steps=10", "--resume"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["final_val_loss"] == first["final_val_loss"]


def test_run_on_a_used_folder_is_refused_unless_resume_or_overwrite(tmp_path, capsys):
    """Issue 22 item 2: a second `gradmix run` without --resume used to replace a finished run without a word."""
    out = tmp_path / "run"
    short = ["--no-progress", "--method", "uniform", "--set", "steps=4", "--set", "train.eval_every=2"]
    assert main(["run", str(SMOKE), "--out", str(out), *short]) == 0
    kept = {name: (out / name).read_bytes() for name in ("metrics.jsonl", "summary.json", "checkpoint.pt")}
    capsys.readouterr()
    assert main(["run", str(SMOKE), "--out", str(out), *short, "--set", "seed=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds a started or finished run" in err, err
    assert "metrics.jsonl" in err and "pass --resume to continue it or --overwrite to replace it" in err
    assert {name: (out / name).read_bytes() for name in kept} == kept  # nothing was touched
    assert main(["run", str(SMOKE), "--out", str(out), *short, "--resume", "--overwrite"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert (
        main(["run", str(SMOKE), "--out", str(out), *short, "--set", "steps=3", "--set", "seed=1", "--overwrite"]) == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["seed"] == 1
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 0 and steps[-1] == 3 and steps == sorted(set(steps))  # one run's rows, not two
    assert not (out / ".gradmix.lock").exists()  # released at the end


def test_run_on_a_folder_another_process_owns_is_refused(tmp_path, capsys):
    """Issue 22 item 1: a second `gradmix run --out X` while the first runs used to delete the first's metrics and
    then both appended. The owner here is another process holding the folder's lock."""
    import subprocess
    import sys

    out = tmp_path / "run"
    code = (
        "import sys, time; from gradmix.runlock import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
        "print('locked', flush=True); time.sleep(600)"
    )
    owner = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "locked"
        (out / "metrics.jsonl").write_text('{"step": 0}\n')  # the owner's rows so far
        for flag in ("--resume", "--overwrite"):
            assert main(["run", str(SMOKE), "--out", str(out), "--no-progress", flag]) == 2
            err = capsys.readouterr().err.strip()
            assert f"is in use by pid {owner.pid} on host" in err and err.count("\n") == 0, err
        assert (out / "metrics.jsonl").read_text() == '{"step": 0}\n'
        assert sorted(p.name for p in out.iterdir()) == [".gradmix.lock", "metrics.jsonl"]
    finally:
        owner.kill()
        owner.communicate(timeout=60)
