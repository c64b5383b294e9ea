"""One tag per number in TensorBoard (issue 24, item 5): the event files are read back with tensorboard's
EventAccumulator. The Mixer's TensorBoard writer gives every scalar of a record exactly one tag (the writers' names);
an HF Trainer reporting to TensorBoard gets the KPIs under the same names (``train/gradmix/weights/<domain>``) when the
Mixer does not write TensorBoard itself, and not at all when it does - before, ``weights/code`` and
``train/gradmix/weight/code`` showed the same number twice."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorboard")

from conftest import make_toy_domains, per_example_lm_loss
from gradmix import Mixer
from gradmix.writers import kpi_scalars, scalar_metrics


def read_scalars(folder: Path) -> dict[Path, dict[str, list[tuple[int, float]]]]:
    """{event folder: {tag: [(step, value), ...]}} for every folder under ``folder`` holding event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[Path, dict[str, list[tuple[int, float]]]] = {}
    for events in sorted({p.parent for p in folder.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        out[events] = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return out


def assert_no_number_under_two_tags(scalars: dict[Path, dict[str, list[tuple[int, float]]]]) -> None:
    """No series written by one writer appears again in another writer's files under another tag. Within one writer
    every tag is one field of the record by construction (checked in the first test); constant series (counts of
    0, a constant learning rate) are left out, since they coincide without being the same number."""
    series = [
        (folder, tag, tuple((s, round(v, 6)) for s, v in values))
        for folder, tags in scalars.items()
        for tag, values in tags.items()
        if len({v for _, v in values}) > 1
    ]
    for (fa, ta, a), (fb, tb, b) in itertools.combinations(series, 2):
        assert fa == fb or a != b, f"the same numbers under two tags: {ta!r} ({fa.name}) and {tb!r} ({fb.name})"


def test_the_mixers_tensorboard_writer_gives_each_scalar_one_tag(tmp_path, tiny_lm):
    import torch

    model = tiny_lm
    run = tmp_path / "run"
    domains = make_toy_domains()
    writers = ["jsonl", "tensorboard"]
    mixer = Mixer(domains, "odm", 12, model=model, run_dir=run, writers=writers, log_every=1, update_every=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = mixer.batches()
    for _ in range(6):
        mixer.backward(model, next(batches), per_example_lm_loss)
        optimizer.step()
        optimizer.zero_grad()
        mixer.step()
    mixer.close()
    records = mixer.history
    scalars = read_scalars(tmp_path / "run")
    assert list(scalars) == [tmp_path / "run" / "tensorboard"]
    tags = scalars[tmp_path / "run" / "tensorboard"]
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for name, value in scalar_metrics(record).items():
            expected.setdefault(name, []).append((int(record["step"]), value))
    assert set(tags) == set(expected)  # the writers' names, nothing else
    for name, values in expected.items():
        assert [s for s, _ in tags[name]] == [s for s, _ in values], name
        np.testing.assert_allclose([v for _, v in tags[name]], [v for _, v in values], rtol=1e-6)
    assert len({v for _, v in tags["weights/d0"]}) > 1  # the weights moved (the duplicate check below means something)
    assert_no_number_under_two_tags(scalars)


def test_kpi_scalars_are_the_writers_names_under_a_prefix():
    record = {
        "step": 3,
        "weights": {"a": 0.7, "b": 0.3},
        "requested_weights": {"a": 0.6, "b": 0.4},
        "train_loss": {"a": 1.5, "b": None},
        "weight_entropy": 0.61,
        "update_terms": {"gain": {"a": 1.0, "b": 2.0}},
        "events": [],
    }
    assert kpi_scalars(record) == {
        "gradmix/weights/a": 0.7,
        "gradmix/weights/b": 0.3,
        "gradmix/train_loss/a": 1.5,
        "gradmix/weight_entropy": 0.61,
    }
    assert set(kpi_scalars({**record, "events": ["x"]}, prefix="")) >= {"weights/a", "events_count"}
    assert set(kpi_scalars(record, prefix="")) <= set(scalar_metrics(record))


# -- HF Trainer reporting to TensorBoard ----------------------------------------------------------------------------


def _hf_train(out: Path, mixer_writers: list[str], log_to_trainer: bool | None = None, steps: int = 6) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    pytest.importorskip("datasets")
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from gradmix.integrations.hf import MixingTrainer, hf_domains, windows_dataset

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    domains = hf_domains(
        {name: windows_dataset(rng.integers(lo, lo + 60, size=2000), 16) for name, lo in (("a", 0), ("b", 100))}
    )
    config = GPT2Config(vocab_size=256, n_positions=16, n_embd=16, n_layer=1, n_head=2, use_cache=False)
    config.bos_token_id = config.eos_token_id = None
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        save_strategy="no",
        logging_steps=1,
        report_to=["tensorboard"],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        log_level="error",
    )
    trainer = MixingTrainer(
        model=GPT2LMHeadModel(config),
        args=args,
        domains=domains,
        method="odm",
        mixer_options={"update_every": 1, "writers": mixer_writers},
        log_to_trainer=log_to_trainer,
    )
    trainer.train()
    trainer.mixer.close()


@pytest.mark.integration
def test_hf_trainer_alone_gets_the_kpis_under_the_writers_names(tmp_path):
    _hf_train(tmp_path / "out", ["jsonl"])
    scalars = read_scalars(tmp_path / "out")
    assert len(scalars) == 1  # the Trainer's TensorBoard run only
    tags = next(iter(scalars.values()))
    for name in ("a", "b"):
        assert f"train/gradmix/weights/{name}" in tags and f"train/gradmix/train_loss/{name}" in tags
    assert "train/gradmix/weight_entropy" in tags
    assert not [t for t in tags if t.startswith("train/gradmix/weight/")]  # the old singular name is gone
    assert len({v for _, v in tags["train/gradmix/weights/a"]}) > 1


@pytest.mark.integration
def test_hf_trainer_and_the_mixers_tensorboard_writer_show_each_number_once(tmp_path):
    _hf_train(tmp_path / "out", ["jsonl", "tensorboard"])
    scalars = read_scalars(tmp_path / "out")
    assert len(scalars) == 2  # the Trainer's run (out/runs/...) and the Mixer's (out/tensorboard)
    mixer_tags = scalars[tmp_path / "out" / "tensorboard"]
    trainer_tags = next(tags for folder, tags in scalars.items() if folder != tmp_path / "out" / "tensorboard")
    assert "weights/a" in mixer_tags and "train/loss" in trainer_tags
    assert not [t for t in trainer_tags if "gradmix" in t]
    assert_no_number_under_two_tags(scalars)


@pytest.mark.integration
def test_log_to_trainer_true_sends_them_to_both_and_the_check_sees_it(tmp_path):
    _hf_train(tmp_path / "out", ["jsonl", "tensorboard"], log_to_trainer=True)
    scalars = read_scalars(tmp_path / "out")
    with pytest.raises(AssertionError, match="the same numbers under two tags"):
        assert_no_number_under_two_tags(scalars)  # asked for: weights/a and train/gradmix/weights/a
