"""`threads = "auto"` (issue 24, item 2): the physical cores not already busy, at least 1; the count in use is
recorded, one count serves every run of a comparison, and a resumed run keeps the count it started with."""

from __future__ import annotations

import builtins
import json
import os
from pathlib import Path

import pytest

from gradmix_kit.cli import main
from gradmix_kit.experiment import threads as threads_mod
from gradmix_kit.experiment.config import ConfigError, resolve_config
from gradmix_kit.experiment.threads import THREADS_ENV, choose_threads, physical_cores

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.toml"


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def machine(monkeypatch):
    """A machine of 2 physical cores whose busy cores the test sets; GRADMIX_THREADS unset."""
    monkeypatch.delenv(THREADS_ENV, raising=False)
    state = {"busy": 0.0}
    monkeypatch.setattr(threads_mod, "physical_cores", lambda: 2)
    monkeypatch.setattr(threads_mod, "busy_cores", lambda: (state["busy"], f"load {state['busy']}"))
    return state


@pytest.mark.parametrize("busy,expected", [(0.0, 2), (0.4, 2), (0.6, 1), (1.0, 1), (1.5, 1), (7.7, 1)])
def test_auto_takes_the_physical_cores_not_busy_at_least_one(machine, busy, expected):
    machine["busy"] = busy
    choice = choose_threads("auto")
    assert choice.threads == expected and choice.requested == "auto"
    assert choice.note.startswith(f"auto: {expected} of 2 physical core(s)")


def test_auto_keeps_the_count_of_the_run_being_resumed(machine):
    machine["busy"] = 5.0
    assert choose_threads("auto", previous=2).threads == 2
    assert "kept from the run being resumed" in choose_threads("auto", previous=2).note


def test_an_explicit_count_is_kept_and_zero_is_torchs_default(machine):
    import torch

    machine["busy"] = 5.0
    assert choose_threads(2).threads == 2
    assert choose_threads(2, previous=1).threads == 2  # only "auto" follows the resumed run
    assert choose_threads(0).threads == torch.get_num_threads()


def test_the_environment_pins_what_auto_means(machine, monkeypatch):
    monkeypatch.setenv(THREADS_ENV, "3")
    assert choose_threads("auto").threads == 3
    assert choose_threads(1).threads == 1  # an explicit count in a config still wins
    monkeypatch.setenv(THREADS_ENV, "two")
    with pytest.raises(ValueError, match=THREADS_ENV):
        choose_threads("auto")


@pytest.mark.parametrize("bad", ["two", -1, True, 1.5, None])
def test_the_config_accepts_auto_or_a_count(bad):
    assert resolve_config({})["threads"] == "auto"
    for good in ("auto", 0, 3):
        assert resolve_config({"threads": good})["threads"] == good
    with pytest.raises(ConfigError, match=r"^threads must be "):
        resolve_config({"threads": bad})


def test_physical_cores_without_psutil_counts_logical_cpus(monkeypatch):
    real_import = builtins.__import__

    def no_psutil(name, *args, **kwargs):
        if name == "psutil":
            raise ImportError("no psutil here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_psutil)
    cores = physical_cores()
    assert 1 <= cores <= (os.cpu_count() or 1)


def test_busy_cores_reads_the_load():
    busy, seen = threads_mod.busy_cores()
    assert busy >= 0 and "load average" in seen


def test_a_run_records_the_count_in_use_and_a_resume_keeps_it(tmp_path, machine):
    machine["busy"] = 0.0  # auto -> 2
    out = tmp_path / "run"
    args = ["run", str(SMOKE), "--out", str(out), "--no-progress", "--method", "uniform", "--set", "steps=6"]
    assert main([*args, "--set", "train.checkpoint_every=3", "--set", "train.eval_every=3"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["threads"], config["threads_requested"]) == (2, "auto")
    assert config["threads_note"].startswith("auto: 2 of 2")
    assert config["data_info"]["corpus_record"]["software"]["torch_threads"] == 2
    assert json.loads((out / "summary.json").read_text())["threads"] == 2
    machine["busy"] = 3.0  # the machine got busy: a fresh run would take 1, the resumed one keeps its 2
    assert main([*args, "--set", "steps=9", "--set", "train.eval_every=3", "--resume"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["threads"] == 2 and "kept from the run being resumed" in config["threads_note"]
    assert json.loads((out / "summary.json").read_text())["threads"] == 2


def test_a_comparison_uses_one_count_for_every_run(tmp_path, machine, monkeypatch, capsys):
    looks = []

    def busy_then_busier():  # idle at the start, busy for every later look
        looks.append(1)
        return (0.0 if len(looks) == 1 else 3.0), "load"

    monkeypatch.setattr(threads_mod, "busy_cores", busy_then_busier)
    out = tmp_path / "cmp"
    args = ["compare", str(SMOKE), "--methods", "uniform,round_robin", "--seeds", "0", "--out", str(out)]
    assert main([*args, "--set", "steps=4", "--set", "train.eval_every=2", "--no-progress"]) == 0
    assert len(looks) == 1  # chosen once, at the start
    assert "threads: auto: 2 of 2" in capsys.readouterr().out
    for run in ("uniform-seed0", "round_robin-seed0"):
        assert json.loads((out / run / "config.json").read_text())["threads"] == 2
    assert json.loads((out / "corpus_record.json").read_text())["software"]["torch_threads"] == 2
