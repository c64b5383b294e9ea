"""FusedGradientProbe (one forward + one backward, module hooks) against brute-force per-example gradients and against
the micro-batch GradientProbe with one example per part (num_splits >= n_k), which computes the same estimators."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradmix.distributed import exit_rank
from gradmix.probe import FusedGradientProbe, GradientProbe, fused_coverage
from gradmix.stats import Measurement
from test_probe import (
    GROUPS,
    MLP,
    TinyLM,
    lm_batch,
    lm_loss,
    mlp_batch,
    mlp_loss,
    per_sample_gradients,
    per_sample_losses,
    plain_gradients,
    take,
)

torch.set_num_threads(1)


# -- a tiny transformer-like LM: Embedding (padding row), LayerNorm, attention-like token mixing, MLP with an in-place
# ReLU on a Linear output, RMSNorm, a head (optionally tied to the embedding) ------------------------------------------


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 13, dim: int = 8, tied: bool = False, position: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.position = nn.Embedding(16, dim) if position else None
        self.norm1 = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)
        self.norm2 = nn.RMSNorm(dim) if hasattr(nn, "RMSNorm") else nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        if self.position is not None:
            x = x + self.position(torch.arange(ids.shape[1], device=ids.device))
        h = self.norm1(x)
        scores = self.query(h) @ h.transpose(1, 2) / math.sqrt(h.shape[-1])
        causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
        x = x + torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ h
        x = x + self.down(F.relu(self.up(x), inplace=True))
        return self.head(self.norm2(x))


def tlm_batch(n: int, seed: int, vocab: int = 13, length: int = 6) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length + 1), generator=gen)  # token 0 (padding) occurs
    return {"input_ids": ids}


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[..., torch.Tensor], Callable[..., dict]]] = {
    "mlp": (MLP, mlp_loss, mlp_batch),
    "lm": (TinyLM, lm_loss, lm_batch),
    "transformer": (TinyTransformer, lm_loss, tlm_batch),
    "transformer_tied": (lambda: TinyTransformer(tied=True), lm_loss, tlm_batch),
}


# -- reference formulas on brute-force per-example gradients ---------------------------------------------------------


def u_statistics(per_sample: np.ndarray, groups: np.ndarray, num_groups: int):
    """Per group: unbiased ||mu||^2 (mean <g_i, g_j> over pairs i != j), sigma^2 (ddof 1), the mean gradient."""
    sq = np.full(num_groups, np.nan)
    var = np.full(num_groups, np.nan)
    means = np.full((num_groups, per_sample.shape[1]), np.nan)
    for k in range(num_groups):
        x = per_sample[groups == k]
        m = len(x)
        if m == 0:
            continue
        means[k] = x.mean(axis=0)
        if m < 2:
            continue
        total = x.sum(axis=0)
        sq[k] = (total @ total - np.sum(x * x)) / (m * (m - 1))
        var[k] = np.sum((x - means[k]) ** 2) / (m - 1)
    return sq, var, means


def reference(model, loss_fn, batch, groups, num_groups, target=None, params=None):
    params = list(model.parameters()) if params is None else params
    n = len(groups)
    per_sample = per_sample_gradients(model, loss_fn, batch, n, params)
    sq, var, means = u_statistics(per_sample, np.asarray(groups), num_groups)
    gram = means @ means.T
    np.fill_diagonal(gram, sq)
    out = {
        "sq": sq,
        "var": var,
        "means": means,
        "gram": gram,
        "per_sample": per_sample,
        "scale": float(np.abs(per_sample).max() ** 2),
    }
    if target is not None:
        m = next(v.shape[0] for v in target.values() if isinstance(v, torch.Tensor))
        out["g_target"] = per_sample_gradients(model, loss_fn, target, m, params).mean(axis=0)
        out["align"] = means @ out["g_target"]
    return out


def assert_matches(result: Measurement | None, ref: dict, rtol=1e-4, gram=True, target=True):
    assert result is not None and result.grad_sq_norm is not None and result.grad_var is not None
    atol = 1e-6 * ref["scale"]
    np.testing.assert_allclose(result.grad_sq_norm, ref["sq"], rtol=rtol, atol=atol)
    np.testing.assert_allclose(result.grad_var, ref["var"], rtol=rtol, atol=atol)
    if gram:
        assert result.gram is not None
        np.testing.assert_allclose(result.gram, ref["gram"], rtol=rtol, atol=atol)
    if target:
        assert result.target_alignment is not None
        np.testing.assert_allclose(result.target_alignment, ref["align"], rtol=rtol, atol=atol)


def assert_grads_equal(model, expected, rtol=1e-5, atol=1e-6):
    for (name, p), want in zip(model.named_parameters(), expected):
        torch.testing.assert_close(p.grad, want, rtol=rtol, atol=atol, msg=f"gradient of {name}")


# -- (a) statistics equal brute force and the micro-batch probe with one example per part -----------------------------


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("with_target", [False, True])
def test_statistics_match_brute_force_and_micro_batch_probe(name, with_target):
    build, loss_fn, make_batch = MODELS[name]
    model = build()
    n = len(GROUPS)
    batch, target = make_batch(n, seed=5), (make_batch(7, seed=6) if with_target else None)
    ref = reference(model, loss_fn, batch, GROUPS.numpy(), 3, target)
    expected = plain_gradients(model, loss_fn, batch)

    probe = FusedGradientProbe(model, gram=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped, no fallback
        result = probe.backward(batch, GROUPS, 3, loss_fn, measure=True, target_batch=target)
    assert result is not None
    assert probe.fused and probe.skipped == [] and probe.num_probed == ref["per_sample"].shape[1]

    assert_grads_equal(model, expected)  # one backward of the mixed batch: .grad is the plain step's
    losses = per_sample_losses(model, loss_fn, batch, n)
    np.testing.assert_array_equal(result.examples, [6, 4, 3])
    np.testing.assert_allclose(result.loss, [losses[GROUPS.numpy() == k].mean() for k in range(3)], rtol=1e-5)
    assert_matches(result, ref, target=with_target)
    if with_target:
        assert result.target_loss == pytest.approx(per_sample_losses(model, loss_fn, target, 7).mean(), rel=1e-5)

    model.zero_grad(set_to_none=True)
    micro = GradientProbe(model, num_splits=100, gram=True).backward(
        batch, GROUPS, 3, loss_fn, measure=True, target_batch=target
    )
    atol = 1e-6 * ref["scale"]
    for key in ("grad_sq_norm", "grad_var", "gram") + (("target_alignment",) if with_target else ()):
        np.testing.assert_allclose(getattr(result, key), getattr(micro, key), rtol=1e-4, atol=atol, err_msg=key)


@pytest.mark.parametrize("gram_trick", [True, False])
@pytest.mark.parametrize("chunk_bytes", [64 * 1024 * 1024, 1024])
def test_gram_trick_and_explicit_blocks_agree(monkeypatch, gram_trick, chunk_bytes):
    """Both per-layer forms, and tiny row blocks (chunk_bytes=1024 splits every weight into many blocks), give the
    same statistics."""
    monkeypatch.setattr(FusedGradientProbe, "_use_gram", lambda self, *a, **k: gram_trick)
    for name in ("mlp", "transformer", "transformer_tied"):
        build, loss_fn, make_batch = MODELS[name]
        model = build()
        batch, target = make_batch(len(GROUPS), seed=21), make_batch(5, seed=22)
        ref = reference(model, loss_fn, batch, GROUPS.numpy(), 3, target)
        for gram in (True, False):  # Gram blocks over all examples / per group
            for with_target in (False, True):
                result = FusedGradientProbe(model, gram=gram, chunk_bytes=chunk_bytes).backward(
                    batch, GROUPS, 3, loss_fn, measure=True, target_batch=target if with_target else None
                )
                assert_matches(result, ref, target=with_target, gram=gram)


def test_preexisting_gradient_and_global_batch_size():
    model = TinyTransformer(tied=True)
    batch = tlm_batch(len(GROUPS), seed=3)
    ref = reference(model, lm_loss, batch, GROUPS.numpy(), 3)
    expected = plain_gradients(model, lm_loss, batch, divisor=40)
    offsets = [torch.randn_like(p) for p in model.parameters()]
    for p, offset in zip(model.parameters(), offsets):
        p.grad = offset.clone()
    result = FusedGradientProbe(model).backward(batch, GROUPS, 3, lm_loss, measure=True, global_batch_size=40)
    assert_grads_equal(model, [e + o for e, o in zip(expected, offsets)])
    assert_matches(result, ref, gram=False, target=False)


# -- (b) degenerate groups -------------------------------------------------------------------------------------------


def test_absent_and_single_example_groups():
    model = TinyTransformer()
    groups = torch.tensor([0, 0, 0, 2, 0, 1, 1, 1, 0])  # group 2 has one example, group 3 none
    n = len(groups)
    batch, target = tlm_batch(n, seed=8), tlm_batch(4, seed=9)
    ref = reference(model, lm_loss, batch, groups.numpy(), 4, target)
    expected = plain_gradients(model, lm_loss, batch)
    result = FusedGradientProbe(model, gram=True).backward(batch, groups, 4, lm_loss, measure=True, target_batch=target)
    assert result is not None and result.grad_sq_norm is not None and result.grad_var is not None
    assert result.gram is not None and result.target_alignment is not None
    assert_grads_equal(model, expected)
    assert np.isnan(result.grad_sq_norm[2:]).all() and np.isnan(result.grad_var[2:]).all()
    assert np.isnan(result.loss[3]) and result.examples.tolist() == [5, 3, 1, 0]
    assert result.target_alignment[2] == pytest.approx(ref["per_sample"][3] @ ref["g_target"], rel=1e-4)
    assert np.isnan(result.target_alignment[3])
    assert np.isnan(result.gram[3]).all() and np.isnan(result.gram[:, 3]).all()
    assert result.gram[0, 2] == pytest.approx(ref["gram"][0, 2], rel=1e-4)
    assert_matches(result, ref)  # NaN where the reference is NaN


def masked_loss(model, batch):
    losses = mlp_loss(model, batch)
    return torch.where(batch["bad"], torch.full_like(losses, float("nan")), losses)


def test_nan_loss_or_gradient_in_one_group_spares_the_others():
    model = MLP()
    n = len(GROUPS)
    batch = mlp_batch(n, seed=10)
    ref = reference(model, mlp_loss, batch, GROUPS.numpy(), 3)
    batch["bad"] = GROUPS == 1
    expected = plain_gradients(model, masked_loss, batch)
    result = FusedGradientProbe(model, gram=True).backward(batch, GROUPS, 3, masked_loss, measure=True)
    assert result is not None and result.grad_sq_norm is not None and result.grad_var is not None
    assert result.gram is not None
    assert_grads_equal(model, expected)
    assert np.isnan(result.grad_sq_norm[1]) and np.isnan(result.grad_var[1]) and np.isnan(result.gram[1]).all()
    np.testing.assert_allclose(result.grad_sq_norm[[0, 2]], ref["sq"][[0, 2]], rtol=1e-4)
    np.testing.assert_allclose(result.grad_var[[0, 2]], ref["var"][[0, 2]], rtol=1e-4)

    batch = mlp_batch(n, seed=11)
    ref = reference(model, mlp_loss, batch, GROUPS.numpy(), 3)
    batch["x"][GROUPS == 0] = float("nan")  # NaN activations and gradients for group 0's examples
    model.zero_grad(set_to_none=True)
    result = FusedGradientProbe(model, gram=True).backward(batch, GROUPS, 3, mlp_loss, measure=True)
    assert result is not None and result.grad_sq_norm is not None and result.gram is not None
    assert np.isnan(result.grad_sq_norm[0]) and np.isnan(result.gram[0]).all()
    np.testing.assert_allclose(result.grad_sq_norm[1:], ref["sq"][1:], rtol=1e-4)
    np.testing.assert_allclose(result.gram[1:, 1:], ref["gram"][1:, 1:], rtol=1e-4)


# -- (c) backward_fn and accumulation -------------------------------------------------------------------------------


def test_scaling_backward_fn_gives_unscaled_statistics_and_scaled_grad():
    model = TinyTransformer(tied=True)
    n = len(GROUPS)
    batch, target = tlm_batch(n, seed=1), tlm_batch(5, seed=2)
    ref = reference(model, lm_loss, batch, GROUPS.numpy(), 3, target)
    expected = plain_gradients(model, lm_loss, batch)
    calls = []

    def scaled_backward(loss):
        calls.append(1)
        (loss * 1024.0).backward()

    result = FusedGradientProbe(model, gram=True).backward(
        batch, GROUPS, 3, lm_loss, measure=True, target_batch=target, backward_fn=scaled_backward
    )
    assert len(calls) == 2  # the target and ONE backward of the mixed batch
    assert_grads_equal(model, [1024.0 * e for e in expected], rtol=1e-5, atol=1e-3)
    assert_matches(result, ref)


def test_real_grad_scaler_and_a_backward_fn_that_drops_the_graph():
    model = MLP()
    batch = mlp_batch(len(GROUPS), seed=1)
    ref = reference(model, mlp_loss, batch, GROUPS.numpy(), 3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    result = FusedGradientProbe(model).backward(
        batch, GROUPS, 3, mlp_loss, measure=True, backward_fn=lambda loss: scaler.scale(loss).backward()
    )
    assert_matches(result, ref, gram=False, target=False)
    broken = FusedGradientProbe(model).backward(batch, GROUPS, 3, mlp_loss, measure=True, backward_fn=lambda l: None)
    assert broken is not None and broken.grad_sq_norm is not None
    assert np.isnan(broken.grad_sq_norm).all() and np.isfinite(broken.loss).all()


@pytest.mark.parametrize("name", ["mlp", "transformer_tied"])
def test_accumulation_pools_exactly(name):
    """Three micro-batches (one with a single example of group 1) pool to the statistics of one call over the whole
    batch: the per-group sums carry the pairs across micro-batches."""
    build, loss_fn, make_batch = MODELS[name]
    model = build()
    n = len(GROUPS)
    batch, target = make_batch(n, seed=1), make_batch(5, seed=2)
    ref = reference(model, loss_fn, batch, GROUPS.numpy(), 3, target)
    expected = plain_gradients(model, loss_fn, batch)
    probe = FusedGradientProbe(model, gram=True)
    pieces = [torch.arange(0, 5), torch.arange(5, 9), torch.arange(9, n)]
    out = []
    for i, rows in enumerate(pieces):
        out.append(
            probe.backward(
                take(batch, rows, n),
                GROUPS[rows],
                3,
                loss_fn,
                measure=True,
                target_batch=target if i == 0 else None,
                global_batch_size=n,
                final=i == len(pieces) - 1,
            )
        )
        assert probe.accumulating == (i < len(pieces) - 1)
    assert out[0] is None and out[1] is None
    assert_grads_equal(model, expected)
    assert_matches(out[-1], ref)
    assert out[-1] is not None
    np.testing.assert_array_equal(out[-1].examples, [6, 4, 3])


def test_one_example_per_group_per_micro_batch():
    groups = torch.tensor([0, 1, 2, 2] * 4)
    n = len(groups)
    model = MLP()
    batch = mlp_batch(n, seed=5)
    ref = reference(model, mlp_loss, batch, groups.numpy(), 3)
    probe = FusedGradientProbe(model)
    for i in range(4):
        rows = torch.arange(4 * i, 4 * i + 4)
        result = probe.backward(
            take(batch, rows, n), groups[rows], 3, mlp_loss, measure=True, global_batch_size=n, final=i == 3
        )
    assert_matches(result, ref, gram=False, target=False)


def test_plain_steps_and_misuse():
    model = MLP()
    batch = mlp_batch(len(GROUPS), seed=7)
    probe = FusedGradientProbe(model)
    result = probe.backward(batch, GROUPS, 4, mlp_loss, measure=False)
    assert result is not None
    assert result.grad_sq_norm is None and result.examples.tolist() == [6, 4, 3, 0]
    probe.backward(batch, GROUPS, 3, mlp_loss, measure=True, final=False)
    with pytest.raises(ValueError, match="cannot continue with measure=False"):
        probe.backward(batch, GROUPS, 3, mlp_loss, measure=False)
    with pytest.raises(ValueError, match="target_batch goes with the first micro-batch"):
        probe.backward(batch, GROUPS, 3, mlp_loss, measure=True, target_batch=mlp_batch(4, seed=3))
    probe.reset()
    assert not probe.accumulating
    probe.backward(batch, GROUPS, 3, mlp_loss, measure=False, final=False)
    with pytest.raises(ValueError, match="cannot continue with measure=True"):
        probe.backward(batch, GROUPS, 3, mlp_loss, measure=True)
    probe.reset()
    with pytest.raises(ValueError, match="id 3"):
        probe.backward(batch, torch.where(GROUPS == 2, 3, GROUPS), 3, mlp_loss, measure=True)
    with pytest.raises(ValueError, match="uncovered must be"):
        FusedGradientProbe(model, uncovered="maybe")


def test_adam_preconditioned_alignment_equals_micro_batch_probe():
    model = TinyTransformer(tied=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(3):
        optimizer.zero_grad()
        lm_loss(model, tlm_batch(8, seed=20 + step)).mean().backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    batch, target = tlm_batch(len(GROUPS), seed=15), tlm_batch(6, seed=16)
    fused = FusedGradientProbe(model, preconditioner=optimizer, eps=1e-3).backward(
        batch, GROUPS, 3, lm_loss, measure=True, target_batch=target
    )
    model.zero_grad(set_to_none=True)
    micro = GradientProbe(model, preconditioner=optimizer, eps=1e-3).backward(
        batch, GROUPS, 3, lm_loss, measure=True, target_batch=target
    )
    assert fused is not None and fused.target_alignment is not None
    assert micro is not None and micro.target_alignment is not None
    np.testing.assert_allclose(fused.target_alignment, micro.target_alignment, rtol=1e-4)


# -- (d) coverage: what the hooks cannot see is skipped, falls back, or raises ---------------------------------------


def test_position_embedding_on_arange_is_skipped_and_the_rest_is_exact():
    model = TinyTransformer(position=True)
    batch = tlm_batch(6, seed=4)  # T = 6 = n: the leading dimension alone could not tell
    groups = torch.tensor([0, 1, 0, 1, 1, 0])
    with pytest.warns(UserWarning, match=r"position\.weight"):
        probe = FusedGradientProbe(model, uncovered="skip")
        result = probe.backward(batch, groups, 2, lm_loss, measure=True)
    assert probe.skipped == ["position.weight"]
    params = [p for name, p in model.named_parameters() if name != "position.weight"]
    ref = reference(model, lm_loss, batch, groups.numpy(), 2, params=params)
    assert_matches(result, ref, gram=False, target=False)
    # "auto" falls back here (position.weight is not a small share of this tiny model), as "fallback" does
    with pytest.warns(UserWarning, match="falling back"):  # here the share is not small: "auto" falls back
        assert FusedGradientProbe(model).backward(batch, groups, 2, lm_loss, measure=True) is not None
    model.zero_grad(set_to_none=True)
    expected = plain_gradients(model, lm_loss, batch)
    with pytest.warns(UserWarning, match="falling back"):
        fallback = FusedGradientProbe(model, uncovered="fallback", num_splits=100)
        result = fallback.backward(batch, groups, 2, lm_loss, measure=True)
    assert not fallback.fused
    assert_grads_equal(model, expected)  # the dropped fused forward left .grad alone
    ref = reference(model, lm_loss, batch, groups.numpy(), 2)
    assert_matches(result, ref, gram=False, target=False)
    with pytest.raises(RuntimeError, match=r"position\.weight"):
        FusedGradientProbe(model, uncovered="error").backward(batch, groups, 2, lm_loss, measure=True)


class FunctionalTie(nn.Module):
    """The output layer reads the embedding matrix with F.linear: no hooked module call sees that use."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(11, 6)
        self.mid = nn.Linear(6, 6)

    def forward(self, ids):
        return F.linear(torch.tanh(self.mid(self.embed(ids))), self.embed.weight)


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, 2.0 * self.weight, self.bias)


