"""Mixer: schedule, metrics, stats plumbing, bad input, checkpoint atomicity."""

from __future__ import annotations

import json
import warnings
from typing import ClassVar

import numpy as np
import pytest
import torch

from gradmix import Mixer, make_method
from gradmix.controller import MixingWarning
from gradmix.sources import DocumentSplitError, Domain, DomainSet, pack_tokens


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
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    )
    return loss.view(ids.shape[0], -1).mean(1)


def make_domains(sizes=(30, 20, 50)) -> DomainSet:
    rng = np.random.default_rng(0)
    return DomainSet.from_arrays({f"d{i}": rng.integers(i * 10, i * 10 + 12, size=(n, 7)) for i, n in enumerate(sizes)})


def train(mixer: Mixer, model, steps: int):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for batch in mixer.batches(steps):
        mixer.backward(model, batch, loss_fn)
        opt.step()
        opt.zero_grad()
        mixer.step()


def test_metrics_jsonl_records_weights_losses_tokens(tmp_path):
    model = TinyLM()
    # gradmix_v1 moves the weights at every update on this tiny data (the default's shrinkage keeps them uniform)
    mixer = Mixer(
        make_domains(),
        "pike",
        12,
        model=model,
        update_every=4,
        log_every=2,
        run_dir=tmp_path,
        method_params={"variant": "gradmix_v1", "min_weight": 0.05},
    )
    train(mixer, model, 12)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12]
    for r in records:
        assert set(r["weights"]) == {"d0", "d1", "d2"} and abs(sum(r["weights"].values()) - 1) < 1e-9
        assert all(v is None or np.isfinite(v) for v in r["train_loss"].values())
    assert sum(records[-1]["tokens"].values()) == 12 * 12 * 6  # steps x batch x window tokens
    # weights change only at update steps (4, 8, 12)
    w = [tuple(r["weights"].values()) for r in records]
    # the method's request changes at update steps (4, 8, 12); the sampled mix from the next batch on
    req = [tuple(r["requested_weights"].values()) for r in records]
    assert req[0] != req[1] and req[1] == req[2] and req[2] != req[3]
    assert w[0] == w[1] and w[1] != w[2] and w[2] == w[3] and w[3] != w[4]
    assert w[2] == req[1] and w[4] == req[3]


def test_weights_reach_the_sampler():
    model = TinyLM()
    mixer = Mixer(make_domains(), "pike", 12, model=model, update_every=2, method_params={"min_weight": 0.01})
    train(mixer, model, 6)
    np.testing.assert_array_equal(mixer.sampler.weights, mixer.method.weights)


def test_static_method_without_probe_uses_observe():
    mixer = Mixer(make_domains(), "temperature", 10, method_params={"alpha": 0.0})
    for batch in mixer.batches(3):
        mixer.observe(batch["domain"], torch.ones(len(batch["domain"])))
        mixer.step()
    np.testing.assert_allclose(mixer.weights, [1 / 3] * 3)


def test_gradient_method_without_model_is_a_clear_error():
    with pytest.raises(ValueError, match="method 'pike' needs gradient statistics: pass model="):
        Mixer(make_domains(), "pike", 12)


def test_dga_needs_a_target_and_rejects_a_tiny_one():
    with pytest.raises(ValueError, match="steers toward a target set"):
        Mixer(make_domains(), "dga", 12, model=TinyLM())
    tiny = Domain("medical", torch.zeros((1, 7), dtype=torch.long))
    with pytest.raises(ValueError, match="target set 'medical' has 1 example"):
        Mixer(make_domains(), "dga", 12, model=TinyLM(), target=tiny)


def test_dga_runs_with_a_target_and_moves_weight_toward_it():
    torch.manual_seed(0)
    model = TinyLM()
    rng = np.random.default_rng(1)
    target = Domain("target", torch.as_tensor(rng.integers(20, 32, size=(40, 7))))  # same tokens as d2
    mixer = Mixer(
        make_domains(),
        "dga",
        12,
        model=model,
        target=target,
        update_every=2,
        method_params={"step_size": 0.5, "ema": 0.0},
    )
    train(mixer, model, 40)
    assert int(np.argmax(mixer.weights)) == 2


def test_empty_domain_and_bad_names_are_refused():
    with pytest.raises(DocumentSplitError, match="domain 'empty' is empty"):
        DomainSet.from_token_sequences({"ok": [[1, 2, 3, 4, 5, 6]], "empty": [[]]}, window=2)
    with pytest.raises(DocumentSplitError, match="domain 'short' has 3 tokens; one window needs 9"):
        pack_tokens([[1, 2, 3]], 8, name="short")
    with pytest.raises(ValueError, match="duplicate domain names"):
        DomainSet([Domain("a", torch.zeros((2, 3), dtype=torch.long))] * 2)


def test_unknown_method_and_mismatched_method_instance():
    with pytest.raises(ValueError, match="unknown mixing method 'pik'"):
        Mixer(make_domains(), "pik", 12)
    with pytest.raises(ValueError, match="built for 2 domains, the Mixer has 3"):
        Mixer(make_domains(), make_method("uniform", 2), 12)


