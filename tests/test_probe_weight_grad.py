"""The fused probe's measuring step computes a Linear's weight gradient once (issue 20, item 3): from the per-example
blocks it materialises anyway (``gradmix.probe.reroute``), so autograd skips its own.

Checked here: ``.grad`` after a measuring step equals a plain step's to float rounding (float64 models: 1e-11) for
several layer types, with gradient accumulation, a loss divisor and a backward scale; the statistics still equal
brute-force per-example gradients in every per-layer form (explicit rows with examples alone / sharing a group, per
group sums, token Gram blocks); tied weights, frozen parameters, a layer called twice, functional reuse, an output
changed by another hook, bf16 autocast and activation checkpointing keep autograd's path where they must (said once);
and the cost model (``products.form_costs``): flops in one unit (checked against ``FlopCounterMode``), memory held
against ``chunk_bytes``, the 8192 x 256 LM head at K = 64 no longer in the Gram form."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from gradmix.probe import FusedGradientProbe
from gradmix.probe.products import (
    Grouping,
    add_gram_blocks,
    choose_form,
    example_blocks,
    example_norms,
    explicit_reductions,
    form_costs,
    group_row_blocks,
    weight_row_blocks,
)
from test_fused_probe import TinyTransformer, reference, tlm_batch
from test_probe import GROUPS, take
from test_probe_coverage import Encoder, gpt2, hf_lm_loss, ids_batch, llama, lm_loss

torch.set_num_threads(1)
LOGGER = "gradmix.probe.fused"


def plain_grads(model: nn.Module, loss_fn, batch, divisor: float | None = None) -> dict[str, torch.Tensor | None]:
    """``.grad`` of a plain step (mean loss over the batch, or sum / ``divisor``), from zero."""
    model.zero_grad(set_to_none=True)
    losses = loss_fn(model, batch)
    (losses.sum() / (divisor or losses.shape[0])).backward()
    out = {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def assert_grads(model: nn.Module, expected: dict[str, torch.Tensor | None], rtol: float = 1e-11) -> None:
    for name, p in model.named_parameters():
        want = expected[name]
        if want is None:
            assert p.grad is None, name
            continue
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, want, rtol=rtol, atol=rtol * 1e-2 * float(want.abs().max()), msg=name)


def assert_statistics(result, ref, rtol: float = 1e-8, atol: float = 1e-12) -> None:
    """Statistics against brute force (``atol`` relative to the largest squared per-example gradient entry)."""
    assert result is not None
    atol = atol * ref["scale"]
    np.testing.assert_allclose(result.grad_sq_norm, ref["sq"], rtol=rtol, atol=atol)
    np.testing.assert_allclose(result.grad_var, ref["var"], rtol=rtol, atol=atol)
    if result.gram is not None:
        np.testing.assert_allclose(result.gram, ref["gram"], rtol=rtol, atol=atol)
    if result.target_alignment is not None:
        np.testing.assert_allclose(result.target_alignment, ref["align"], rtol=rtol, atol=atol)


# -- models ---------------------------------------------------------------------------------------------------------


class SeqMLP(nn.Module):
    """Embedding -> Linear (bias) -> in-place ReLU -> Linear (no bias) -> head: a token model of Linear layers."""

    def __init__(self, vocab: int = 64, dim: int = 24, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim, bias=False)
        self.head = nn.Linear(dim, vocab)
        self.double()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.down(F.relu(self.up(h), inplace=True))
        return self.head(h)


class FeatureMLP(nn.Module):
    """Linear layers on feature vectors (one token per example): the Gram and per-group forms' home ground."""

    def __init__(self, width: int = 64, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.hidden = nn.Linear(8, width)
        self.mid = nn.Linear(width, width)
        self.out = nn.Linear(width, 3)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mid(torch.tanh(self.hidden(x)))))


def feature_loss(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def feature_batch(n: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 8, generator=gen, dtype=torch.float64), "y": torch.randint(0, 3, (n,), generator=gen)}