def test_uses_the_hooks_cannot_see_are_detected():
    model = FunctionalTie()
    batch = lm_batch(len(GROUPS), seed=3)
    with pytest.raises(RuntimeError, match=r"embed\.weight.*autograd graph"):
        FusedGradientProbe(model, uncovered="error").backward(batch, GROUPS, 3, lm_loss, measure=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = FusedGradientProbe(model, uncovered="skip")
        result = probe.backward(batch, GROUPS, 3, lm_loss, measure=True)
    assert probe.skipped == ["embed.weight"]
    ref = reference(model, lm_loss, batch, GROUPS.numpy(), 3, params=[model.mid.weight, model.mid.bias])
    assert_matches(result, ref, gram=False, target=False)

    custom = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), ScaledLinear(5, 3))
    covered, reasons = fused_coverage(custom)
    assert covered == ["0.weight", "0.bias"] and "overrides" in reasons["2.weight"]
    with pytest.raises(ValueError, match=r"2\.weight"):
        FusedGradientProbe(custom, uncovered="error")
    holder = nn.Module()
    holder.scale = nn.Parameter(torch.ones(3))
    holder.lin = nn.Linear(3, 3)
    assert fused_coverage(holder)[1] == {"scale": "held by an unsupported module (Module)"}
    with pytest.warns(UserWarning, match="falling back"):
        assert not FusedGradientProbe(holder, uncovered="auto").fused  # 3 of 15 scalars: too many to skip


