"""Weights by name (issue 21, item 5): wherever weights go in (sampler, Mixer, methods built through the Mixer, the
HF / Lightning integrations, ``gradmix run`` configs), ``{domain name: weight}`` is the positional vector in the
domains' order: the same batches for a fixed seed, whatever the mapping's order. An unknown or a missing name is a
one-line ``ValueError`` naming it and listing the domains; ``make_method`` knows no names and says so."""

from __future__ import annotations

import itertools
import json
import textwrap
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gradmix
from conftest import make_toy_domains
from gradmix import Mixer, MixtureSampler
from gradmix.methods import WeightError, make_method, resolve_weight_params, validate_weights

NAMES = ["code", "web", "books"]
SIZES = [500, 300, 200]
LIST = [0.2, 0.5, 0.3]
BY_NAME = {"code": 0.2, "web": 0.5, "books": 0.3}
SHUFFLED = {"books": 0.3, "code": 0.2, "web": 0.5}  # same weights, another order


def _batches(sampler, n: int = 12) -> list:
    return [list(b) for b in itertools.islice(iter(sampler), n)]


def _counts(batches, k: int) -> np.ndarray:
    counts = np.zeros(k, dtype=np.int64)
    for batch in batches:
        for domain, _ in batch:
            counts[domain] += 1
    return counts


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


# -- the one translation --------------------------------------------------------------------------------------------


def test_mapping_reads_by_name_in_any_order():
    expected = validate_weights(LIST, 3)
    for mapping in (BY_NAME, SHUFFLED):
        np.testing.assert_array_equal(validate_weights(mapping, 3, names=NAMES), expected)
    # unnormalised values are rescaled exactly as a list is
    np.testing.assert_array_equal(
        validate_weights({"web": 5, "books": 3, "code": 2}, 3, names=NAMES), validate_weights([2, 5, 3], 3)
    )


@pytest.mark.parametrize(
    ("mapping", "pattern"),
    [
        ({"code": 0.2, "web": 0.5, "boks": 0.3}, r"unknown domain 'boks'; the domains are 'code', 'web', 'books'"),
        ({"code": 0.2, "web": 0.8}, r"no weight for domain 'books'; give one for every domain: 'code', 'web', 'books'"),
        ({"code": -0.2, "web": 0.5, "books": 0.3}, r"negative value -0.2 for domain 'code'"),
        ({"code": float("nan"), "web": 0.5, "books": 0.3}, r"non-finite value nan for domain 'code'"),
        ({"code": 0, "web": 0, "books": 0}, r"all zero"),
    ],
)
def test_bad_mappings_are_one_line_errors_naming_the_name(mapping, pattern):
    with pytest.raises(ValueError, match=pattern) as exc:
        validate_weights(mapping, 3, names=NAMES)
    _one_line(exc)
    with pytest.raises(ValueError, match=pattern) as exc:
        MixtureSampler(SIZES, 10, mapping, domain_names=NAMES)
    _one_line(exc)


def test_positional_weights_are_unchanged():
    np.testing.assert_array_equal(validate_weights([1, 3], 2), [0.25, 0.75])
    params = {"weights": [1, 3], "min_weight": 0.1}
    assert resolve_weight_params(params, ["a", "b"]) == params  # only mappings are translated
    with pytest.raises(WeightError, match="has 2 entries but there are 3 domains"):
        MixtureSampler(SIZES, 10, [0.5, 0.5], domain_names=NAMES)


# -- sampler ----------------------------------------------------------------------------------------------------------


def test_sampler_mapping_equals_positional_for_a_fixed_seed():
    reference = _batches(MixtureSampler(SIZES, 10, LIST, seed=3, domain_names=NAMES))
    for mapping in (BY_NAME, SHUFFLED):
        assert _batches(MixtureSampler(SIZES, 10, mapping, seed=3, domain_names=NAMES)) == reference

    by_list = MixtureSampler(SIZES, 10, seed=3, domain_names=NAMES)
    by_name = MixtureSampler(SIZES, 10, seed=3, domain_names=NAMES)
    _batches(by_list, 4), _batches(by_name, 4)
    by_list.set_weights([0.6, 0.1, 0.3])
    by_name.set_weights({"books": 0.3, "web": 0.1, "code": 0.6})
    np.testing.assert_array_equal(by_name.weights, by_list.weights)
    assert _batches(by_name) == _batches(by_list)
    with pytest.raises(ValueError, match="unknown domain 'news'") as exc:
        by_name.set_weights({"news": 1.0, "code": 0.0, "web": 0.0, "books": 0.0})
    _one_line(exc)


