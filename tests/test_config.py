"""Bad input to `gradmix run` / `compare`: one-line errors naming the field (issue 13), and configs that must work."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gradmix_kit.cli import main
from gradmix_kit.experiment.config import (
    DEFAULTS,
    FIELD_RULES,
    ConfigError,
    load_config,
    parse_overrides,
    resolve_config,
)

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.toml"


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("gradmix: error: "), err
    assert "\n" not in err and "Traceback" not in err, err
    return err


def write(tmp_path: Path, text: str, name: str = "cfg.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# -- values of the wrong type or range ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"steps": True}, "steps"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"steps": "5"}, "steps"),
        ({"train": {"lr": math.inf}}, "train.lr"),
        ({"train": {"lr": -math.inf}}, "train.lr"),
        ({"train": {"lr": math.nan}}, "train.lr"),
        ({"train": {"lr": -0.1}}, "train.lr"),
        ({"train": {"lr": 0}}, "train.lr"),
        ({"train": {"lr": True}}, "train.lr"),
        ({"train": {"batch_size": True}}, "train.batch_size"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"train": {"batch_size": -4}}, "train.batch_size"),
        ({"train": {"eval_every": 0}}, "train.eval_every"),
        ({"train": {"grad_clip": math.nan}}, "train.grad_clip"),
        ({"train": {"checkpoint_every": -1}}, "train.checkpoint_every"),
        ({"mixing": {"update_every": 0}}, "mixing.update_every"),
        ({"mixing": {"max_repeats": 0}}, "mixing.max_repeats"),
        ({"mixing": {"target_batch_size": False}}, "mixing.target_batch_size"),
        ({"mixing": {"mode": "round"}}, "mixing.mode"),
        ({"mixing": {"method": 3}}, "mixing.method"),
        ({"model": {"n_layers": 0}}, "model.n_layers"),
        ({"model": {"dropout": 1.0}}, "model.dropout"),
        ({"data": {"window": 2}}, "data.window"),
        ({"data": {"holdout_fraction": 1.0}}, "data.holdout_fraction"),
        ({"data": {"domains": "code"}}, "data.domains"),
        ({"eval": {"num_choices": 1}}, "eval.num_choices"),
        ({"compare": {"seeds": [0, True]}}, "compare.seeds"),
        ({"seed": -1}, "seed"),
    ],
)
def test_wrong_values_are_rejected_naming_the_field(raw, field):
    with pytest.raises(ConfigError, match=rf"^{field} must be "):
        resolve_config(raw)


def test_every_default_has_a_rule_and_passes_it():
    def leaves(node, prefix=""):
        for key, value in node.items():
            path = prefix + key
            if isinstance(value, dict) and path not in FIELD_RULES:
                yield from leaves(value, path + ".")
            else:
                yield path

    assert set(leaves(DEFAULTS)) == set(FIELD_RULES)
    resolve_config({})


def test_a_table_where_a_value_belongs_is_rejected():
    with pytest.raises(ConfigError, match=r"'train.lr' is a single value"):
        resolve_config({"train": {"lr": {"x": 1}}})


@pytest.mark.parametrize(
    "text, field",
    [
        ("steps = true\n", "steps"),
        ("steps = 5\n[train]\nlr = inf\n", "train.lr"),
        ("steps = 5\n[train]\nlr = nan\n", "train.lr"),
        ("steps = 5\n[train]\nlr = -0.1\n", "train.lr"),
        ("steps = 5\n[train]\nbatch_size = true\n", "train.batch_size"),
        ("steps = -3\n", "steps"),
    ],
)
def test_cli_rejects_wrong_values_in_one_line(tmp_path, capsys, text, field):
    assert main(["run", str(write(tmp_path, text)), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert f"{field} must be" in one_line_error(capsys)


def test_set_rejects_wrong_values(tmp_path, capsys):
    assert main(["run", str(SMOKE), "--out", str(tmp_path / "r"), "--set", "train.batch_size=true"]) == 2
    assert "train.batch_size must be a positive integer, got True" in one_line_error(capsys)


# -- --set ------------------------------------------------------------------------------------------------------


def test_set_key_that_is_both_a_value_and_a_table(tmp_path, capsys):
    args = ["run", str(SMOKE), "--out", str(tmp_path / "r"), "--set", "train.lr=0.1", "--set", "train.lr.x=1"]
    assert main(args) == 2
    err = one_line_error(capsys)
    assert "train.lr.x" in err and "train.lr was already set" in err
    with pytest.raises(ConfigError, match="already given keys"):
        parse_overrides(["train.lr.x=1", "train.lr=0.1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["train.lr"])
    with pytest.raises(ConfigError, match="dotted config key"):
        parse_overrides(["train..lr=1"])
    assert parse_overrides(["train.lr=0.1", "mixing.method=pike", 'data.domains=["a"]']) == {
        "train": {"lr": 0.1},
        "mixing": {"method": "pike"},
        "data": {"domains": ["a"]},
    }


# -- data and names ---------------------------------------------------------------------------------------------


def test_unknown_corpus_is_one_line_naming_it_and_the_known_ones(tmp_path, capsys):
    args = ["run", str(SMOKE), "--out", str(tmp_path / "r"), "--set", "data.corpus=wikipedia_xl"]
    assert main(args) == 2
    err = one_line_error(capsys)
    assert "'wikipedia_xl'" in err and "tiny" in err and "multilingual" in err and "domains" in err


def test_unknown_target_set_is_one_line(tmp_path, capsys):
    args = ["run", str(SMOKE), "--out", str(tmp_path / "r"), "--method", "dga", "--set", "data.target=astrology"]
    assert main(args) == 2
    err = one_line_error(capsys)
    assert "'astrology'" in err and "medical" in err


def test_unknown_method_is_one_line(tmp_path, capsys):
    assert main(["run", str(SMOKE), "--out", str(tmp_path / "r"), "--method", "pikee"]) == 2
    err = one_line_error(capsys)
    assert "'pikee'" in err and "available" in err
    assert not (tmp_path / "r").exists()  # failed before anything was written


def test_missing_config_file_is_one_line(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.toml")]) == 2
    assert "does not exist" in one_line_error(capsys)


def test_corpus_errors_are_caught_at_the_top_level(tmp_path, capsys, monkeypatch):
    from gradmix_kit.corpora import CorpusError
    from gradmix_kit.experiment import runner

    def broken(_cfg, progress=True):
        raise CorpusError("manifest of corpus 'domains' is corrupt;\nrebuild it")

    monkeypatch.setattr(runner, "prepare_data", broken)
    assert main(["run", str(SMOKE), "--out", str(tmp_path / "r")]) == 2
    assert one_line_error(capsys) == "gradmix: error: manifest of corpus 'domains' is corrupt; rebuild it"


def test_unexpected_exceptions_keep_their_traceback(tmp_path, monkeypatch):
    from gradmix_kit.experiment import runner

    def bug(_cfg, progress=True):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(runner, "prepare_data", bug)
    with pytest.raises(ZeroDivisionError):
        main(["run", str(SMOKE), "--out", str(tmp_path / "r")])


def test_console_script_error_is_one_line_with_exit_code_2(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from gradmix_kit.cli import main; sys.exit(main())",
            "run",
            str(SMOKE),
            "--out",
            str(tmp_path / "r"),
            "--set",
            "data.corpus=nope",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith("gradmix: error: data.corpus 'nope'") and "Traceback" not in done.stderr


# -- configs that must work -------------------------------------------------------------------------------------


def test_minimal_config_runs_on_the_default_tiny_corpus(tmp_path):
    cfg = write(tmp_path, "steps = 5\n", "minimal.toml")
    assert load_config(cfg)["data"]["corpus"] == "tiny"
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_done"] == 5 and 0 <= summary["avg_val_accuracy"] <= 1


def test_plugins_register_methods_for_a_config(tmp_path, monkeypatch):
    import gradmix

    (tmp_path / "my_mixing_plugin.py").write_text(
        textwrap.dedent("""
        import gradmix
        from gradmix.methods.static import Uniform

        class Mine(Uniform):
            '''A user's method, registered on import.'''
            name = "mine_from_plugin"

        gradmix.register_method("mine_from_plugin", Mine, overwrite=True)
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = write(
        tmp_path,
        """
        steps = 3
        [data]
        window = 32
        vocab_size = 512
        [eval]
        continuation_items = 0
        [mixing]
        method = "mine_from_plugin"
        plugins = ["my_mixing_plugin"]
    """,
    )
    try:
        assert main(["run", str(cfg), "--out", str(tmp_path / "r"), "--no-progress"]) == 0
        assert json.loads((tmp_path / "r" / "config.json").read_text())["method"] == "mine_from_plugin"
    finally:
        gradmix.unregister_method("mine_from_plugin")
        sys.modules.pop("my_mixing_plugin", None)


