"""KPIs recorded by the core: train/validation gap, probe and update time, the terms behind each update; your own
evaluation metrics through the Mixer (issue 12)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradmix import Mixer
from gradmix.sources import DomainSet


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int = 40) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 8)
        self.out = torch.nn.Linear(8, vocab)

    def forward(self, ids):
        return self.out(torch.tanh(self.emb(ids)))


def loss_fn(model, batch):
    ids = batch["input_ids"]
    logits = model(ids[:, :-1])
    return (
        torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        )
        .view(ids.shape[0], -1)
        .mean(1)
    )


def make_domains(sizes=(30, 20, 50)) -> DomainSet:
    rng = np.random.default_rng(0)
    return DomainSet.from_arrays({f"d{i}": rng.integers(i * 10, i * 10 + 12, size=(n, 7)) for i, n in enumerate(sizes)})


def train(mixer, model, steps, eval_every=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i, batch in enumerate(mixer.batches(steps)):
        mixer.backward(model, batch, loss_fn)
        opt.step()
        opt.zero_grad()
        if eval_every and (i + 1) % eval_every == 0:
            mixer.add_metrics({"val_loss": {n: 5.0 for n in mixer.names}})
            mixer.evaluate_metrics(model, i + 1)
        mixer.step()


@pytest.mark.parametrize(
    "method, params, terms",
    [
        (
            "pike",
            {"variant": "gradmix_v1", "min_weight": 0.05},
            {"gain", "variance_penalty", "log_step", "grad_sq_norm", "variance_2b"},
        ),
        ("pike", {}, {"lam", "kappa", "bound_weights", "grad_sq_norm", "variance_2b"}),
        ("fair_pike", {}, {"grad_sq_norm", "variance_2b", "tilt"}),
    ],
)
def test_pike_records_its_terms_timing_and_gaps(method, params, terms):
    model = TinyLM()

    def accuracy(model, step):
        return {"d0": 0.5, "d1": float(step), "d2": float("nan")}

    def constant(model, step):
        return 0.25

    mixer = Mixer(
        make_domains(),
        method,
        12,
        model=model,
        update_every=4,
        log_every=2,
        method_params=params,
        eval_metrics={"acc": accuracy, "const": constant},
    )
    train(mixer, model, 8, eval_every=4)
    history = list(mixer.history)
    updates = [r for r in history if "update_terms" in r]
    assert [r["update_step"] for r in updates] == [4, 8]
    assert terms <= set(updates[0]["update_terms"])
    g = updates[0]["update_terms"]["grad_sq_norm"]
    assert set(g) == {"d0", "d1", "d2"}
    if params.get("variant") == "gradmix_v1":  # statistics divided by their mean
        assert np.mean(list(g.values())) == pytest.approx(1.0)
    if "bound_weights" in terms:  # the bound's own mix, before the uniform share: a probability vector
        assert sum(updates[0]["update_terms"]["bound_weights"].values()) == pytest.approx(1.0)
    var = updates[0]["update_terms"]["variance_2b"]
    assert all(v >= 0 for v in var.values())
    if method == "fair_pike":
        tilt = updates[0]["update_terms"]["tilt"]
        assert np.mean(list(tilt.values())) == pytest.approx(1.0)  # y_k / mean(y)
    assert all(r["probe_seconds"] >= 0 and r["update_seconds"] >= 0 for r in history)
    assert sum(r["probe_seconds"] for r in history) > 0  # the measuring steps were timed
    evals = [r for r in history if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    for r in evals:
        assert set(r["train_val_gap"]) == {"d0", "d1", "d2"}
        assert r["eval_metrics"] == {"acc": {"d0": 0.5, "d1": float(r["step"]), "d2": None}, "const": 0.25}
    # the gap is validation minus the mean training loss since the previous evaluation
    assert all(v is not None and v < 5.0 for v in evals[0]["train_val_gap"].values())


def test_dga_records_alignments():
    model = TinyLM()
    rng = np.random.default_rng(1)
    target = torch.as_tensor(rng.integers(10, 22, size=(40, 7)))
    mixer = Mixer(make_domains(), "dga", 12, model=model, target=target, update_every=2, log_every=2)
    train(mixer, model, 4)
    updates = [r for r in mixer.history if "update_terms" in r]
    assert updates and {"alignment", "scaled_alignment", "log_step"} <= set(updates[0]["update_terms"])
    assert set(updates[0]["update_terms"]["alignment"]) == {"d0", "d1", "d2"}


def test_eval_metrics_must_be_callable_and_return_numbers():
    with pytest.raises(TypeError, match="callable"):
        Mixer(make_domains(), "uniform", 12, eval_metrics={"x": 3})
    mixer = Mixer(make_domains(), "uniform", 12, eval_metrics={"x": lambda: "high"})
    with pytest.raises(TypeError, match="returned 'high'"):
        mixer.evaluate_metrics()
