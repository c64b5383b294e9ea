"""``gradmix export``: a run's learned mix out of its run folder, in each engine's form; the ``schedule`` method that
replays an exported schedule exactly (the replayed run draws the same examples per domain at every step)."""

from __future__ import annotations

import ast
import json
import math
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import _tiny_lm_class, make_toy_domains, per_example_lm_loss
from gradmix import DomainStats, WeightError, make_method
from gradmix.methods.schedule import StepSchedule
from gradmix_kit.cli import main
from gradmix_kit.export import ExportError, export_run, read_run

tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# the Must-show: train with a moving method, export its schedule, replay it, same examples per domain per step
# ---------------------------------------------------------------------------------------------------------------
def _train(run_dir: Path, method: str, params: dict[str, Any], steps: int, **config: Any) -> list[np.ndarray]:
    """A short Mixer run on a tiny LM; returns the examples per domain its batches held, step by step."""
    import torch

    from gradmix import Mixer

    torch.manual_seed(0)
    model = _tiny_lm_class()()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    mixer = Mixer(make_toy_domains(), method, 12, model=model, method_params=params, run_dir=run_dir, **config)
    counts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the probe's notes on the tiny model's parameters
        for batch in mixer.batches(steps):
            counts.append(np.bincount(batch["domain"].numpy(), minlength=3))
            mixer.backward(model, batch, per_example_lm_loss)
            optimizer.step()
            optimizer.zero_grad()
            mixer.step()
    mixer.close()
    return counts


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("method", "params"), [("pike", {"variant": "gradmix_v1"}), ("famo", {"step_size": 0.5})], ids=["pike", "famo"]
)
def test_an_exported_schedule_replays_the_run_example_for_example(tmp_path, method, params):
    steps = 30
    original = _train(tmp_path / "orig", method, params, steps, update_every=3, log_every=3, seed=5)
    rows = _rows(tmp_path / "orig")
    assert len({tuple(r["weights"].values()) for r in rows}) >= 4, "the method must really move its weights"

    # rows every 3 steps, updates every 3 steps: each change is placed exactly between the rows
    text = export_run(tmp_path / "orig", "gradmix", "schedule", update_every=3)
    fragment = tomllib.loads(text)
    assert fragment["mixing"]["method"] == "schedule"
    mix = read_run(tmp_path / "orig", update_every=3)
    assert mix.exact and mix.steps == steps

    replayed = _train(tmp_path / "replay", "schedule", fragment["mixing"]["params"], steps, log_every=1, seed=5)
    # the realised counts: the examples each domain had in every step's batch, identical row for row
    assert len(replayed) == len(original) == steps
    for step, (a, b) in enumerate(zip(original, replayed), start=1):
        assert np.array_equal(a, b), (step, a, b)
    # the replay's per-step weights are the original's, bit for bit: at its logged rows and at every step
    again = {r["step"]: r["weights"] for r in _rows(tmp_path / "replay")}
    for row in rows:
        assert again[row["step"]] == row["weights"]
    for step in range(1, steps + 1):
        assert list(again[step].values()) == mix.per_step[step - 1].tolist()
    assert len(mix.ranges()) >= 4


def test_without_the_update_interval_a_gap_before_the_first_row_is_said_not_exact(tmp_path, capsys):
    _train(tmp_path / "run", "famo", {"step_size": 0.5}, 9, update_every=3, log_every=3)
    mix = read_run(tmp_path / "run")  # a Mixer's run folder has no config.json: steps 1-2 precede any row
    assert not mix.exact and mix.unplaced == [1, 2] and "--update-every" in mix.note
    assert main(["export", str(tmp_path / "run"), "--format", "recipe"]) == 0
    captured = capsys.readouterr()
    assert "not exact" in captured.err and json.loads(captured.out)["provenance"]["exact"] is False
    assert read_run(tmp_path / "run", update_every=3).exact