def test_missing_plugin_is_one_line(tmp_path, capsys):
    cfg = write(tmp_path, 'steps = 3\n[mixing]\nplugins = ["no_such_plugin_module"]\n')
    assert main(["run", str(cfg), "--out", str(tmp_path / "r")]) == 2
    assert "mixing.plugins: cannot import 'no_such_plugin_module'" in one_line_error(capsys)


def test_compare_runs_named_variants_of_one_method_side_by_side(tmp_path):
    cfg = write(
        tmp_path,
        """
steps = 4
[mixing]
update_every = 2
[compare]
methods = ["pike", "pike_big_step"]
seeds = [0]
[compare.overrides.pike_big_step.mixing]
method = "pike"
params = {zeta1 = 1.0, zeta2 = 1.0}
""",
        "variants.toml",
    )
    out = tmp_path / "cmp"
    assert main(["compare", str(cfg), "--out", str(out), "--no-progress"]) == 0
    variant = json.loads((out / "pike_big_step-seed0" / "config.json").read_text())
    assert variant["method"] == "pike" and variant["label"] == "pike_big_step"
    assert variant["method_params"]["zeta1"] == 1.0
    plain = json.loads((out / "pike-seed0" / "config.json").read_text())
    assert plain["label"] == "pike" and plain["method_params"].get("zeta1") != 1.0
    assert "pike_big_step" in (out / "comparison.md").read_text()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_a_device_the_machine_lacks_is_one_line(tmp_path, capsys):
    assert main(["run", str(SMOKE), "--out", str(tmp_path / "r"), "--set", 'device="cuda"']) == 2
    assert "CUDA is not available" in one_line_error(capsys)
    assert main(["run", str(SMOKE), "--out", str(tmp_path / "r"), "--set", 'device="toaster"']) == 2
    assert "not a torch device" in one_line_error(capsys)