def test_parameter_subset():
    model = TinyTransformer(tied=True)
    batch = tlm_batch(len(GROUPS), seed=12)
    probe = FusedGradientProbe(model, parameters=["up", "norm2"])
    assert [name for name, _ in probe.named_parameters] == ["up.weight", "up.bias", "norm2.weight"]
    params = [model.up.weight, model.up.bias, model.norm2.weight]
    ref = reference(model, lm_loss, batch, GROUPS.numpy(), 3, params=params)
    expected = plain_gradients(model, lm_loss, batch)
    result = probe.backward(batch, GROUPS, 3, lm_loss, measure=True)
    assert_grads_equal(model, expected)
    assert_matches(result, ref, gram=False, target=False)


def test_cost_is_one_forward_and_one_backward():
    """The number of forward passes of the model does not grow with the number of groups."""
    model = TinyTransformer()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    n = 24
    for k in (2, 12):
        calls.clear()
        groups = torch.arange(n) % k
        FusedGradientProbe(model).backward(tlm_batch(n, seed=k), groups, k, lm_loss, measure=True)
        assert calls == [n]


# -- (e) two processes ------------------------------------------------------------------------------------------------

WORLD = 2
DIST_GROUPS = np.array([0, 0, 1, 0, 2, 0, 0, 1, 1, 0, 2, 1])  # group 2: one example per rank; group 3 absent
SHARES = [slice(0, 7), slice(7, 12)]
TARGET_SHARES = [slice(0, 3), slice(3, 7)]