@pytest.mark.integration
def test_gradmix_run_replays_an_exported_schedule(tmp_path):
    """End to end through the CLI: `gradmix run` (famo), `gradmix export --format gradmix --weights schedule`, a
    second `gradmix run` with that fragment: the same weights and the same tokens per domain at every logged row."""
    common = ["--no-progress", "--set", "steps=12", "--set", "eval.continuation_items=0"]
    common += ["--set", "mixing.update_every=3", "--set", "mixing.log_every=2"]
    smoke = str(ROOT / "configs" / "smoke.toml")
    run = tmp_path / "famo"
    args = ["run", smoke, "--out", str(run), "--method", "famo", "--set", "mixing.params.step_size=0.5"]
    assert main([*args, *common]) == 0
    fragment = tmp_path / "schedule.toml"
    assert main(["export", str(run), "--format", "gradmix", "--weights", "schedule", "--out", str(fragment)]) == 0
    cfg = tomllib.loads((ROOT / "configs" / "smoke.toml").read_text())
    cfg["mixing"] = {**cfg["mixing"], **tomllib.loads(fragment.read_text())["mixing"]}
    (tmp_path / "replay.json").write_text(json.dumps(cfg))
    assert main(["run", str(tmp_path / "replay.json"), "--out", str(tmp_path / "replay"), *common]) == 0
    a, b = _rows(run), _rows(tmp_path / "replay")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert len({tuple(r["weights"].values()) for r in a}) >= 3
    for x, y in zip(a, b):
        assert x["weights"] == y["weights"] and x.get("tokens") == y.get("tokens")


# ---------------------------------------------------------------------------------------------------------------
# each format, on a hand-written run folder
# ---------------------------------------------------------------------------------------------------------------
NAMES = ["web", "code", "math books"]
W1 = [0.5, 0.3, 0.2]
W2 = [0.2, 0.00001, 0.79999]
W3 = [0.1, 0.0, 0.9]  # the method's mix after its last update


def _write_run(folder: Path, *, config: bool = True, tokens_per_step: tuple[int, ...] = (10,) * 8) -> Path:
    """Rows every 2 steps of an 8-step run updating every 4: steps 1-4 draw W1, 5-8 draw W2, then W3 is asked."""
    folder.mkdir(parents=True)
    rows = [{"step": 0, "weights": dict(zip(NAMES, W1)), "train_loss": {n: None for n in NAMES}}]
    cumulative = np.zeros(3)
    for step in range(1, 9):
        drawn = W1 if step <= 4 else W2
        cumulative += np.asarray(drawn) * tokens_per_step[step - 1]
        if step % 2:
            continue
        asked = W3 if step == 8 else (W2 if step == 4 else drawn)
        rows.append(
            {
                "step": step,
                "weights": dict(zip(NAMES, drawn)),
                "requested_weights": dict(zip(NAMES, asked)),
                "tokens": {n: float(v) for n, v in zip(NAMES, cumulative)},
            }
        )
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if config:
        cfg = {
            "name": "t",
            "seed": 7,
            "method": "pike",
            "label": "pike",
            "method_params": {"variant": "gradmix_v1"},
            "batch_size": 10,
            "corpus": "tiny",
            "mixing": {"update_every": 4, "mode": "quota", "log_every": 2},
            "data_info": {"corpus_record": {"corpus": "tiny", "software": {"gradmix": "0.0.9"}}},
        }
        (folder / "config.json").write_text(json.dumps(cfg))
        (folder / "summary.json").write_text(json.dumps({"method": "pike", "seed": 7, "steps_done": 8}))
    return folder


@pytest.fixture
def run(tmp_path):
    return _write_run(tmp_path / "run")


def _export(run: Path, fmt: str, weights: str = "final") -> str:
    return export_run(run, fmt, weights)


def test_per_step_weights_and_schedule_ranges_from_the_rows(run):
    mix = read_run(run)
    assert mix.exact and mix.names == NAMES and mix.steps == 8
    assert mix.per_step.tolist() == [W1] * 4 + [W2] * 4
    assert mix.final.tolist() == W3
    assert [(s, e, w.tolist()) for s, e, w in mix.ranges()] == [(1, 4, W1), (5, 8, W2), (9, None, W3)]


def test_recipe_has_final_or_average_weights_and_provenance(run):
    final = json.loads(_export(run, "recipe"))
    assert final["format"] == "gradmix.recipe/1" and final["domains"] == NAMES
    assert final["weights"] == dict(zip(NAMES, W3)) and final["weights_kind"] == "final"
    p = final["provenance"]
    assert p["method"] == "pike" and p["seed"] == 7 and p["steps"] == 8 and p["batch_size"] == 10
    assert p["source_run"] == str(run.resolve()) and p["exact"] is True and p["run_gradmix_version"] == "0.0.9"
    assert len(p["corpus_sha256"]) == 64 and len(p["config_sha256"]) == 64
    import gradmix

    assert p["gradmix_version"] == gradmix.__version__
    average = json.loads(_export(run, "recipe", "average"))
    assert average["weights_kind"] == "average" and "token-weighted" in average["weights_note"]
    expected = (np.asarray(W1) + np.asarray(W2)) / 2  # 10 tokens every step: the plain mean over the steps
    np.testing.assert_allclose(list(average["weights"].values()), expected, rtol=1e-12)
    np.testing.assert_allclose(sum(average["realised_token_share"].values()), 1.0)