def test_doremi_takes_its_reference_from_the_uniform_run_of_the_same_seed(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = [
        "compare",
        str(SMOKE),
        "--methods",
        "uniform,doremi",
        "--seeds",
        "0",
        "--set",
        "steps=4",
        "--set",
        "mixing.update_every=2",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    config = json.loads((out / "doremi-seed0" / "config.json").read_text())
    assert config["method_params"]["reference_run"] == str(out / "uniform-seed0")
    args[3] = "doremi"  # no uniform run to take the reference from
    assert main(args) == 2
    assert "needs a reference" in one_line_error(capsys)


def test_a_domain_too_short_for_a_validation_window_borrows_training_documents(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    long_docs = [" ".join(f"word{i} and more words here" for i in range(40)) for _ in range(12)]
    (corpus / "long.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in long_docs))
    short_docs = [f"tiny note number {i} is short." for i in range(40)]
    (corpus / "short.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in short_docs))
    cfg = load_config(SMOKE, {"data": {"corpus": str(corpus), "holdout_fraction": 0.05}})
    from gradmix_kit.experiment.runner import prepare_data

    with pytest.warns(UserWarning, match="domain 'short': .* moved to validation"):
        data = prepare_data(cfg)
    assert data.val_windows["short"].shape[0] >= 1 and data.train.sizes[data.train.names.index("short")] >= 1