CASES: dict[str, tuple[Callable[[], nn.Module], Callable, Callable]] = {
    "seq_mlp": (SeqMLP, lm_loss, ids_batch),
    "gpt2_conv1d": (gpt2, hf_lm_loss, ids_batch),
    "llama": (llama, hf_lm_loss, ids_batch),
    "encoder_sequence_first": (lambda: Encoder(batch_first=False), lm_loss, ids_batch),
    "feature_mlp": (FeatureMLP, feature_loss, feature_batch),
}

GROUPINGS = {
    "shared": GROUPS,  # every group several examples
    "alone": torch.arange(len(GROUPS)),  # every example its own group
    "mixed": torch.tensor([0, 1, 2, 2, 3, 4, 5, 5, 5, 6, 7, 8, 9]),  # some alone, some shared
}


# -- .grad equals a plain step's; the statistics equal brute force ----------------------------------------------------


@pytest.mark.parametrize("grouping", list(GROUPINGS))
@pytest.mark.parametrize("case", list(CASES))
def test_grad_and_statistics_equal_a_plain_step_and_brute_force(case, grouping):
    build, loss_fn, make_batch = CASES[case]
    model = build()
    groups = GROUPINGS[grouping]
    k = int(groups.max()) + 1
    n = len(groups)
    batch, target = make_batch(n, 3), make_batch(5, 4)
    expected = plain_grads(model, loss_fn, batch)
    probe = FusedGradientProbe(model, gram=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2's position embedding: left out (said by the coverage tests)
        result = probe.backward(batch, groups, k, loss_fn, measure=True, target_batch=target)
    assert_grads(model, expected)
    params = [p for _, p in probe.named_parameters]
    ref = reference(model, loss_fn, batch, groups.numpy(), k, target, params)
    if case == "llama":  # LlamaRMSNorm computes in float32 even in a float64 model (see test_probe_coverage)
        assert_statistics(result, ref, rtol=2e-5, atol=1e-7)
    else:
        assert_statistics(result, ref)
    if case != "feature_mlp":  # token models: Linear layers take a form with rows and hand autograd their gradient
        assert any(form.endswith("+grad") for form in probe.layer_forms.values()), probe.layer_forms


def test_every_form_is_exercised_and_exact():
    """Across batch shapes the cost model picks each form for some Linear weight; each is exact and keeps .grad."""
    seen: set[str] = set()
    for n, k, width in ((13, 3, 64), (64, 1, 64), (48, 2, 96), (13, 13, 16)):
        model = FeatureMLP(width)
        groups = torch.arange(n) % k
        batch = feature_batch(n, n + k)
        expected = plain_grads(model, feature_loss, batch)
        probe = FusedGradientProbe(model)
        result = probe.backward(batch, groups, k, feature_loss, measure=True)
        assert_grads(model, expected)
        assert_statistics(result, reference(model, feature_loss, batch, groups.numpy(), k))
        seen |= {form for name, form in probe.layer_forms.items() if name.endswith("weight")}
    tokens = SeqMLP()
    probe = FusedGradientProbe(tokens)
    probe.backward(ids_batch(len(GROUPS), 5), GROUPS, 3, lm_loss, measure=True)
    seen |= set(probe.layer_forms.values())
    assert {"explicit+grad", "groups+grad", "gram"} <= seen, seen


@pytest.mark.parametrize("chunk_bytes", [1024, 64 * 1024 * 1024])
def test_weight_gradient_assembled_from_row_blocks(chunk_bytes):
    """Small row blocks (chunk_bytes=1024: one row at a time) assemble the same weight gradient."""
    model = SeqMLP()
    batch = ids_batch(len(GROUPS), 8)
    expected = plain_grads(model, lm_loss, batch)
    probe = FusedGradientProbe(model, chunk_bytes=chunk_bytes)
    result = probe.backward(batch, GROUPS, 3, lm_loss, measure=True)
    assert_grads(model, expected)
    assert_statistics(result, reference(model, lm_loss, batch, GROUPS.numpy(), 3))
    assert probe.layer_forms["head.weight"].endswith("+grad")


# -- accumulation, divisor, backward scale ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["seq_mlp", "gpt2_conv1d"])
def test_accumulation_divisor_and_backward_scale(case):
    """.grad accumulates onto what is there, over micro-batches (global_batch_size divisor), through a backward_fn
    that scales the loss (the probe's anchor reads the scale); the statistics pool exactly."""
    build, loss_fn, make_batch = CASES[case]
    model = build()
    n = len(GROUPS)
    batch = make_batch(n, 11)
    expected = plain_grads(model, loss_fn, batch, divisor=n)
    offsets = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.grad = offsets[name].clone()
    probe = FusedGradientProbe(model)

    def scaled(loss: torch.Tensor) -> None:
        (loss * 512.0).backward()

    pieces = [torch.arange(0, 5), torch.arange(5, 9), torch.arange(9, n)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, rows in enumerate(pieces):
            result = probe.backward(
                take(batch, rows, n),
                GROUPS[rows],
                3,
                loss_fn,
                measure=True,
                global_batch_size=n,
                backward_fn=scaled,
                final=i == len(pieces) - 1,
            )
    for name, p in model.named_parameters():
        want = expected[name]
        if want is None:
            continue
        target = offsets[name] + 512.0 * want
        torch.testing.assert_close(p.grad, target, rtol=1e-11, atol=1e-12 * float(target.abs().max()), msg=name)
    params = [p for _, p in probe.named_parameters]
    assert_statistics(result, reference(model, loss_fn, batch, GROUPS.numpy(), 3, None, params))


def test_grad_scaler_and_a_divisor_that_is_not_a_power_of_two():
    model = SeqMLP()
    batch = ids_batch(len(GROUPS), 12)
    expected = plain_grads(model, lm_loss, batch, divisor=37)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    probe = FusedGradientProbe(model)
    result = probe.backward(
        batch,
        GROUPS,
        3,
        lm_loss,
        measure=True,
        global_batch_size=37,
        backward_fn=lambda loss: scaler.scale(loss).backward(),
    )
    assert_grads(model, {name: None if g is None else g * 2.0**10 for name, g in expected.items()})
    assert_statistics(result, reference(model, lm_loss, batch, GROUPS.numpy(), 3))


# -- where autograd keeps the weight gradient -------------------------------------------------------------------------


def test_tied_weights_keep_autograds_path_and_say_so_once(caplog):
    model = TinyTransformer(tied=True).double()
    batch = tlm_batch(len(GROUPS), 2)
    expected = plain_grads(model, lm_loss, batch)
    probe = FusedGradientProbe(model)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        result = probe.backward(batch, GROUPS, 3, lm_loss, measure=True)
        probe.backward(batch, GROUPS, 3, lm_loss, measure=True)
    assert_grads(model, {name: 2 * g if g is not None else None for name, g in expected.items()})
    said = [r.getMessage() for r in caplog.records if "tied" in r.getMessage()]
    assert len(said) == 1 and "embed.weight" in said[0]
    assert not probe.layer_forms["embed.weight"].endswith("+grad")
    model.zero_grad(set_to_none=True)
    assert_statistics(result, reference(model, lm_loss, batch, GROUPS.numpy(), 3))


class Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(64, 12)
        self.a = nn.Linear(12, 12)  # weight frozen, bias trainable
        self.b = nn.Linear(12, 12)  # all frozen
        self.head = nn.Linear(12, 64)
        self.a.weight.requires_grad_(False)
        self.b.requires_grad_(False)
        self.double()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.b(torch.tanh(self.a(self.embed(ids))))))