def test_the_average_weights_each_step_by_its_tokens(tmp_path):
    run = _write_run(tmp_path / "run", tokens_per_step=(10, 10, 10, 10, 30, 30, 30, 30))
    average = json.loads(_export(run, "recipe", "average"))["weights"]
    expected = (40 * np.asarray(W1) + 120 * np.asarray(W2)) / 160
    np.testing.assert_allclose(list(average.values()), expected, rtol=1e-12)


def test_schedule_json_is_by_name_with_step_ranges(run):
    out = json.loads(_export(run, "schedule"))
    assert out["format"] == "gradmix.schedule/1" and out["steps"] == 8 and out["provenance"]["steps"] == 8
    assert [(e["start"], e["end"]) for e in out["schedule"]] == [(1, 4), (5, 8), (9, None)]
    assert out["schedule"][1]["weights"] == dict(zip(NAMES, W2))


def test_hf_snippet_calls_interleave_datasets_with_the_probabilities(run, monkeypatch):
    text = _export(run, "hf")
    ast.parse(text)
    calls: list[dict[str, Any]] = []
    fake = types.ModuleType("datasets")
    record = lambda datasets, **kwargs: calls.append({"datasets": datasets, **kwargs})  # noqa: E731
    monkeypatch.setattr(fake, "interleave_datasets", record, raising=False)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    namespace: dict[str, Any] = {}
    exec(compile(text, "hf_export.py", "exec"), namespace)
    assert namespace["DOMAINS"] == NAMES and namespace["PROBABILITIES"] == W3
    namespace["interleave"]({"web": "W", "code": "C", "math books": "M"})
    assert calls == [{"datasets": ["W", "C", "M"], "probabilities": W3, "seed": 7}]


def test_hf_snippet_runs_with_the_real_datasets_library(run):
    datasets = pytest.importorskip("datasets")
    namespace: dict[str, Any] = {}
    exec(compile(_export(run, "hf", "average"), "hf_export.py", "exec"), namespace)
    parts = {name: datasets.Dataset.from_dict({"text": [f"{name} {i}" for i in range(50)]}) for name in NAMES}
    mixed = namespace["interleave"](parts, stopping_strategy="first_exhausted")
    assert len(mixed) > 0 and {row["text"].rsplit(" ", 1)[0] for row in mixed} <= set(NAMES)


def test_megatron_blend_alternates_weights_and_placeholder_paths(run):
    text = _export(run, "megatron")
    blend = [line for line in text.splitlines() if not line.startswith("#")]
    assert len(blend) == 1 and blend[0].startswith("--data-path ")
    tokens = blend[0].split()[1:]
    weights, paths = [float(t) for t in tokens[0::2]], tokens[1::2]
    assert weights == [W3[0], W3[2]]  # the weight-0 domain is left out (and said)
    assert paths == ["DATA_DIR/web_text_document", "DATA_DIR/math_books_text_document"]
    assert "# weight 0, left out: code" in text and "model.data.data_prefix=[" in text


def test_olmo_fragment_is_a_source_mixture(run):
    yaml = pytest.importorskip("yaml")
    out = yaml.safe_load(_export(run, "olmo", "average"))
    sources = out["source_configs"]
    assert [s["source_name"] for s in sources] == NAMES
    ratios = [s["target_ratio"] for s in sources]
    assert all(isinstance(r, float) for r in ratios) and math.isclose(sum(ratios), 1.0)
    np.testing.assert_allclose(ratios, (np.asarray(W1) + np.asarray(W2)) / 2, rtol=1e-12)
    assert sources[2]["paths"] == ["DATA_DIR/math_books/*.npy"]


def test_a_tiny_weight_stays_a_number_in_yaml(tmp_path):
    yaml = pytest.importorskip("yaml")
    run = _write_run(tmp_path / "run")
    rows = _rows(run)
    rows[-1]["requested_weights"] = dict(zip(NAMES, W2))  # 1e-05 for code: PyYAML needs "1.0e-05"
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ratios = [s["target_ratio"] for s in yaml.safe_load(_export(run, "olmo"))["source_configs"]]
    assert all(isinstance(r, float) for r in ratios)
    np.testing.assert_allclose(ratios, W2, rtol=1e-12)