def test_sampler_without_domain_names_refuses_a_mapping():
    with pytest.raises(ValueError, match="domain names are not known here: pass a list") as exc:
        MixtureSampler(SIZES, 10, BY_NAME)
    _one_line(exc)
    sampler = MixtureSampler(SIZES, 10)
    with pytest.raises(ValueError, match="domain names are not known here"):
        sampler.set_weights({"0": 1.0, "1": 1.0, "2": 1.0})  # the stand-in names are not names a user gave


# -- methods and the Mixer --------------------------------------------------------------------------------------------


def test_make_method_without_names_says_how():
    cases: tuple[tuple[str, dict[str, Any]], ...] = (
        ("fixed", {"weights": BY_NAME}),
        ("pike", {"initial_weights": BY_NAME}),
    )
    for name, params in cases:
        with pytest.raises(ValueError, match=r"pass a list .* build through Mixer/DomainSet so names are known") as exc:
            make_method(name, 3, **params)
        _one_line(exc)
    np.testing.assert_array_equal(make_method("fixed", 3, weights=LIST).weights, validate_weights(LIST, 3))


def _toy_names() -> list[str]:
    return make_toy_domains().names  # d0, d1, d2 (sizes 30, 20, 50)


def _mixer_batches(mixer: Mixer, n: int = 8) -> tuple[list, np.ndarray]:
    batches = _batches(mixer.sampler, n)
    return batches, _counts(batches, len(mixer.names))


@pytest.mark.parametrize(
    ("method", "key"), [("fixed", "weights"), ("pike", "initial_weights"), ("doge", "initial_weights")]
)
def test_mixer_mapping_equals_positional(method, key):
    names = _toy_names()
    positional = [0.5, 0.2, 0.3]
    mapping = {names[2]: 0.3, names[0]: 0.5, names[1]: 0.2}  # not in the domains' order
    extra = {} if method == "fixed" else {"probe": object()}  # no model needed: sampling only
    if method == "doge":
        extra["target"] = make_toy_domains((10,)).domains[0]
    ref = Mixer(make_toy_domains(), method, batch_size=10, seed=4, method_params={key: positional}, **extra)
    mixer = Mixer(make_toy_domains(), method, batch_size=10, seed=4, method_params={key: mapping}, **extra)
    np.testing.assert_array_equal(mixer.weights, ref.weights)
    np.testing.assert_allclose(mixer.weights, positional)
    batches, counts = _mixer_batches(mixer)
    ref_batches, ref_counts = _mixer_batches(ref)
    assert batches == ref_batches
    np.testing.assert_array_equal(counts, ref_counts)


def test_mixer_errors_name_the_parameter_and_the_domain():
    names = _toy_names()
    with pytest.raises(ValueError, match=r"method_params\['weights'\] names an unknown domain 'web'") as exc:
        Mixer(
            make_toy_domains(), "fixed", batch_size=10, method_params={"weights": {"web": 1.0, **{n: 1 for n in names}}}
        )
    assert all(repr(n) in _one_line(exc) for n in names)  # the known names are listed
    with pytest.raises(ValueError, match=rf"method_params\['weights'\] has no weight for domain '{names[2]}'") as exc:
        Mixer(make_toy_domains(), "fixed", batch_size=10, method_params={"weights": {names[0]: 1.0, names[1]: 1.0}})
    _one_line(exc)
    with pytest.raises(ValueError, match=r"method_params\['initial_weights'\] has a negative value"):
        Mixer(
            make_toy_domains(),
            "pike",
            batch_size=10,
            probe=object(),
            method_params={"initial_weights": {names[0]: -1.0, names[1]: 1.0, names[2]: 1.0}},
        )