def test_frozen_parameters():
    model = Frozen()
    batch = ids_batch(len(GROUPS), 6)
    expected = plain_grads(model, lm_loss, batch)
    probe = FusedGradientProbe(model)
    result = probe.backward(batch, GROUPS, 3, lm_loss, measure=True)
    assert_grads(model, expected)
    assert model.a.weight.grad is None and model.b.weight.grad is None
    params = [p for _, p in probe.named_parameters]
    assert [name for name, _ in probe.named_parameters] == ["embed.weight", "a.bias", "head.weight", "head.bias"]
    assert_statistics(result, reference(model, lm_loss, batch, GROUPS.numpy(), 3, None, params))
    assert probe.layer_forms["head.weight"].endswith("+grad")


class Twice(nn.Module):
    """One Linear called twice in a forward, another reused functionally (F.linear on its weight)."""

    def __init__(self, functional: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.functional = functional
        self.embed = nn.Embedding(64, 10)
        self.shared = nn.Linear(10, 10)
        self.head = nn.Linear(10, 64)
        self.double()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.shared(self.embed(ids)))
        h = self.shared(h) if not self.functional else F.linear(h, self.shared.weight)
        return self.head(torch.tanh(h))


def test_a_layer_called_twice_keeps_autograds_path(caplog):
    model = Twice()
    batch = ids_batch(len(GROUPS), 7)
    expected = plain_grads(model, lm_loss, batch)
    probe = FusedGradientProbe(model)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        result = probe.backward(batch, GROUPS, 3, lm_loss, measure=True)
    assert_grads(model, expected)
    assert any("called 2 times" in r.getMessage() and "shared.weight" in r.getMessage() for r in caplog.records)
    assert probe.layer_forms["shared.weight"] in ("explicit", "gram", "groups")
    assert_statistics(result, reference(model, lm_loss, batch, GROUPS.numpy(), 3))