def test_torchtitan_fragment_is_toml_with_dataset_weights(run):
    out = tomllib.loads(_export(run, "torchtitan", "average"))
    spec = out["training"]["dataset"].split(",")
    assert [s.rsplit(":", 1)[0] for s in spec] == ["DATA_DIR/web", "DATA_DIR/code", "DATA_DIR/math_books"]
    np.testing.assert_allclose([float(s.rsplit(":", 1)[1]) for s in spec], (np.asarray(W1) + np.asarray(W2)) / 2)


def test_gradmix_fragments_for_fixed_and_schedule(run):
    fixed = tomllib.loads(_export(run, "gradmix"))
    assert fixed["mixing"]["method"] == "fixed" and fixed["mixing"]["params"]["weights"] == dict(zip(NAMES, W3))
    fragment = tomllib.loads(_export(run, "gradmix", "schedule"))
    assert fragment["mixing"]["method"] == "schedule"
    method = make_method("schedule", 3, **fragment["mixing"]["params"])
    mix = read_run(run)
    assert method.weights.tolist() == W1
    for step in range(1, 12):  # after step s the method gives step s + 1's weights
        expected = mix.per_step[step].tolist() if step < 8 else W3
        assert method.update(DomainStats(step=step, num_domains=3)).tolist() == expected