def _dist_batches():
    return tlm_batch(len(DIST_GROUPS), seed=42), tlm_batch(7, seed=43)


def _local(batch, rows):
    return {k: v[rows] for k, v in batch.items()}


def _dist_worker(rank: int, port: int, mode: str, out_dir: str) -> None:
    import datetime
    import os

    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        batch, target = _dist_batches()
        mine, my_target = _local(batch, SHARES[rank]), _local(target, TARGET_SHARES[rank])
        groups = torch.tensor(DIST_GROUPS[SHARES[rank]])
        outputs = {}
        for exact in (False, True):
            # A fresh model per pass: a second DDP wrapper over the same parameters would leave the first one's
            # reducer hooks firing with unfinished buckets, which aborts the process at exit.
            model = TinyTransformer(tied=True)
            wrapped: nn.Module
            if mode == "ddp":
                wrapped = nn.parallel.DistributedDataParallel(model)
                probe = FusedGradientProbe(wrapped, gram=exact, exact_global=exact)
            else:
                wrapped = model
                probe = FusedGradientProbe(model, gram=exact, exact_global=exact, sync_gradients=True)
            wrapped.zero_grad(set_to_none=True)
            result = probe.backward(
                mine, groups, 4, lm_loss, measure=True, target_batch=my_target, global_batch_size=len(DIST_GROUPS)
            )
            assert result is not None
            grads = []
            for p in model.parameters():
                assert p.grad is not None
                grads.append(p.grad.clone())
            outputs[exact] = {"result": result.__dict__, "grads": grads}
        torch.save(outputs, os.path.join(out_dir, f"rank{rank}.pt"))
        del wrapped, probe
    except BaseException:
        dist.destroy_process_group()
        raise
    exit_rank()  # a normal return can abort at interpreter exit under gloo (torch 2.13; docs/bad_inputs.md)


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["ddp", "sync"])
def test_two_processes_match_one_process(mode, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_dist_worker, args=(port, mode, str(tmp_path)), nprocs=WORLD, join=True)
    outputs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    model = TinyTransformer(tied=True)
    batch, target = _dist_batches()
    expected = plain_gradients(model, lm_loss, batch)
    one = FusedGradientProbe(model, gram=True).backward(
        batch, torch.tensor(DIST_GROUPS), 4, lm_loss, measure=True, target_batch=target
    )
    ref = reference(model, lm_loss, batch, DIST_GROUPS, 4, target)
    assert_matches(one, ref)
    assert one is not None and one.target_alignment is not None

    for exact in (False, True):
        first, second = (outputs[r][exact]["result"] for r in range(WORLD))
        for key, value in first.items():  # every rank returns the same measurement
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(value, second[key], err_msg=key)
        for r in range(WORLD):
            for got, want in zip(outputs[r][exact]["grads"], expected):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(first["examples"], [6, 4, 2, 0])
        np.testing.assert_allclose(first["loss"][:3], one.loss[:3], rtol=1e-6)
        np.testing.assert_allclose(first["target_alignment"], one.target_alignment, rtol=1e-4)  # exact either way
    exact = outputs[0][True]["result"]
    for key in ("grad_sq_norm", "grad_var", "gram"):  # all-reduced group sums: the one-process statistics
        np.testing.assert_allclose(exact[key], getattr(one, key), rtol=1e-4, atol=1e-6 * ref["scale"], err_msg=key)
    # default: per-rank U-statistics combined count-weighted over ranks with >= 2 examples of the group
    local = outputs[0][False]["result"]
    per_sample = ref["per_sample"]
    for k in range(4):
        parts = []
        for share in SHARES:
            g = DIST_GROUPS[share]
            sq, var, _ = u_statistics(per_sample[share], g, 4)
            if (g == k).sum() >= 2:
                parts.append(((g == k).sum(), sq[k], var[k]))
        if not parts:
            assert np.isnan(local["grad_sq_norm"][k]) and np.isnan(local["grad_var"][k])
            continue
        w = np.array([p[0] for p in parts], dtype=float)
        assert local["grad_sq_norm"][k] == pytest.approx(
            np.dot(w, [p[1] for p in parts]) / w.sum(), rel=1e-4, abs=1e-6 * ref["scale"]
        )
        assert local["grad_var"][k] == pytest.approx(np.dot(w, [p[2] for p in parts]) / w.sum(), rel=1e-4)
    assert np.isnan(local["grad_sq_norm"][2]) and np.isfinite(exact["grad_sq_norm"][2])


def test_make_probe_chooses_the_fused_probe_where_the_model_allows():
    from gradmix.probe import make_probe

    assert isinstance(make_probe(TinyTransformer(tied=True), gram=True), FusedGradientProbe)
    holder = nn.Module()
    holder.scale = nn.Parameter(torch.ones(3))
    holder.lin = nn.Linear(3, 3)
    with pytest.warns(UserWarning, match="make_probe: .*80.0%"):  # 20% of the scalars uncovered: said
        assert type(make_probe(holder, num_splits=3)) is GradientProbe
    assert type(make_probe(MLP(), fused=False)) is GradientProbe
    with pytest.raises(ValueError, match="fused probe only"):
        make_probe(MLP(), fused=False, exact_global=True)