def test_a_weight_also_used_functionally_is_skipped_and_its_grad_kept():
    model = Twice(functional=True)
    batch = ids_batch(len(GROUPS), 9)
    expected = plain_grads(model, lm_loss, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = FusedGradientProbe(model, uncovered="skip")
        result = probe.backward(batch, GROUPS, 3, lm_loss, measure=True)
    assert probe.skipped == ["shared.weight"]
    assert_grads(model, expected)
    params = [p for _, p in probe.named_parameters]
    assert_statistics(result, reference(model, lm_loss, batch, GROUPS.numpy(), 3, None, params))


def test_an_output_changed_by_another_forward_hook_keeps_autograds_path(caplog):
    model = SeqMLP()
    model.up.register_forward_hook(lambda module, args, output: output * 2.0)  # registered before the probe's
    batch = ids_batch(len(GROUPS), 10)
    expected = plain_grads(model, lm_loss, batch)
    probe = FusedGradientProbe(model)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        probe.backward(batch, GROUPS, 3, lm_loss, measure=True)
    assert_grads(model, expected)
    assert probe.layer_forms["up.weight"] in ("explicit", "gram", "groups")
    assert probe.layer_forms["head.weight"].endswith("+grad")
    assert any("up.weight" in r.getMessage() and "MulBackward0" in r.getMessage() for r in caplog.records)


def test_bf16_autocast_keeps_autograds_path(caplog):
    model = SeqMLP().float()

    def autocast_loss(model: nn.Module, batch) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return lm_loss(model, batch).float()

    batch = ids_batch(len(GROUPS), 13)
    expected = plain_grads(model, autocast_loss, batch)
    probe = FusedGradientProbe(model)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        result = probe.backward(batch, GROUPS, 3, autocast_loss, measure=True)
    for name, p in model.named_parameters():  # autograd's own path: the same bf16 matmuls, bit for bit
        want = expected[name]
        assert p.grad is not None and want is not None and torch.equal(p.grad, want), name
    assert result is not None and result.grad_sq_norm is not None and np.isfinite(result.grad_sq_norm).all()
    assert not any(form.endswith("+grad") for form in probe.layer_forms.values())
    assert sum("autocast" in r.getMessage() for r in caplog.records) == 1


def test_an_input_modified_in_place_before_the_backward_is_refused_as_autograd_refuses_it():
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Embedding(64, 8)
            self.lin = nn.Linear(8, 64)
            self.double()

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.embed(ids))
            out = self.lin(h)
            h.mul_(2.0)
            return out

    model = InPlace()
    batch = ids_batch(len(GROUPS), 14)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        lm_loss(model, batch).mean().backward()
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        FusedGradientProbe(model).backward(batch, GROUPS, 3, lm_loss, measure=True)


