"""GradientProbe against brute force: per-sample gradients from a loop of torch.autograd.grad calls, the estimator
formulas written out in closed form (the probe uses running Welford sums), and a Monte-Carlo unbiasedness check."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradmix.probe import GradientProbe, ProbeResult, select_parameters, split_indices
from gradmix.stats import DomainStats

torch.set_num_threads(1)


# -- two small real models ----------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.hidden = nn.Linear(4, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


def mlp_loss(model: nn.Module, batch) -> torch.Tensor:
    # "class_weight" (shape (3,)) and "label_smoothing" (a float) are not per-example: they must pass through.
    logits = model(batch["x"])
    return nn.functional.cross_entropy(
        logits, batch["y"], weight=batch["class_weight"], label_smoothing=batch["label_smoothing"], reduction="none"
    )


def mlp_batch(n: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(n, 4, generator=gen),
        "y": torch.randint(0, 3, (n,), generator=gen),
        "class_weight": torch.tensor([1.0, 2.0, 0.5]),
        "label_smoothing": 0.1,
    }


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 11, dim: int = 6, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


def lm_loss(model: nn.Module, batch) -> torch.Tensor:
    ids = batch["input_ids"]
    logits = model(ids[:, :-1])
    token_loss = nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return token_loss.mean(dim=1)


def lm_batch(n: int, seed: int, vocab: int = 11, length: int = 6) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab, (n, length + 1), generator=gen)}


MODELS = {"mlp": (MLP, mlp_loss, mlp_batch), "lm": (TinyLM, lm_loss, lm_batch)}


# -- brute force --------------------------------------------------------------------------------------------------


def take(batch: dict, rows, n: int) -> dict:
    rows = torch.as_tensor(rows, dtype=torch.long)
    return {
        key: (value[rows] if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == n else value)
        for key, value in batch.items()
    }


def per_sample_gradients(model, loss_fn, batch, n, params) -> np.ndarray:
    rows = []
    for i in range(n):
        loss = loss_fn(model, take(batch, [i], n)).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(
            torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
            .double()
            .numpy()
        )
    return np.stack(rows)


def per_sample_losses(model, loss_fn, batch, n) -> np.ndarray:
    with torch.no_grad():
        return np.array([float(loss_fn(model, take(batch, [i], n))[0]) for i in range(n)])


def brute_statistics(per_sample: np.ndarray, groups: np.ndarray, num_groups: int, num_splits: int):
    """Closed-form estimators over the documented split (contiguous, np.array_split of each group's positions)."""
    sq = np.full(num_groups, np.nan)
    var = np.full(num_groups, np.nan)
    means = np.full((num_groups, per_sample.shape[1]), np.nan)
    for k in range(num_groups):
        members = np.flatnonzero(groups == k)
        if members.size == 0:
            continue
        means[k] = per_sample[members].mean(axis=0)
        parts = np.array_split(members, min(num_splits, members.size))
        if len(parts) < 2:
            continue
        sizes = np.array([len(p) for p in parts], dtype=float)
        part_means = np.stack([per_sample[p].mean(axis=0) for p in parts])
        n = sizes.sum()
        cross = sum(
            sizes[i] * sizes[j] * part_means[i] @ part_means[j]
            for i in range(len(parts))
            for j in range(len(parts))
            if i != j
        )
        sq[k] = cross / (n**2 - (sizes**2).sum())
        var[k] = sum(sizes[i] * np.sum((part_means[i] - means[k]) ** 2) for i in range(len(parts))) / (len(parts) - 1)
    return sq, var, means


def plain_gradients(model, loss_fn, batch, divisor=None) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    losses = loss_fn(model, batch)
    (losses.sum() / (divisor or losses.shape[0])).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def assert_grads_close(model, expected, rtol=1e-5, atol=1e-6):
    for (name, p), want in zip(model.named_parameters(), expected):
        torch.testing.assert_close(p.grad, want, rtol=rtol, atol=atol, equal_nan=True, msg=f"gradient of {name}")


GROUPS = torch.tensor([0, 1, 0, 2, 1, 0, 0, 1, 2, 0, 1, 2, 0])  # sizes 6, 4, 3 (unequal parts for 2 and 4 splits)


# -- (a) the optimizer receives exactly the mixed batch's gradient ------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "lm"])
@pytest.mark.parametrize("measure", [False, True])
@pytest.mark.parametrize("preexisting", [False, True])
def test_gradient_equals_plain_backward(name, measure, preexisting):
    build, loss_fn, make_batch = MODELS[name]
    model = build()
    batch = make_batch(len(GROUPS), seed=1)
    expected = plain_gradients(model, loss_fn, batch)
    if preexisting:
        offsets = [torch.randn_like(p) for p in model.parameters()]
        for p, offset in zip(model.parameters(), offsets):
            p.grad = offset.clone()
        expected = [e + o for e, o in zip(expected, offsets)]
    probe = GradientProbe(model, num_splits=3, gram=True)
    result = probe.backward(
        batch, GROUPS, 3, loss_fn, measure=measure, target_batch=make_batch(5, seed=2) if measure else None
    )
    assert_grads_close(model, expected)
    assert isinstance(result, ProbeResult)


def test_global_batch_size_scales_to_the_full_batch_mean():
    model = MLP()
    batch = mlp_batch(len(GROUPS), seed=3)
    expected = plain_gradients(model, mlp_loss, batch, divisor=40)
    GradientProbe(model).backward(batch, GROUPS, 3, mlp_loss, measure=True, global_batch_size=40)
    assert_grads_close(model, expected)


def test_statistics_do_not_depend_on_preexisting_gradient():
    model = MLP()
    batch = mlp_batch(len(GROUPS), seed=4)
    probe = GradientProbe(model, num_splits=2)
    clean = probe.backward(batch, GROUPS, 3, mlp_loss, measure=True)
    for p in model.parameters():
        p.grad = 100.0 * torch.randn_like(p)
    dirty = probe.backward(batch, GROUPS, 3, mlp_loss, measure=True)
    assert clean is not None and dirty is not None
    assert clean.grad_sq_norm is not None and dirty.grad_sq_norm is not None
    assert clean.grad_var is not None and dirty.grad_var is not None
    np.testing.assert_allclose(dirty.grad_sq_norm, clean.grad_sq_norm, rtol=1e-3)
    np.testing.assert_allclose(dirty.grad_var, clean.grad_var, rtol=1e-3)


# -- (b) statistics equal the formulas on brute-force per-sample gradients -----------------------------------------


@pytest.mark.parametrize("name", ["mlp", "lm"])
@pytest.mark.parametrize("num_splits", [2, 4, 100])
def test_statistics_match_brute_force(name, num_splits):
    build, loss_fn, make_batch = MODELS[name]
    model = build()
    n = len(GROUPS)
    batch, target = make_batch(n, seed=5), make_batch(7, seed=6)
    params = list(model.parameters())
    per_sample = per_sample_gradients(model, loss_fn, batch, n, params)
    target_grad = per_sample_gradients(model, loss_fn, target, 7, params).mean(axis=0)
    losses = per_sample_losses(model, loss_fn, batch, n)
    groups = GROUPS.numpy()
    sq, var, means = brute_statistics(per_sample, groups, 3, num_splits)

    result = GradientProbe(model, num_splits=num_splits, gram=True).backward(
        batch, GROUPS, 3, loss_fn, measure=True, target_batch=target
    )
    assert result is not None and result.grad_sq_norm is not None and result.grad_var is not None
    assert result.gram is not None and result.target_alignment is not None

    np.testing.assert_array_equal(result.examples, [6, 4, 3])
    np.testing.assert_allclose(result.loss, [losses[groups == k].mean() for k in range(3)], rtol=1e-5)
    assert result.mean_loss == pytest.approx(losses.mean(), rel=1e-5)
    scale = np.abs(per_sample).max() ** 2
    np.testing.assert_allclose(result.grad_sq_norm, sq, rtol=1e-4, atol=1e-6 * scale)
    np.testing.assert_allclose(result.grad_var, var, rtol=1e-4, atol=1e-6 * scale)
    gram = means @ means.T
    np.fill_diagonal(gram, sq)
    np.testing.assert_allclose(result.gram, gram, rtol=1e-4, atol=1e-6 * scale)
    np.testing.assert_allclose(result.target_alignment, means @ target_grad, rtol=1e-4, atol=1e-6 * scale)
    assert result.target_loss == pytest.approx(per_sample_losses(model, loss_fn, target, 7).mean(), rel=1e-5)


def test_split_is_contiguous_and_balanced():
    parts = split_indices(torch.tensor([2, 0, 0, 2, 0, 0, 0]), 3, 2)
    assert [p.tolist() for p in parts[0]] == [[1, 2, 4], [5, 6]]
    assert parts[1] == []
    assert [p.tolist() for p in parts[2]] == [[0], [3]]


def test_plain_step_returns_losses_only():
    model = MLP()
    batch = mlp_batch(len(GROUPS), seed=7)
    losses = per_sample_losses(model, mlp_loss, batch, len(GROUPS))
    result = GradientProbe(model).backward(batch, GROUPS, 4, mlp_loss, measure=False)
    assert result is not None
    groups = GROUPS.numpy()
    np.testing.assert_allclose(result.loss[:3], [losses[groups == k].mean() for k in range(3)], rtol=1e-5)
    assert math.isnan(result.loss[3]) and result.examples.tolist() == [6, 4, 3, 0]
    assert result.grad_sq_norm is None and result.grad_var is None and result.gram is None
    stats = result.to_stats(step=12, batch_size=13)
    assert isinstance(stats, DomainStats) and stats.num_domains == 4 and stats.batch_size == 13


# -- (c) unbiasedness over a finite population ----------------------------------------------------------------------


def test_estimates_are_unbiased_and_naive_norm_is_not():
    """loss_j = <w, x_j> makes the per-sample gradient x_j itself, so a fixed set of rows is a finite population of
    per-sample gradients; batches drawn with replacement are i.i.d. draws from it."""
    dim, repeats = 6, 500
    rng = np.random.default_rng(0)
    populations = [rng.normal(0.4, 2.0, size=(30, dim)), rng.normal(-0.2, 1.0, size=(25, dim))]
    true_sq = [float(np.sum(pop.mean(axis=0) ** 2)) for pop in populations]
    true_var = [float(np.mean(np.sum((pop - pop.mean(axis=0)) ** 2, axis=1))) for pop in populations]
    sizes = [5, 4]  # 5 examples in 2 parts: unequal sizes 3 and 2
    groups = torch.tensor([0] * sizes[0] + [1] * sizes[1])

    model = nn.Linear(dim, 1, bias=False)

    def linear_loss(module, batch):
        return module(batch["x"]).squeeze(-1)

    for num_splits in (2, 3):
        probe = GradientProbe(model, num_splits=num_splits)
        sq, var, naive = [], [], []
        for _ in range(repeats):
            rows = [pop[rng.integers(0, len(pop), size)] for pop, size in zip(populations, sizes)]
            batch = {"x": torch.tensor(np.concatenate(rows), dtype=torch.float32)}
            model.zero_grad(set_to_none=True)
            result = probe.backward(batch, groups, 2, linear_loss, measure=True)
            assert result is not None
            sq.append(result.grad_sq_norm)
            var.append(result.grad_var)
            naive.append([np.sum(r.mean(axis=0) ** 2) for r in rows])
        for values, truth in ((np.array(sq), true_sq), (np.array(var), true_var)):
            error = np.abs(values.mean(axis=0) - truth)
            standard_error = values.std(axis=0, ddof=1) / math.sqrt(repeats)
            assert np.all(error < 4.0 * standard_error), (num_splits, values.mean(axis=0), truth, standard_error)
        naive_norms = np.array(naive)
        naive_se = naive_norms.std(axis=0, ddof=1) / math.sqrt(repeats)
        # E||g_batch||^2 = ||mu||^2 + sigma^2 / n: the naive estimate is biased upward by many standard errors.
        assert np.all(naive_norms.mean(axis=0) - true_sq > 8.0 * naive_se)
        np.testing.assert_allclose(naive_norms.mean(axis=0) - true_sq, np.array(true_var) / sizes, rtol=0.25)


# -- (d) degenerate groups --------------------------------------------------------------------------------------------


def test_absent_and_single_example_groups_are_nan_and_still_trained():
    model = MLP()
    groups = torch.tensor([0, 0, 0, 2, 0, 1, 1, 1, 0])  # group 2 has one example, group 3 none
    n = len(groups)
    batch, target = mlp_batch(n, seed=8), mlp_batch(4, seed=9)
    expected = plain_gradients(model, mlp_loss, batch)
    params = list(model.parameters())
    per_sample = per_sample_gradients(model, mlp_loss, batch, n, params)
    target_grad = per_sample_gradients(model, mlp_loss, target, 4, params).mean(axis=0)

    result = GradientProbe(model, gram=True).backward(batch, groups, 4, mlp_loss, measure=True, target_batch=target)
    assert result is not None and result.grad_sq_norm is not None and result.grad_var is not None
    assert result.gram is not None and result.target_alignment is not None

    assert_grads_close(model, expected)
    assert np.isnan(result.grad_sq_norm[2:]).all() and np.isnan(result.grad_var[2:]).all()
    assert np.isfinite(result.grad_sq_norm[:2]).all() and np.isfinite(result.grad_var[:2]).all()
    assert np.isnan(result.loss[3]) and np.isfinite(result.loss[:3]).all()
    # One example is enough for an (unbiased) alignment; an absent group has none.
    assert result.target_alignment[2] == pytest.approx(per_sample[3] @ target_grad, rel=1e-4)
    assert np.isnan(result.target_alignment[3])
    assert np.isnan(result.gram[3]).all() and np.isnan(result.gram[:, 3]).all()
    assert result.gram[0, 2] == pytest.approx(per_sample[groups.numpy() == 0].mean(axis=0) @ per_sample[3], rel=1e-4)


def masked_mlp_loss(model, batch):
    """NaN loss for flagged examples with a finite gradient (torch.where's NaN branch is a constant)."""
    losses = mlp_loss(model, batch)
    return torch.where(batch["bad"], torch.full_like(losses, float("nan")), losses)


@pytest.mark.parametrize("measure", [True, False])
def test_nan_loss_in_one_group_spares_the_others(measure):
    model = MLP()
    n = len(GROUPS)
    batch = mlp_batch(n, seed=10)
    batch["bad"] = GROUPS == 1
    expected = plain_gradients(model, masked_mlp_loss, batch)
    assert all(torch.isfinite(g).all() for g in expected)
    params = list(model.parameters())
    clean = dict(batch, bad=torch.zeros(n, dtype=torch.bool))
    sq, var, _ = brute_statistics(per_sample_gradients(model, mlp_loss, clean, n, params), GROUPS.numpy(), 3, 2)

    result = GradientProbe(model, num_splits=2).backward(batch, GROUPS, 3, masked_mlp_loss, measure=measure)
    assert result is not None

    assert_grads_close(model, expected)  # the training gradient is complete and finite
    assert np.isnan(result.loss[1]) and np.isfinite(result.loss[[0, 2]]).all() and math.isnan(result.mean_loss)
    if measure:
        assert result.grad_sq_norm is not None and result.grad_var is not None
        assert np.isnan(result.grad_sq_norm[1]) and np.isnan(result.grad_var[1])
        np.testing.assert_allclose(result.grad_sq_norm[[0, 2]], sq[[0, 2]], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(result.grad_var[[0, 2]], var[[0, 2]], rtol=1e-4, atol=1e-7)


def test_nan_gradient_does_not_raise_and_spares_the_other_groups():
    """NaN inputs in group 0 (processed first) give NaN loss and NaN gradients: that group's micro-batches are
    backwarded last so the other groups' gradient differences stay clean."""
    model = MLP()
    n = len(GROUPS)
    batch = mlp_batch(n, seed=11)
    params = list(model.parameters())
    sq, var, _ = brute_statistics(per_sample_gradients(model, mlp_loss, batch, n, params), GROUPS.numpy(), 3, 2)
    batch["x"][GROUPS == 0] = float("nan")
    expected = plain_gradients(model, mlp_loss, batch)
    assert not all(torch.isfinite(g).all() for g in expected)
    result = GradientProbe(model, gram=True).backward(batch, GROUPS, 3, mlp_loss, measure=True)
    assert result is not None and result.grad_sq_norm is not None and result.grad_var is not None
    assert result.gram is not None
    assert_grads_close(model, expected)
    assert np.isnan(result.grad_sq_norm[0]) and np.isnan(result.gram[0]).all()
    np.testing.assert_allclose(result.grad_sq_norm[1:], sq[1:], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(result.grad_var[1:], var[1:], rtol=1e-4, atol=1e-7)


# -- (e) parameter subsets --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected_names",
    [
        ("last:2", ["out.weight", "out.bias"]),
        (["hidden"], ["hidden.weight", "hidden.bias"]),
        (["out.weight", "hidden.bias"], ["hidden.bias", "out.weight"]),
        (lambda name, p: name.endswith("bias"), ["hidden.bias", "out.bias"]),
    ],
)
def test_parameter_subset_matches_brute_force(spec, expected_names):
    model = MLP()
    n = len(GROUPS)
    batch, target = mlp_batch(n, seed=12), mlp_batch(5, seed=13)
    expected = plain_gradients(model, mlp_loss, batch)
    named = dict(model.named_parameters())
    params = [named[name] for name in expected_names]
    per_sample = per_sample_gradients(model, mlp_loss, batch, n, params)
    target_grad = per_sample_gradients(model, mlp_loss, target, 5, params).mean(axis=0)
    sq, var, means = brute_statistics(per_sample, GROUPS.numpy(), 3, 2)

    probe = GradientProbe(model, parameters=spec)
    assert [name for name, _ in probe.named_parameters] == expected_names
    assert probe.num_probed == per_sample.shape[1]
    result = probe.backward(batch, GROUPS, 3, mlp_loss, measure=True, target_batch=target)
    assert result is not None and result.grad_sq_norm is not None and result.grad_var is not None
    assert result.target_alignment is not None

    assert_grads_close(model, expected)  # every parameter still gets its gradient
    np.testing.assert_allclose(result.grad_sq_norm, sq, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(result.grad_var, var, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(result.target_alignment, means @ target_grad, rtol=1e-4, atol=1e-8)


def test_parameter_spec_errors():
    model = MLP()
    with pytest.raises(ValueError, match="'decoder'"):
        select_parameters(model, ["decoder"])
    with pytest.raises(ValueError, match="'hid'"):
        select_parameters(model, ["hid"])  # a prefix matches whole dotted components only
    with pytest.raises(ValueError, match="last:N"):
        select_parameters(model, "first:2")
    with pytest.raises(ValueError, match="positive integer"):
        select_parameters(model, "last:0")
    with pytest.raises(ValueError, match="selects no trainable"):
        select_parameters(model, lambda name, p: False)
    model.hidden.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        select_parameters(model, ["hidden.weight"])


def test_input_errors():
    model = MLP()
    batch = mlp_batch(len(GROUPS), seed=14)
    with pytest.raises(ValueError, match="num_splits"):
        GradientProbe(model, num_splits=1)
    probe = GradientProbe(model)
    with pytest.raises(ValueError, match="id 3"):
        probe.backward(batch, torch.where(GROUPS == 2, 3, GROUPS), 3, mlp_loss, measure=True)
    with pytest.raises(ValueError, match="one loss per example"):
        probe.backward(batch, GROUPS, 3, lambda m, b: mlp_loss(m, b).mean(), measure=False)
    with pytest.raises(ValueError, match="leading dimension"):
        probe.backward(batch, GROUPS[:5], 3, mlp_loss, measure=True)


# -- (f) Adam-preconditioned alignment ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bias_correction", [True, False])
def test_adam_preconditioned_alignment_matches_brute_force(bias_correction):
    model = MLP()
    # out.bias is left out of the optimizer: it has no state and must stay unpreconditioned.
    optimizer = torch.optim.AdamW(
        [model.hidden.weight, model.hidden.bias, model.out.weight], lr=1e-2, betas=(0.9, 0.99)
    )
    for step in range(3):
        optimizer.zero_grad()
        mlp_loss(model, mlp_batch(8, seed=20 + step)).mean().backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    n = len(GROUPS)
    batch, target = mlp_batch(n, seed=15), mlp_batch(6, seed=16)
    params = list(model.parameters())
    per_sample = per_sample_gradients(model, mlp_loss, batch, n, params)
    target_grad = per_sample_gradients(model, mlp_loss, target, 6, params).mean(axis=0)
    eps = 1e-3
    scales = []
    for p in params:
        state = optimizer.state.get(p)
        if state:
            second = state["exp_avg_sq"].double().numpy().reshape(-1)
            if bias_correction:
                second = second / (1 - 0.99**3)
            scales.append(1.0 / (np.sqrt(second) + eps))
        else:
            scales.append(np.ones(p.numel()))
    preconditioned = target_grad * np.concatenate(scales)
    means = np.stack([per_sample[GROUPS.numpy() == k].mean(axis=0) for k in range(3)])

    probe = GradientProbe(model, preconditioner=optimizer, eps=eps, bias_correction=bias_correction)
    result = probe.backward(batch, GROUPS, 3, mlp_loss, measure=True, target_batch=target)
    assert result is not None and result.target_alignment is not None

    np.testing.assert_allclose(result.target_alignment, means @ preconditioned, rtol=1e-4)
    assert not np.allclose(means @ preconditioned, means @ target_grad, rtol=1e-2)  # the test can tell them apart