def test_checkpoint_from_other_domains_is_refused(tmp_path):
    a = Mixer(make_domains(), "uniform", 12)
    a.save_checkpoint(tmp_path / "a.pt")
    other = DomainSet.from_arrays(
        {"x": np.zeros((5, 7), int), "d1": np.zeros((5, 7), int), "d2": np.zeros((5, 7), int)}
    )
    b = Mixer(other, "uniform", 12)
    with pytest.raises(
        ValueError, match=r"other domains: checkpoint has \['d0', 'd1', 'd2'\], this Mixer has \['x', 'd1', 'd2'\]"
    ):
        b.load_checkpoint(tmp_path / "a.pt")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    mixer = Mixer(make_domains(), "uniform", 12)
    path = tmp_path / "ckpt.pt"
    mixer.save_checkpoint(path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        mixer.save_checkpoint(path)
    assert path.read_bytes() == before  # old checkpoint intact
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind


def test_skipped_update_warns_and_is_recorded(tmp_path):
    class NanLossLM(TinyLM):
        def forward(self, ids):
            return super().forward(ids) * float("nan")

    model = NanLossLM()
    mixer = Mixer(make_domains(), "pike", 12, model=model, update_every=2, log_every=2, run_dir=tmp_path)
    opt_free_batches = mixer.batches(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in opt_free_batches:
            mixer.backward(model, batch, loss_fn)
            model.zero_grad()
            mixer.step()
    assert any(issubclass(w.category, MixingWarning) and "skipped" in str(w.message) for w in caught)
    np.testing.assert_allclose(mixer.weights, [1 / 3] * 3)  # never NaN
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert any("skipped" in e for e in record["events"])


def test_dga_distribution_reweighting_runs_in_the_mixer():
    from gradmix.methods.dga import DGA, base_distributions_from_clusters

    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    k = 12
    domains = DomainSet.from_arrays(
        {f"c{i}": rng.integers((i % 3) * 12, (i % 3) * 12 + 12, size=(20 + i, 7)) for i in range(k)}
    )
    fine_to_coarse = np.arange(k) % 3
    base = base_distributions_from_clusters(fine_to_coarse, domains.sizes)
    method = DGA(k, base_distributions=base, step_size=0.5, ema=0.0)
    target = Domain("target", torch.as_tensor(rng.integers(24, 36, size=(40, 7))))  # like coarse cluster 2
    model = TinyLM()
    mixer = Mixer(domains, method, 12, model=model, target=target, update_every=2)
    train(mixer, model, 30)
    w = mixer.weights
    assert w.shape == (k,) and abs(w.sum() - 1) < 1e-9
    np.testing.assert_allclose(w, base @ method.base_weights, atol=1e-12)
    assert method.base_weights.argmax() == 2


def test_alerts_for_starved_and_over_repeated_domains(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # the starting weights already starve domain d2
        mixer = Mixer(
            make_domains((5, 40, 40)),
            "fixed",
            12,
            method_params={"weights": [0.9, 0.09, 0.01]},
            run_dir=tmp_path,
            log_every=1,
            alert_repeats=3,
            update_every=1,
        )
        for batch in mixer.batches(3):
            mixer.observe(batch["domain"], torch.ones(len(batch["domain"])))
            mixer.step()
    messages = [str(w.message) for w in caught if issubclass(w.category, MixingWarning)]
    # starved for 3 consecutive checks (the start and 2 updates): reported once
    assert sum("domain 'd2' is starved: weight 0.0100" in m for m in messages) == 1
    assert sum("domain 'd0' started pass 3" in m for m in messages) == 1  # once, not at every later pass


def test_loss_based_methods_see_the_whole_update_interval():
    """The losses handed to a method cover every step since its last update, whatever log_every is."""
    from gradmix.methods.base import MixingMethod

    class Recorder(MixingMethod):
        name = "recorder"
        required_stats = frozenset({"loss"})
        seen: ClassVar[list] = []

        def _update(self, stats):
            Recorder.seen.append((stats.loss.copy(), stats.examples.copy()))
            return None

    mixer = Mixer(make_domains(), Recorder(3), 6, update_every=4, log_every=1)
    losses = []
    for t, batch in enumerate(mixer.batches(8)):
        per_example = torch.full((len(batch["domain"]),), float(t)) + batch["domain"].float()
        losses.append((batch["domain"].numpy(), per_example.numpy()))
        mixer.observe(batch["domain"], per_example)
        mixer.step()
    assert len(Recorder.seen) == 2
    for update, (loss, examples) in enumerate(Recorder.seen):
        d = np.concatenate([x[0] for x in losses[4 * update : 4 * update + 4]])
        v = np.concatenate([x[1] for x in losses[4 * update : 4 * update + 4]])
        np.testing.assert_allclose(loss, [v[d == k].mean() for k in range(3)])
        np.testing.assert_array_equal(examples, np.bincount(d, minlength=3))


def test_exhausted_data_ends_batches_cleanly_and_logs_what_was_sampled(tmp_path):
    model = TinyLM()
    mixer = Mixer(make_domains((6, 4, 40)), "uniform", 6, max_repeats=1, log_every=1, run_dir=tmp_path)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = 0
    with pytest.warns(MixingWarning, match=r"data exhausted.*exhausted: \['d0', 'd1', 'd2'\]"):
        for batch in mixer.batches(100):
            mixer.backward(model, batch, loss_fn)
            opt.step()
            opt.zero_grad()
            mixer.step()
            steps += 1
    assert steps == (6 + 4 + 40) // 6  # every example once; the partial last batch is dropped
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # once d1 (4 examples) is used up, the logged mix shows it at 0 while the method still asks for 1/3
    late = records[-1]
    assert late["weights"]["d1"] == 0 and late["weights"]["d0"] == 0
    assert late["weights"]["d2"] == pytest.approx(1.0)
    assert late["requested_weights"]["d1"] == pytest.approx(1 / 3)
    tokens = records[-1]["tokens"]
    assert tokens["d0"] == 6 * 6 and tokens["d1"] == 4 * 6  # never more than one pass