def test_activation_checkpointing():
    """HF gradient checkpointing (non-reentrant): the recomputation without hooks saves what the rerouted forward
    saved; .grad and the statistics equal the run without checkpointing."""
    model = llama()
    batch = ids_batch(len(GROUPS), 15)
    expected = plain_grads(model, hf_lm_loss, batch)
    plain = FusedGradientProbe(model).backward(batch, GROUPS, 3, hf_lm_loss, measure=True)
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation notes
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    checkpointed = FusedGradientProbe(model).backward(batch, GROUPS, 3, hf_lm_loss, measure=True)
    assert_grads(model, expected, rtol=1e-10)
    assert plain is not None and plain.grad_sq_norm is not None and plain.grad_var is not None
    assert checkpointed is not None and checkpointed.grad_sq_norm is not None and checkpointed.grad_var is not None
    np.testing.assert_allclose(checkpointed.grad_sq_norm, plain.grad_sq_norm, rtol=1e-9)
    np.testing.assert_allclose(checkpointed.grad_var, plain.grad_var, rtol=1e-9)


def test_reentrant_checkpointing_is_said_not_measured_silently():
    """Reentrant checkpointing runs the forward without autograd and recomputes it inside the backward, where the
    hooks cannot see it: the probe must not report statistics that silently leave those layers out. With
    ``uncovered="error"`` it names the cause; with ``"fallback"`` it says so and measures on the micro-batch path
    (which reads ``.grad`` and so sees the recomputed backward)."""
    model = llama()
    batch = ids_batch(len(GROUPS), 15)
    plain = FusedGradientProbe(model).backward(batch, GROUPS, 3, hf_lm_loss, measure=True)
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation notes
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    with pytest.raises((ValueError, RuntimeError), match="use_reentrant"):
        FusedGradientProbe(model, uncovered="error").backward(batch, GROUPS, 3, hf_lm_loss, measure=True)
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallen = FusedGradientProbe(model, uncovered="fallback").backward(batch, GROUPS, 3, hf_lm_loss, measure=True)
    assert any("use_reentrant" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert plain is not None and fallen is not None and fallen.grad_sq_norm is not None
    assert np.all(np.isfinite(fallen.grad_sq_norm))  # measured on the micro-batch path (its own estimator)


# -- the products: per-group sums and norms against brute force -------------------------------------------------------


def _terms(n: int, length: int, rows: int, cols: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, length, cols, generator=gen, dtype=torch.float64)
    g = torch.randn(n, length, rows, generator=gen, dtype=torch.float64)
    per = torch.einsum("ntr,ntc->nrc", g, a).reshape(n, -1)  # brute-force per-example gradients
    return [("linear", a, g)], per


@pytest.mark.parametrize("grouping", list(GROUPINGS))
@pytest.mark.parametrize("length", [1, 5])
def test_group_sums_norms_and_reductions_against_brute_force(grouping, length):
    groups = GROUPINGS[grouping]
    n, rows, cols = len(groups), 7, 6
    terms, per = _terms(n, length, rows, cols, seed=length)
    layout = Grouping(groups, torch.device("cpu"))
    sums = torch.zeros(layout.rows, rows * cols, dtype=torch.float64).index_add_(0, layout.slot, per)
    blocks = group_row_blocks(terms, layout, rows, cols, per.dtype, per.device, 200)  # several blocks of rows
    got = torch.cat([block.view(layout.rows, -1, cols) for block, _ in blocks], dim=1).reshape(layout.rows, -1)
    torch.testing.assert_close(got, sums[layout.row_slot])
    want = per.pow(2).sum(1)[layout.multi]
    for block_bytes in (64, 1 << 20):  # explicit rows (several blocks) and token Gram matrices
        norms = example_norms(terms, layout.multi, n, rows, cols, per.dtype, per.device, block_bytes)
        torch.testing.assert_close(norms, want)
    for every in (False, True):
        norms, got_sums, slots, total = explicit_reductions(per, layout, every, True)
        torch.testing.assert_close(norms, per.pow(2).sum(1))
        torch.testing.assert_close(got_sums, sums[slots])
        torch.testing.assert_close(total, per.sum(0))


def test_a_nan_example_never_leaks_into_another_groups_sum():
    groups = GROUPINGS["mixed"]
    _, per = _terms(len(groups), 3, 4, 5, seed=1)
    per[2] = float("nan")  # group 2 (shared with example 3)
    layout = Grouping(groups, torch.device("cpu"))
    for every in (False, True):
        _, sums, slots, _ = explicit_reductions(per, layout, every, True)
        poisoned = slots == int(layout.slot[2])
        assert torch.isnan(sums[poisoned]).all() and torch.isfinite(sums[~poisoned]).all()


# -- the cost model ----------------------------------------------------------------------------------------------------


def test_cost_model_counts_matmuls_as_flop_counter_does():
    """The model's matmul flops for the explicit rows and the Gram blocks are what torch's FlopCounterMode counts
    when the probe's code runs (both in flops: a multiply-add is 2)."""
    n, length, rows, cols = 12, 9, 40, 24
    groups = torch.arange(n) % 3
    terms, _ = _terms(n, length, rows, cols, seed=3)
    terms = [(kind, a.float(), g.float()) for kind, a, g in terms]
    blocks = example_blocks(groups, n, False, torch.device("cpu"))
    costs = form_costs(n, terms, rows, cols, blocks, False, 1 << 26, grouping=Grouping(groups, torch.device("cpu")))
    with FlopCounterMode(display=False) as explicit:
        for _ in weight_row_blocks(terms, n, rows, cols, torch.float32, torch.device("cpu"), 1 << 26):
            pass
    with FlopCounterMode(display=False) as gram:
        add_gram_blocks(torch.zeros(n + 1, n + 1, dtype=torch.float64), terms, blocks, torch.device("cpu"))
    assert costs["explicit"].matmul == explicit.get_total_flops() == 2 * n * length * rows * cols
    assert costs["gram"].matmul == gram.get_total_flops()


def test_lm_head_at_k64_is_not_put_in_the_gram_form():
    """8192 x 256 LM head, n = 16, T = 64, K = 64: the Gram form's gathered output gradients alone exceed
    chunk_bytes (the old model held only its token-pair products against it and counted its matmuls in
    multiply-adds, 2x too cheap: it picked it, +7% flops and +116 MB); with the weight gradient formed from the
    explicit rows, the explicit form is also the cheaper one in flops."""
    n, length, rows, cols = 16, 64, 8192, 256
    groups = torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(64))
    a = torch.zeros(n, length, cols)
    g = torch.zeros(n, length, rows)
    terms = [("linear", a, g)]
    blocks = example_blocks(groups, n, False, torch.device("cpu"))
    layout = Grouping(groups, torch.device("cpu"))
    chunk = 64 * 1024 * 1024
    for reroute in (False, True):
        costs = form_costs(n, terms, rows, cols, blocks, False, chunk, grouping=layout, weight_grad_from_blocks=reroute)
        assert costs["gram"].bytes > chunk > costs["explicit"].bytes
        assert choose_form(costs, chunk) != "gram"
        if not reroute:  # counted in multiply-adds, as before, the Gram form's matmuls looked cheaper
            assert costs["gram"].matmul / 2 < costs["explicit"].matmul
        else:
            assert costs["explicit"].flops < costs["gram"].flops
    # where it fits (a larger chunk_bytes) the Gram form is still chosen only when it costs fewer flops
    costs = form_costs(n, terms, rows, cols, blocks, False, 1 << 30, grouping=layout, weight_grad_from_blocks=True)
    assert choose_form(costs, 1 << 30) == min(costs, key=lambda form: costs[form].flops)