def test_cli_writes_to_a_file_or_to_stdout(run, tmp_path, capsys):
    out = tmp_path / "recipe.json"
    assert main(["export", str(run), "--format", "recipe", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["weights"] == dict(zip(NAMES, W3))
    assert "exported recipe" in capsys.readouterr().out
    assert main(["export", str(run), "--format", "megatron", "--weights", "average"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("--data-path ")


def test_a_gap_where_the_change_step_is_unknown_is_flagged(tmp_path):
    run = _write_run(tmp_path / "run", config=False)
    rows = [r for r in _rows(run) if r["step"] not in (4,)]  # the row that asked for W2 is gone: 5 or 6?
    for r in rows:
        r.pop("requested_weights", None)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mix = read_run(run)
    assert not mix.exact and mix.unplaced == [3, 4, 5]
    assert mix.per_step[4].tolist() == W2  # the later row's weights for the unknown steps
    assert read_run(run, update_every=4).exact  # updates every 4: the change is at step 5


# ---------------------------------------------------------------------------------------------------------------
# errors: one line naming the file / field
# ---------------------------------------------------------------------------------------------------------------
def _error(capsys, args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_errors_are_one_line_naming_the_file_or_field(tmp_path, run, capsys):
    assert "no such run folder" in _error(capsys, ["export", str(tmp_path / "nope"), "--format", "recipe"])
    (tmp_path / "empty").mkdir()
    err = _error(capsys, ["export", str(tmp_path / "empty"), "--format", "recipe"])
    assert "metrics.jsonl: no such file" in err
    no_rows = tmp_path / "no_rows"
    no_rows.mkdir()
    (no_rows / "metrics.jsonl").write_text(json.dumps({"step": 0, "weights": {"a": 1.0}}) + "\n")
    assert "no row with per-step 'weights'" in _error(capsys, ["export", str(no_rows), "--format", "hf"])
    err = _error(capsys, ["export", str(run), "--format", "parquet"])
    assert "unknown export format 'parquet'" in err and "megatron" in err
    assert "unknown --weights 'median'" in _error(capsys, ["export", str(run), "--format", "hf", "--weights", "median"])
    err = _error(capsys, ["export", str(run), "--format", "hf", "--weights", "schedule"])
    assert "--weights schedule is for --format gradmix" in err
    assert "is a folder" in _error(capsys, ["export", str(run), "--format", "hf", "--out", str(tmp_path)])


def test_bad_rows_are_named_by_line_and_field(tmp_path, capsys):
    run = _write_run(tmp_path / "run")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    assert "metrics.jsonl line 2: not JSON" in _error(capsys, ["export", str(run), "--format", "recipe"])
    bad = json.loads(lines[2])
    bad["weights"]["code"] = -0.1
    (run / "metrics.jsonl").write_text("\n".join([lines[0], lines[1], json.dumps(bad)]) + "\n")
    err = _error(capsys, ["export", str(run), "--format", "recipe"])
    assert "line 3: field 'weights' has -0.1 for domain 'code'" in err
    bad["weights"] = {"web": 1.0}
    (run / "metrics.jsonl").write_text("\n".join([lines[0], lines[1], json.dumps(bad)]) + "\n")
    assert "line 3: field 'weights' names the domains ['web']" in _error(capsys, ["export", str(run), "--format", "hf"])
    (run / "config.json").write_text("{")
    assert "config.json: not valid JSON" in _error(capsys, ["export", str(run), "--format", "hf"])


def test_a_half_written_last_line_is_left_out(run):
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 10, "weights": {"web"')
    assert read_run(run).steps == 8
    with pytest.raises(ExportError, match="--update-every must be a positive integer"):
        read_run(_write_run(run.parent / "other", config=False), update_every=0)


# ---------------------------------------------------------------------------------------------------------------
# the schedule method
# ---------------------------------------------------------------------------------------------------------------
def test_schedule_method_follows_the_steps_and_keeps_the_floats():
    odd = [0.2, 0.3, 0.5000000000000002]  # sums to 1 within 1e-12, not exactly: a renormalisation would move it
    assert not np.array_equal(np.asarray(odd) / np.sum(odd), odd)
    method = make_method("schedule", 3, schedule=[(1, [1, 1, 2]), {"start": 4, "weights": odd, "end": 5}, (6, W1)])
    assert isinstance(method, StepSchedule) and method.every_step and not method.required_stats
    assert method.weights.tolist() == [0.25, 0.25, 0.5]
    seen = [method.update(DomainStats(step=s, num_domains=3)).tolist() for s in range(0, 8)]
    assert seen == [[0.25, 0.25, 0.5]] * 3 + [odd] * 2 + [W1] * 3
    restored = StepSchedule(3, schedule=[(1, [1, 0, 0])])
    restored.load_state_dict(json.loads(json.dumps(method.state_dict())))
    assert restored.schedule == method.schedule and restored.weights.tolist() == W1
    assert restored.update(DomainStats(step=4, num_domains=3)).tolist() == odd


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        (None, "needs schedule="),
        ([], "non-empty list"),
        ({"start": 1}, "non-empty list"),
        ([(2, W1)], r"schedule\[0\] starts at step 2; the first entry must start at step 1"),
        ([(1, W1), (5, W2), (5, W1)], r"schedule\[2\] starts at step 5, not after schedule\[1\]'s step 5"),
        ([(1, W1), (0.5, W2)], r"schedule\[1\] start must be an integer step"),
        ([(1, [0.5, 0.5])], r"schedule\[0\] weights has 2 entries but there are 3 domains"),
        ([(1, [0.5, -0.5, 1])], r"schedule\[0\] weights.*negative"),
        ([(1, [0, 0, 0])], r"schedule\[0\] weights are all zero"),
        ([(1, {"a": 1})], r"schedule\[0\] weights are given by domain name"),
        ([(1, W1, 3)], r"schedule\[0\] must be a \(start_step, weights\) pair"),
        ([{"start": 1, "weights": W1, "stop": 3}], r"schedule\[0\] has an unknown field 'stop'"),
        ([{"start": 1, "end": 3, "weights": W1}, (5, W2)], r"schedule\[0\] ends at step 3; it must end at 4"),
    ],
)
def test_schedule_validation_errors_are_one_line(schedule, message):
    with pytest.raises((ValueError, WeightError), match=message) as info:
        make_method("schedule", 3, schedule=schedule) if schedule is not None else make_method("schedule", 3)
    assert "\n" not in str(info.value)


def test_a_corrupt_checkpointed_schedule_is_refused_and_changes_nothing():
    method = StepSchedule(3, schedule=[(1, W1), (3, W2)])
    state = method.state_dict()
    state["schedule"] = [[3, W1]]
    with pytest.raises(ValueError, match=r"schedule: checkpointed schedule\[0\] starts at step 3"):
        method.load_state_dict(state)
    assert method.schedule == [(1, W1), (3, W2)]


def test_the_schedule_method_needs_no_model_and_ignores_update_every():
    from gradmix import Mixer

    mixer = Mixer(make_toy_domains(), "schedule", 12, method_params={"schedule": [(1, W1), (3, W2)]}, update_every=50)
    assert mixer.probe is None and not mixer.needs_gradients
    drawn = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # W2 starves 'code' on purpose: the alert is not what is tested here
        for batch in mixer.batches(4):
            drawn.append(np.bincount(batch["domain"].numpy(), minlength=3))
            mixer.observe(batch["domain"], np.ones(len(batch["domain"])))
            mixer.step()
    # steps 1-2 draw W1, steps 3-4 W2 (not the first update at step 50): quota keeps each within ~1 of its share
    assert np.abs(drawn[0] + drawn[1] - 24 * np.asarray(W1)).max() <= 1
    assert np.abs(drawn[0] + drawn[1] + drawn[2] + drawn[3] - 24 * np.asarray(W1) - 24 * np.asarray(W2)).max() <= 1
    assert [r["weights"] for r in mixer.history][-1] == dict(zip(mixer.names, W2))
