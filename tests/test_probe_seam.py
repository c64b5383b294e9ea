"""The probe behind a caller's backward_fn (GradScaler, scaling backwards) and across accumulated micro-batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradmix.probe import GradientProbe
from test_probe import GROUPS, MLP, mlp_batch, mlp_loss, per_sample_gradients, plain_gradients, take


def flat_params(model):
    return [p for p in model.parameters()]


def run_probe(backward_fn=None, *, scale_grad=1.0, target=True):
    model = MLP()
    batch = mlp_batch(len(GROUPS), seed=1)
    expected = plain_gradients(model, mlp_loss, batch)
    probe = GradientProbe(model, num_splits=3, gram=True)
    result = probe.backward(
        batch,
        GROUPS,
        3,
        mlp_loss,
        measure=True,
        backward_fn=backward_fn,
        target_batch=mlp_batch(5, seed=2) if target else None,
    )
    for p, want in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, want * scale_grad, rtol=1e-5, atol=1e-6)
    return result


def test_scaling_backward_fn_gives_unscaled_statistics():
    plain = run_probe()
    calls = []

    def scaled_backward(loss):
        calls.append(1)
        (loss * 1024.0).backward()

    scaled = run_probe(scaled_backward, scale_grad=1024.0)
    assert len(calls) > 3  # every micro-pass and the target went through it
    for key in ("grad_sq_norm", "grad_var", "target_alignment"):
        np.testing.assert_allclose(getattr(scaled, key), getattr(plain, key), rtol=1e-4)
    np.testing.assert_allclose(scaled.gram, plain.gram, rtol=1e-4)
    np.testing.assert_allclose(scaled.loss, plain.loss, rtol=1e-6)


def test_real_grad_scaler_statistics_come_out_unscaled():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    assert scaler.is_enabled(), "this torch has a CPU GradScaler"
    plain = run_probe()
    scaled = run_probe(lambda loss: scaler.scale(loss).backward(), scale_grad=2.0**12)
    for key in ("grad_sq_norm", "grad_var", "target_alignment"):
        np.testing.assert_allclose(getattr(scaled, key), getattr(plain, key), rtol=1e-4)


def test_a_backward_fn_that_drops_the_graph_gives_nan_statistics_not_wrong_ones():
    def broken(loss):
        loss.detach()  # never calls backward: nothing is measured

    model = MLP()
    batch = mlp_batch(len(GROUPS), seed=1)
    result = GradientProbe(model).backward(batch, GROUPS, 3, mlp_loss, measure=True, backward_fn=broken)
    assert result is not None and result.grad_sq_norm is not None
    assert np.isnan(result.grad_sq_norm).all()


@pytest.mark.parametrize("measure", [False, True])
def test_accumulated_micro_batches_give_the_full_batch_gradient_and_pooled_losses(measure):
    model = MLP()
    batch = mlp_batch(len(GROUPS), seed=1)
    n = len(GROUPS)
    expected = plain_gradients(model, mlp_loss, batch)
    probe = GradientProbe(model)
    pieces = [torch.arange(0, 5), torch.arange(5, 9), torch.arange(9, n)]
    out = []
    for i, rows in enumerate(pieces):
        out.append(
            probe.backward(
                take(batch, rows, n),
                GROUPS[rows],
                3,
                mlp_loss,
                measure=measure,
                global_batch_size=n,
                final=i == len(pieces) - 1,
            )
        )
    assert out[0] is None and out[1] is None and not probe.accumulating
    for p, want in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-6)
    whole = GradientProbe(MLP()).backward(batch, GROUPS, 3, mlp_loss, measure=False)
    assert out[-1] is not None and whole is not None
    np.testing.assert_allclose(out[-1].loss, whole.loss, rtol=1e-6)
    np.testing.assert_array_equal(out[-1].examples, whole.examples)


def test_one_example_per_group_per_micro_batch_still_gives_unbiased_pooled_estimates():
    """4 micro-batches, each with exactly one example of groups 0 and 1 (and two of group 2): the estimates pool the
    single-example parts of all micro-batches (the U-statistic), which no single micro-batch could give."""
    groups = torch.tensor([0, 1, 2, 2] * 4)
    n = len(groups)
    model = MLP()
    batch = mlp_batch(n, seed=5)
    params = [p for p in model.parameters()]
    per_sample = per_sample_gradients(model, mlp_loss, batch, n, params)
    probe = GradientProbe(model)
    result = None
    for i in range(4):
        rows = torch.arange(4 * i, 4 * i + 4)
        result = probe.backward(
            take(batch, rows, n), groups[rows], 3, mlp_loss, measure=True, global_batch_size=n, final=i == 3
        )
    assert result is not None and result.grad_sq_norm is not None and result.grad_var is not None
    g = groups.numpy()
    for k in range(3):
        x = per_sample[g == k]
        m = len(x)
        total = x.sum(axis=0)
        sq = (total @ total - np.sum(x * x)) / (m * (m - 1))
        var = np.sum((x - x.mean(axis=0)) ** 2) / (m - 1)
        assert result.grad_sq_norm[k] == pytest.approx(sq, rel=1e-4)
        assert result.grad_var[k] == pytest.approx(var, rel=1e-4)


def test_accumulation_misuse_is_a_clear_error():
    model = MLP()
    batch = mlp_batch(len(GROUPS), seed=1)
    probe = GradientProbe(model)
    probe.backward(batch, GROUPS, 3, mlp_loss, measure=True, final=False)
    with pytest.raises(ValueError, match="cannot continue with measure=False"):
        probe.backward(batch, GROUPS, 3, mlp_loss, measure=False)
    probe.backward(batch, GROUPS, 3, mlp_loss, measure=True, final=False)
    with pytest.raises(ValueError, match="target_batch goes with the first micro-batch"):
        probe.backward(batch, GROUPS, 3, mlp_loss, measure=True, target_batch=mlp_batch(4, seed=3))
