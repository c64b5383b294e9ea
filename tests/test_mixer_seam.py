"""The Mixer as a seam any loop can drive: gradient accumulation, backward_fn, safe all-or-nothing checkpoints,
explicit metrics truncation, pure state."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from gradmix import Mixer
from gradmix.controller import MixingWarning
from gradmix.core import MixingCore
from gradmix.methods import make_method
from gradmix.stats import Measurement
from test_controller import TinyLM, loss_fn, make_domains


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def run_steps(accumulation, steps=6, method="uniform", seed=0, backward_fn=None, model=None, **kw):
    torch.manual_seed(0)
    model = model or TinyLM()
    mixer = Mixer(
        make_domains(), method, 12, model=model, accumulation_steps=accumulation, update_every=2, seed=seed, **kw
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    drawn, grad_log = [], []
    micro = []
    for i, batch in enumerate(mixer.batches(steps)):
        micro.append(batch)
        mixer.backward(model, batch, loss_fn, backward_fn=backward_fn)
        if (i + 1) % accumulation == 0:
            grad_log.append(grads(model))
            drawn.append(
                sorted(
                    zip(
                        torch.cat([b["domain"] for b in micro]).tolist(),
                        torch.cat([b["index"] for b in micro]).tolist(),
                    )
                )
            )
            micro = []
            opt.step()
            opt.zero_grad()
            mixer.step()
    return mixer, drawn, grad_log


@pytest.mark.parametrize("method", ["uniform", "doremi"])
def test_accumulation_trades_memory_never_data(method):
    kw = {"method_params": {"reference_loss": [3.0, 3.0, 3.0]}} if method == "doremi" else {}
    plain, drawn_1, grads_1 = run_steps(1, method=method, **kw)
    accum, drawn_4, grads_4 = run_steps(4, method=method, **kw)
    assert drawn_1 == drawn_4  # the 4 micro-batches of a step are exactly the batch without accumulation
    for g1, g4 in zip(grads_1, grads_4):
        for a, b in zip(g1, g4):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # .grad = mean-loss gradient of the whole batch
    np.testing.assert_allclose(plain.weights, accum.weights, rtol=1e-6)  # float32 losses of other batch shapes


def test_accumulation_with_pike_measures_pooled_statistics():
    # gradmix_v1: its weights move on this tiny data (the default's shrinkage leaves them uniform here)
    mixer, _, _ = run_steps(
        3, steps=8, method="pike", method_params={"variant": "gradmix_v1", "min_weight": 0.01}, log_every=2
    )
    assert not np.allclose(mixer.weights, 1 / 3)  # the pooled statistics moved the weights
    records = list(mixer.history)
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert all(abs(sum(r["weights"].values()) - 1) < 1e-9 for r in records)


def test_accumulation_misuse_is_a_clear_error():
    with pytest.raises(ValueError, match="divisible by world_size x accumulation_steps"):
        Mixer(make_domains(), "uniform", 10, accumulation_steps=4)
    with pytest.raises(ValueError, match="accumulation_steps must be a positive integer"):
        Mixer(make_domains(), "uniform", 12, accumulation_steps=0)
    model = TinyLM()
    mixer = Mixer(make_domains(), "uniform", 12, model=model, accumulation_steps=3)
    batches = mixer.batches(2)
    mixer.backward(model, next(batches), loss_fn)
    with pytest.raises(RuntimeError, match=r"step\(\) after 1 of 3 micro-batches"):
        mixer.step()
    with pytest.raises(RuntimeError, match="in the middle of an optimizer step"):
        mixer.state_dict()
    mixer.backward(model, next(batches), loss_fn)
    mixer.backward(model, next(batches), loss_fn)
    with pytest.raises(RuntimeError, match="called 4 times in one optimizer step"):
        mixer.backward(model, next(batches), loss_fn)
    mixer.step()


def test_grad_scaler_backward_gives_the_same_mix_as_a_plain_backward():
    plain, _, _ = run_steps(1, steps=8, method="pike", method_params={"min_weight": 0.01})
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    calls = []

    def scaled_backward(loss):
        calls.append(1)
        scaler.scale(loss).backward()

    torch.manual_seed(0)
    model = TinyLM()
    mixer = Mixer(make_domains(), "pike", 12, model=model, update_every=2, method_params={"min_weight": 0.01})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for batch in mixer.batches(8):
        mixer.backward(model, batch, loss_fn, backward_fn=scaled_backward)
        scaler.step(opt)  # unscales, steps
        scaler.update()
        opt.zero_grad()
        mixer.step()
    assert calls and scaler.get_scale() == 2.0**10  # no inf/NaN: the scale never changed
    np.testing.assert_allclose(mixer.weights, plain.weights, rtol=1e-4)


def test_load_state_dict_is_pure_and_truncation_is_explicit(tmp_path):
    model = TinyLM()
    mixer = Mixer(make_domains(), "uniform", 12, model=model, log_every=1, run_dir=tmp_path)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = None
    for batch in mixer.batches(6):
        mixer.backward(model, batch, loss_fn)
        opt.step()
        opt.zero_grad()
        mixer.step()
        if mixer.step_count == 3:
            state = mixer.state_dict()
    path = tmp_path / "metrics.jsonl"
    with path.open("a") as fh:
        fh.write('{"step": 7, "weights": {"d0"')  # a kill during an append
    before = path.read_bytes()
    # numpy's stubs type get_state() (legacy=True by default: a tuple) as the legacy=False dict
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()  # type: ignore[index]
    mixer.load_state_dict(state)
    assert path.read_bytes() == before  # load_state_dict touched no file ...
    assert np.array_equal(np.random.get_state()[1], np_before)  # type: ignore[index]  # ... nor an RNG
    assert random.getstate() == py_before
    assert mixer.truncate_metrics() == 3
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_checkpoint_load_is_all_or_nothing_and_restores_every_rng(tmp_path):
    model = TinyLM()
    mixer = Mixer(make_domains(), "pike", 12, model=model, update_every=2, method_params={"min_weight": 0.01})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for batch in mixer.batches(4):
        mixer.backward(model, batch, loss_fn)
        opt.step()
        opt.zero_grad()
        mixer.step()
    ckpt = mixer.save_checkpoint(tmp_path / "ckpt.pt", model=model, optimizer=opt)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    for batch in mixer.batches(2):  # move on, so a restore is visible
        mixer.backward(model, batch, loss_fn)
        opt.step()
        opt.zero_grad()
        mixer.step()
    state_before = mixer.state_dict()
    params_before = [p.detach().clone() for p in model.parameters()]

    other = torch.nn.Linear(3, 3)  # a model that does not fit
    with pytest.raises(ValueError, match=r"ckpt.pt.*does not fit"):
        mixer.load_checkpoint(ckpt, model=other)
    assert mixer.state_dict() == state_before  # nothing changed
    mixer.load_checkpoint(ckpt, model=model, optimizer=opt)
    assert mixer.step_count == 4 and not all(torch.equal(a, b) for a, b in zip(params_before, model.parameters()))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_foreign_and_malicious_files_are_refused_naming_the_file(tmp_path):
    mixer = Mixer(make_domains(), "uniform", 12)
    plain = tmp_path / "plain.pt"
    torch.save({"gradmix": {}}, plain)
    with pytest.raises(ValueError, match=r"plain.pt"):
        mixer.load_checkpoint(plain)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match=r"notes.txt"):
        mixer.load_checkpoint(text)


def test_history_is_bounded():
    mixer = Mixer(make_domains(), "uniform", 12, log_every=1, history_size=5)
    for batch in mixer.batches(20):
        mixer.observe(batch["domain"], torch.ones(len(batch["domain"])))
        mixer.step()
    assert [r["step"] for r in mixer.history] == [16, 17, 18, 19, 20]


def test_observe_names_a_bad_domain_id():
    mixer = Mixer(make_domains(), "uniform", 12)
    with pytest.raises(ValueError, match=r"domain id 7 is outside 0..2"):
        mixer.observe(np.array([0, 7]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="one loss per example"):
        mixer.observe(np.array([0, 1]), np.array([1.0]))


def test_core_is_driven_without_a_mixer():
    """A loop that owns everything drives the core: plan, observe, end_step."""
    method = make_method("doremi", 3, reference_loss=[2.0, 2.0, 2.0])
    core = MixingCore(method, ["a", "b", "c"], batch_size=8, update_every=2, log_every=2)
    plans = []
    for step in range(4):
        plans.append(core.plan())
        losses = np.array([1.0, 3.0, 5.0] * 3 + [1.0, 3.0])[:8] + step
        core.observe(Measurement.from_losses(np.array([0, 1, 2] * 3)[:8], losses, 3))
        outcome = core.end_step(counts=np.array([3, 3, 2]))
    assert [p.step for p in plans] == [1, 2, 3, 4] and not any(p.measure for p in plans)
    assert outcome.record is not None and outcome.record["step"] == 4
    assert outcome.weights[2] > outcome.weights[0]  # DoReMi moves toward the domain with the highest excess loss
    state = core.state_dict()
    twin = MixingCore(
        make_method("doremi", 3, reference_loss=[2.0, 2.0, 2.0]),
        ["a", "b", "c"],
        batch_size=8,
        update_every=2,
        log_every=2,
    )
    twin.load_state_dict(state)
    np.testing.assert_array_equal(twin.weights, core.weights)
    with pytest.raises(ValueError, match="other domains"):
        MixingCore(make_method("doremi", 3, reference_loss=[2.0] * 3), ["a", "b", "x"], batch_size=8).load_state_dict(
            state
        )


def test_warnings_still_reach_the_user():
    with pytest.warns(MixingWarning, match="collapsed"):
        Mixer(make_domains(), "fixed", 12, method_params={"weights": [0.999, 0.0005, 0.0005]})