# -- integrations -----------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_hf_trainer_constructor_takes_weights_by_name(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from gradmix.integrations.hf import MixingTrainer

    names = _toy_names()

    def trainer(weights, out: Path):
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=8, n_embd=8, n_layer=1, n_head=1))
        args = TrainingArguments(
            output_dir=str(out), max_steps=5, per_device_train_batch_size=10, report_to="none", use_cpu=True, seed=2
        )
        return MixingTrainer(
            model=model, args=args, domains=make_toy_domains(), method="fixed", method_params={"weights": weights}
        )

    ref = trainer([0.1, 0.6, 0.3], tmp_path / "list")
    by_name = trainer({names[1]: 0.6, names[2]: 0.3, names[0]: 0.1}, tmp_path / "dict")
    try:
        np.testing.assert_array_equal(by_name.mixer.weights, ref.mixer.weights)
        assert _mixer_batches(by_name.mixer)[0] == _mixer_batches(ref.mixer)[0]
        with pytest.raises(ValueError, match=r"unknown domain 'web'") as exc:
            trainer({"web": 1.0}, tmp_path / "bad")
        _one_line(exc)
    finally:
        ref.mixer.close()
        by_name.mixer.close()


@pytest.mark.integration
def test_lightning_callback_checks_weights_by_name_at_construction(tmp_path):
    pytest.importorskip("lightning")
    from gradmix.integrations.lightning import MixingCallback

    names = _toy_names()
    callback = MixingCallback(
        make_toy_domains(), "fixed", 10, method_params={"weights": {names[2]: 3, names[0]: 5, names[1]: 2}}
    )
    ref = Mixer(make_toy_domains(), "fixed", batch_size=10, method_params={"weights": [5, 2, 3]})
    built = Mixer(**callback._spec)  # what setup() builds (with the trainer's model and ranks)
    np.testing.assert_array_equal(built.weights, ref.weights)
    assert _mixer_batches(built)[0] == _mixer_batches(ref)[0]
    with pytest.raises(ValueError, match=rf"has no weight for domain '{names[1]}'") as exc:
        MixingCallback(make_toy_domains(), "fixed", 10, method_params={"weights": {names[0]: 1, names[2]: 1}})
    _one_line(exc)


# -- configs ----------------------------------------------------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_toml_weights_table_equals_the_list(tmp_path):
    from gradmix_kit.experiment.config import load_config
    from gradmix_kit.experiment.runner import _method_params

    names = _toy_names()
    data: Any = types.SimpleNamespace(train=make_toy_domains())
    mixers = []
    for weights in ("[0.5, 0.2, 0.3]", f"{{ {names[1]} = 0.2, {names[2]} = 0.3, {names[0]} = 0.5 }}"):
        cfg = load_config(_write(tmp_path, f'[mixing]\nmethod = "fixed"\n[mixing.params]\nweights = {weights}\n'))
        params = _method_params(cfg["mixing"], cfg["data"], data)
        mixers.append(Mixer(data.train, "fixed", batch_size=10, seed=1, method_params=params))
    np.testing.assert_array_equal(mixers[0].weights, mixers[1].weights)
    assert _mixer_batches(mixers[0])[0] == _mixer_batches(mixers[1])[0]

    cfg = load_config(_write(tmp_path, '[mixing]\nmethod = "pike"\n[mixing.params]\ninitial_weights = { d0 = 1 }\n'))
    with pytest.raises(ValueError, match=r"mixing.params.initial_weights has no weight for domain 'd1'") as exc:
        _method_params(cfg["mixing"], cfg["data"], data)
    _one_line(exc)


@pytest.mark.integration
def test_gradmix_run_with_weights_by_name(tmp_path):
    from gradmix_kit.experiment.config import load_config
    from gradmix_kit.experiment.runner import prepare_data, run_experiment

    base = """
        steps = 3
        [data]
        window = 32
        vocab_size = 512
        [eval]
        continuation_items = 0
        [mixing]
        method = "fixed"
        log_every = 1
        [mixing.params]
    """
    cfg = load_config(_write(tmp_path, base + "    weights = { legal = 1, code = 4, docs = 2, changelog = 3 }\n"))
    data = prepare_data(cfg)
    out = tmp_path / "run"
    run_experiment(cfg, out, data=data, progress=False, write_plots=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert rows and all(row["weights"] == {"changelog": 0.3, "code": 0.4, "docs": 0.2, "legal": 0.1} for row in rows)

    bad = load_config(_write(tmp_path, base + "    weights = { legal = 1, code = 4, docs = 2, changelg = 3 }\n"))
    with pytest.raises(ValueError, match=r"mixing.params.weights names an unknown domain 'changelg'") as exc:
        run_experiment(bad, tmp_path / "bad", data=data, progress=False, write_plots=False)
    _one_line(exc)


def test_top_level_import_still_offers_the_helpers():
    assert gradmix.methods.resolve_weight_params is resolve_weight_params
