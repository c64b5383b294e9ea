"""Coverage of the fused probe beyond Linear / Embedding / LayerNorm / RMSNorm (issue 20, item 2): HF GPT-2's
``Conv1D``, ``nn.MultiheadAttention`` (``TransformerEncoder``, cross attention, separate projection weights),
``nn.Conv1d`` / ``nn.Conv2d`` (stride, padding, dilation, groups, padding modes), ``nn.GroupNorm``, LayerNorm /
RMSNorm look-alikes recognised by behaviour (HF ``LlamaRMSNorm``, a custom class, timm-style LayerNorm, a
channels-first LayerNorm, a learned scale), and ``BatchNorm`` (covered, with a warning that examples interact).

Every model runs in float64; the fused probe's statistics (``grad_sq_norm``, ``grad_var``, ``gram``,
``target_alignment``) are compared with brute-force per-example gradients (a loop of ``torch.autograd.grad`` over the
examples) and ``.grad`` after the measuring backward with a plain step's ``.grad`` (to float64 rounding: where the
probe forms a Linear's weight gradient from its per-example blocks the sum runs in another order)."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradmix.probe import FusedGradientProbe, GradientProbe, fused_coverage, make_probe
from test_fused_probe import reference
from test_probe import GROUPS, plain_gradients, take

torch.set_num_threads(1)
RTOL = 1e-8  # float64 models: the statistics agree with brute force to ~1e-12; cancellation in (Q - D) costs a few


def assert_grad_equal(got: torch.Tensor | None, want: torch.Tensor, name: str = "") -> None:
    """``.grad`` equals a plain step's to float64 rounding (the weight gradient formed from the per-example blocks
    adds the same products in another order)."""
    assert got is not None, name
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13 * float(want.abs().max()), msg=name)


def lm_loss(model, batch):
    ids = batch["input_ids"]
    logits = model(ids[:, :-1])
    logits = getattr(logits, "logits", logits)
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(dim=1)


def hf_lm_loss(model, batch):
    ids = batch["input_ids"]
    logits = model(input_ids=ids[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(dim=1)


def ids_batch(n, seed, vocab=64, length=7):
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab, (n, length + 1), generator=gen)}


def class_loss(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def image_batch(n, seed, shape=(3, 9, 9), classes=5):
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(n, *shape, generator=gen, dtype=torch.float64),
        "y": torch.randint(0, classes, (n,), generator=gen),
    }


# -- models -----------------------------------------------------------------------------------------------------------


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return GPT2LMHeadModel(config).double()


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).double()


class Encoder(nn.Module):
    """Embedding -> nn.TransformerEncoder (MultiheadAttention, LayerNorm, Linear) -> head."""

    def __init__(self, batch_first=True, dropout=0.0, vocab=64, dim=16, seed=0, norm_first=False):
        super().__init__()
        torch.manual_seed(seed)
        self.batch_first = batch_first
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(
            dim, 4, 32, dropout=dropout, batch_first=batch_first, norm_first=norm_first, dtype=torch.float64
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)
        self.double()

    def forward(self, ids):
        x = self.embed(ids)
        length = ids.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(length, dtype=x.dtype)
        if self.batch_first:
            return self.head(self.encoder(x, mask=causal, is_causal=True))
        return self.head(self.encoder(x.transpose(0, 1), mask=causal, is_causal=True).transpose(0, 1))


class CrossAttention(nn.Module):
    """Cross attention (queries from one sequence, keys = values from another), separate projection weights
    (kdim/vdim != embed_dim), a key padding mask, and a direct call with need_weights=True (the default)."""

    def __init__(self, seed=0, vocab=64, dim=12):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.memory = nn.Linear(dim, dim)
        self.keys = nn.Linear(dim, 10)
        self.cross = nn.MultiheadAttention(dim, 3, batch_first=True)
        self.separate = nn.MultiheadAttention(dim, 2, kdim=10, vdim=6, batch_first=False)
        self.values = nn.Linear(10, 6)
        self.three = nn.MultiheadAttention(dim, 2, batch_first=True, bias=False)
        self.head = nn.Linear(dim, vocab)
        self.double()

    def forward(self, ids):
        x = self.embed(ids)
        memory = torch.tanh(self.memory(x.flip(1)))
        padding = torch.zeros(ids.shape, dtype=torch.bool)
        padding[:, -1] = ids[:, 0] % 2 == 0  # some examples mask their last key
        h = x + self.cross(x, memory, memory, key_padding_mask=padding)[0]
        keys = self.keys(memory)
        values = self.values(keys)
        h = h + self.separate(h.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1))[0].transpose(0, 1)
        h = h + self.three(h, x, torch.tanh(h), need_weights=False)[0]
        return self.head(h)


class SmallCNN(nn.Module):
    """Conv2d (padding, stride, dilation, groups, 'same', reflect padding) + GroupNorm + Linear head."""

    def __init__(self, seed=0, classes=5):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm1 = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, dilation=2, groups=4, padding=2)
        self.norm2 = nn.GroupNorm(4, 8, affine=True)
        self.conv3 = nn.Conv2d(8, 6, (2, 3), padding="same", padding_mode="reflect", bias=False)
        self.depthwise = nn.Conv2d(6, 6, 3, groups=6, padding="valid")
        self.head = nn.Linear(6, classes)
        self.double()

    def forward(self, x):
        x = F.relu(self.norm1(self.conv1(x)))
        x = F.relu(self.norm2(self.conv2(x)))
        x = self.depthwise(torch.tanh(self.conv3(x)))
        return self.head(x.mean(dim=(2, 3)))


class Conv1dNet(nn.Module):
    def __init__(self, seed=0, classes=5):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv1d(4, 6, 3, padding=1, padding_mode="circular")
        self.conv2 = nn.Conv1d(6, 6, 4, stride=2, groups=3, padding="valid")
        self.conv3 = nn.Conv1d(6, 6, 2, padding="same", dilation=3)
        self.head = nn.Linear(6, classes)
        self.double()

    def forward(self, x):
        x = torch.tanh(self.conv1(x))
        x = torch.tanh(self.conv2(x))
        return self.head(self.conv3(x).amax(dim=2))


class Normaliser(nn.Module):
    """An RMSNorm that is not called RMSNorm (nor a subclass of anything): found by its behaviour."""

    def __init__(self, dim, epsilon=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.epsilon = epsilon

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.epsilon))


class GemmaStyle(nn.Module):
    """RMS normalisation times (1 + weight) (Gemma's form; Gemma computes it in float32, which the Llama test
    covers: here in the input's dtype, so that the layers before it keep float64 gradients)."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = 1e-6

    def forward(self, x):
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed * (1.0 + self.weight)


class TimmLayerNorm(nn.LayerNorm):
    """timm's LayerNorm: a subclass that overrides forward (the class test alone would reject it)."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class LayerNorm2d(nn.Module):
    """A channels-first LayerNorm (ConvNeXt): normalises over dimension 1, weight and bias per channel."""

    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))  # not named weight: not a candidate

    def forward(self, x):
        return x * self.gamma


class Scale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x):
        return x * self.weight


class NotANorm(nn.Module):
    """Weight of the right shape, but the output is not normalise(input) * weight: the behaviour test rejects it."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return torch.tanh(x) * self.weight


class NormZoo(nn.Module):
    """Every look-alike in one token model (plus a LayerNorm2d on a channels-first view)."""

    def __init__(self, seed=0, vocab=64, dim=8, bad=False):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.rms = Normaliser(dim)
        self.up = nn.Linear(dim, dim)
        self.gemma = GemmaStyle(dim)
        self.timm = TimmLayerNorm(dim)
        self.scale = Scale(dim)
        self.conv = nn.Conv2d(1, 2, 1)
        self.ln2d = LayerNorm2d(2)
        self.bad = NotANorm(dim) if bad else None
        self.head = nn.Linear(dim, vocab)
        self.double()
        with torch.no_grad():  # off their initial values, so that every parameter has a gradient to compare
            for p in self.parameters():
                if p.dim() == 1:
                    p.add_(0.1 * torch.randn_like(p))

    def forward(self, ids):
        x = self.rms(self.embed(ids))
        x = self.gemma(x + torch.tanh(self.up(x)))
        x = self.scale(self.timm(x))
        image = self.ln2d(self.conv(x[:, None]))  # (n, 2, T, dim)
        x = x + image.mean(1)
        if self.bad is not None:
            x = self.bad(x)
        return self.head(x)


class BatchNormNet(nn.Module):
    def __init__(self, seed=0, classes=5):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 6)
        self.bn1d = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, classes)
        self.double()

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.head(torch.tanh(self.bn1d(self.fc(x))))


# -- the comparison -------------------------------------------------------------------------------------------------


def errors(result, ref, target):
    """max abs and max relative error of each statistic against brute force."""
    out = {}
    keys = [("grad_sq_norm", "sq"), ("grad_var", "var"), ("gram", "gram")] + (
        [("target_alignment", "align")] if target else []
    )
    for key, name in keys:
        got, want = np.asarray(getattr(result, key)), np.asarray(ref[name])
        finite = np.isfinite(want)
        assert np.array_equal(finite, np.isfinite(got)), key
        diff = np.abs(got[finite] - want[finite])
        out[key] = (float(diff.max()), float((diff / np.maximum(np.abs(want[finite]), 1e-300)).max()))
    return out


def measure_and_compare(model, loss_fn, batch, target=None, skipped=(), groups=GROUPS, k=3, rtol=RTOL, **params):
    """The fused probe on ``model`` vs brute force; returns (probe, {statistic: (max abs, max rel) error})."""
    expected = plain_gradients(model, loss_fn, batch)
    probe = FusedGradientProbe(model, gram=True, **params)
    result = probe.backward(batch, groups, k, loss_fn, measure=True, target_batch=target)
    assert probe.fused and sorted(probe.skipped) == sorted(skipped), probe.skip_reasons
    for (name, p), want in zip(model.named_parameters(), expected):  # one backward of the batch: the plain .grad
        assert_grad_equal(p.grad, want, name)
    params_probed = [p for _, p in probe.named_parameters]
    ref = reference(model, loss_fn, batch, groups.numpy(), k, target, params_probed)
    assert result is not None and probe.num_probed == ref["per_sample"].shape[1]
    assert result.grad_sq_norm is not None and result.grad_var is not None and result.gram is not None
    atol = 1e-12 * ref["scale"]
    np.testing.assert_allclose(result.grad_sq_norm, ref["sq"], rtol=rtol, atol=atol)
    np.testing.assert_allclose(result.grad_var, ref["var"], rtol=rtol, atol=atol)
    np.testing.assert_allclose(result.gram, ref["gram"], rtol=rtol, atol=atol)
    if target is not None:
        assert result.target_alignment is not None
        np.testing.assert_allclose(result.target_alignment, ref["align"], rtol=rtol, atol=atol)
    return probe, errors(result, ref, target is not None)


# -- (a) exact statistics per newly covered layer type ----------------------------------------------------------------


@pytest.mark.parametrize("with_target", [False, True])
def test_gpt2_conv1d(with_target, caplog):
    model = gpt2()
    batch, target = ids_batch(len(GROUPS), 1), (ids_batch(5, 2) if with_target else None)
    assert fused_coverage(model)[1] == {}  # every Conv1D weight and bias is covered statically
    # wpe is called on position ids of shape (1, T): no per-example factor; a small share, skipped and logged (the
    # default's own choice: no warning)
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="gradmix.probe.fused"):
        warnings.simplefilter("error")
        probe, _ = measure_and_compare(model, hf_lm_loss, batch, target, skipped=["transformer.wpe.weight"])
    assert any("transformer.wpe.weight" in record.getMessage() for record in caplog.records)
    report = probe.coverage_report
    assert report["mode"] == "fused" and report["uncovered"][0]["parameters"] == ["transformer.wpe.weight"]
    assert report["hook_coverage"] == pytest.approx(1 - model.transformer.wpe.weight.numel() / probe._selected_numel)


def test_llama_rmsnorm_by_behaviour():
    """LlamaRMSNorm normalises in float32 even in a float64 model (and so do its gradients): the batch and the
    one-example brute force then differ by float32 roundings wherever a gradient has passed through a norm, so the
    whole model agrees to ~1e-6; the final norm and the head, which no cast separates from the loss, agree to 1e-12
    (and the behaviour test found the float32 normalisation the module computes)."""
    model = llama()
    batch, target = ids_batch(len(GROUPS), 3), ids_batch(4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything covered, nothing said
        probe, _ = measure_and_compare(model, hf_lm_loss, batch, target, rtol=2e-5)
        model.zero_grad(set_to_none=True)
        measure_and_compare(model, hf_lm_loss, batch, target, parameters=["model.norm", "lm_head"])
    norms = [name for name, _ in probe.named_parameters if "norm" in name]
    assert len(norms) == 5 and probe.coverage_report["hook_coverage"] == 1.0


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_multihead_attention(batch_first, norm_first):
    model = Encoder(batch_first=batch_first, norm_first=norm_first)
    batch, target = ids_batch(len(GROUPS), 5), ids_batch(6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probe, _ = measure_and_compare(model, lm_loss, batch, target)
    assert any("in_proj_weight" in name for name, _ in probe.named_parameters)
    assert any("out_proj.weight" in name for name, _ in probe.named_parameters)


def test_cross_attention_separate_weights_and_masks():
    model = CrossAttention()
    batch, target = ids_batch(len(GROUPS), 7), ids_batch(5, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        measure_and_compare(model, lm_loss, batch, target)
    names = [name for name, _ in model.named_parameters()]
    assert "separate.q_proj_weight" in names and "separate.v_proj_weight" in names


def test_attention_dropout_is_replayed():
    """With dropout the per-example gradients cannot be brute-forced example by example (other masks), but their
    sum is the batch gradient: sum_kj <S_k, S_j> (from grad_sq_norm, grad_var and the Gramian) = ||n .grad||^2.
    A recomputation with other dropout masks breaks it; .grad equals a plain step's with the same seed."""
    model = Encoder(dropout=0.3)
    batch = ids_batch(len(GROUPS), 9)
    torch.manual_seed(123)
    expected = plain_gradients(model, lm_loss, batch)
    after_plain = torch.rand(3)
    probe = FusedGradientProbe(model, gram=True)
    torch.manual_seed(123)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = probe.backward(batch, GROUPS, 3, lm_loss, measure=True)
    assert torch.equal(torch.rand(3), after_plain)  # the RNG stream continues as after a plain step
    total = 0.0
    for p, want in zip(model.parameters(), expected):
        assert_grad_equal(p.grad, want)
        assert p.grad is not None
        total += float(p.grad.pow(2).sum()) * len(GROUPS) ** 2
    assert result is not None and result.gram is not None
    assert result.grad_sq_norm is not None and result.grad_var is not None
    counts = np.asarray(result.examples, dtype=float)
    cross = result.gram * np.outer(counts, counts)
    np.fill_diagonal(cross, counts**2 * result.grad_sq_norm + counts * result.grad_var)
    assert cross.sum() == pytest.approx(total, rel=1e-9)


def test_cnn_conv2d_and_groupnorm():
    model = SmallCNN()
    batch, target = image_batch(len(GROUPS), 11), image_batch(5, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probe, _ = measure_and_compare(model, class_loss, batch, target)
    assert probe.coverage_report["hook_coverage"] == 1.0


@pytest.mark.parametrize("chunk_bytes", [1024, 64 * 1024 * 1024])
def test_conv1d_and_small_row_blocks(chunk_bytes):
    model = Conv1dNet()
    batch, target = image_batch(len(GROUPS), 13, shape=(4, 11)), image_batch(5, 14, shape=(4, 11))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message="Using padding='same' with even kernel")  # torch's, asymmetric
        measure_and_compare(model, class_loss, batch, target, chunk_bytes=chunk_bytes)


def test_conv3d_and_transposed_convolutions_are_said():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(2, 4, (2, 3, 3), padding=(1, 0, 1), groups=2), nn.Tanh(), nn.Flatten(), nn.LazyLinear(5)
    ).double()
    batch = image_batch(len(GROUPS), 25, shape=(2, 3, 4, 5))
    model(batch["x"])  # materialise the lazy layer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        measure_and_compare(model, class_loss, batch, image_batch(4, 26, shape=(2, 3, 4, 5)))
    transposed = nn.Sequential(nn.ConvTranspose2d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 11 * 11, 5))
    assert fused_coverage(transposed)[1] == {
        "0.weight": "held by an unsupported module (ConvTranspose2d)",
        "0.bias": "held by an unsupported module (ConvTranspose2d)",
    }


def test_norm_look_alikes_by_behaviour():
    model = NormZoo()
    covered, reasons = fused_coverage(model)
    assert reasons == {} and "rms.weight" in covered and "ln2d.bias" in covered
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probe = measure_and_compare(model, lm_loss, ids_batch(len(GROUPS), 15), ids_batch(4, 16))[0]
    forms = {name: probe._affine_forms[id(getattr(model, name))] for name in ("rms", "gemma", "timm", "scale", "ln2d")}
    assert forms == {
        "rms": ("last", "rms", 0),
        "gemma": ("last", "rms", 1),
        "timm": ("last", "ln", 0),
        "scale": ("last", "identity", 0),
        "ln2d": ("channels", "ln", 0),
    }
    holder = nn.Sequential(nn.Linear(3, 3), LayerScale(3))  # "gamma": not a candidate, said with its reason
    assert fused_coverage(holder)[1] == {"1.gamma": "held by an unsupported module (LayerScale)"}


def test_a_look_alike_that_is_not_a_norm_is_dropped_once():
    model = NormZoo(bad=True)
    batch = ids_batch(len(GROUPS), 17)
    assert "bad.weight" in fused_coverage(model)[0]  # structurally a candidate
    probe = FusedGradientProbe(model, uncovered="skip")
    with pytest.warns(UserWarning, match=r"bad\.weight: its NotANorm's output is not"):
        probe.backward(batch, GROUPS, 3, lm_loss, measure=True)
    assert probe.skipped == ["bad.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        probe.backward(batch, GROUPS, 3, lm_loss, measure=True)
    model.zero_grad(set_to_none=True)
    with pytest.warns(UserWarning):
        measure_and_compare(model, lm_loss, batch, skipped=["bad.weight"], uncovered="skip")


class CloningScale(nn.Module):
    """x * weight on a copy of x: autograd keeps the copy, so an in-place change of x afterwards goes unnoticed."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x):
        return x.clone() * self.weight


def test_an_input_modified_in_place_before_the_backward_poisons_the_statistics():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Embedding(64, 6)
            self.scale = CloningScale(6)
            self.head = nn.Linear(6, 64)
            self.double()

        def forward(self, ids):
            h = self.embed(ids)
            y = self.scale(h)
            h.mul_(2.0)  # the scale's input changes after its call
            return self.head(y + h)

    model = Model()
    batch = ids_batch(len(GROUPS), 27)
    expected = plain_gradients(model, lm_loss, batch)
    with pytest.warns(UserWarning, match="CloningScale was modified in place"):
        result = FusedGradientProbe(model).backward(batch, GROUPS, 3, lm_loss, measure=True)
    assert result is not None and result.grad_sq_norm is not None and np.isnan(result.grad_sq_norm).all()
    assert np.isfinite(result.loss).all()
    for p, want in zip(model.parameters(), expected):
        assert_grad_equal(p.grad, want)


def test_batchnorm_is_covered_with_a_warning_once():
    model = BatchNormNet()
    batch = image_batch(len(GROUPS), 19)
    probe = make_probe(model, gram=True)
    assert isinstance(probe, FusedGradientProbe)
    expected = plain_gradients(model, class_loss, batch)
    with pytest.warns(UserWarning, match=r"batch normalisation layer\(s\) \(bn, bn1d\).*biased"):
        result = probe.backward(batch, GROUPS, 3, class_loss, measure=True)
    assert result is not None and result.grad_sq_norm is not None and np.isfinite(result.grad_sq_norm).all()
    for p, want in zip(model.parameters(), expected):  # one forward of the whole batch: the same batch statistics
        torch.testing.assert_close(p.grad, want, rtol=1e-12, atol=1e-14)
    assert probe.coverage_report["hook_coverage"] == 1.0 and "biased" in probe.coverage_report["notes"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        probe.backward(batch, GROUPS, 3, class_loss, measure=True)
    # the micro-batch probe splits the batch, so its BatchNorm sees other statistics: said once as well
    micro, halves = GradientProbe(model), torch.arange(len(GROUPS)) % 2  # parts of >= 2 examples (BatchNorm1d)
    with pytest.warns(UserWarning, match="GradientProbe: .*batch normalisation"):
        micro.backward(batch, halves, 2, class_loss, measure=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        micro.backward(batch, halves, 2, class_loss, measure=True)


def test_batchnorm_in_eval_mode_is_exact_and_silent():
    model = BatchNormNet()
    with torch.no_grad():
        for bn in (model.bn, model.bn1d):
            assert bn.running_mean is not None and bn.running_var is not None
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    batch, target = image_batch(len(GROUPS), 21), image_batch(4, 22)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        measure_and_compare(model, class_loss, batch, target)


@pytest.mark.parametrize("name", ["cnn", "encoder_seq_first", "gpt2", "cross"])
def test_accumulation_and_a_scaling_backward_fn(name):
    """Three micro-batches pooled into one measurement (per-group sums over the covered parameters, the explicit
    per-example path of every layer type) through a backward_fn that scales the loss: the statistics of one call
    over the whole batch, unscaled."""
    cases: dict[str, tuple[Callable[[], nn.Module], Callable[..., torch.Tensor], Callable[..., dict]]] = {
        "cnn": (SmallCNN, class_loss, image_batch),
        "encoder_seq_first": (lambda: Encoder(batch_first=False), lm_loss, ids_batch),
        "gpt2": (gpt2, hf_lm_loss, ids_batch),
        "cross": (CrossAttention, lm_loss, ids_batch),
    }
    build, loss_fn, make_batch = cases[name]
    model = build()
    n = len(GROUPS)
    batch, target = make_batch(n, 31), make_batch(5, 32)
    expected = plain_gradients(model, loss_fn, batch)
    probe = FusedGradientProbe(model, gram=True, uncovered="skip")
    pieces = [torch.arange(0, 5), torch.arange(5, 9), torch.arange(9, n)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2's position embedding is skipped (said in test_gpt2_conv1d)
        for i, rows in enumerate(pieces):
            result = probe.backward(
                take(batch, rows, n),
                GROUPS[rows],
                3,
                loss_fn,
                measure=True,
                target_batch=target if i == 0 else None,
                global_batch_size=n,
                final=i == len(pieces) - 1,
                backward_fn=lambda loss: (loss * 512.0).backward(),
            )
    for p, want in zip(model.parameters(), expected):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, 512.0 * want, rtol=1e-10, atol=1e-12)
    ref = reference(model, loss_fn, batch, GROUPS.numpy(), 3, target, [p for _, p in probe.named_parameters])
    assert result is not None and result.grad_sq_norm is not None and result.grad_var is not None
    assert result.gram is not None and result.target_alignment is not None
    atol = 1e-12 * ref["scale"]
    np.testing.assert_allclose(result.grad_sq_norm, ref["sq"], rtol=RTOL, atol=atol)
    np.testing.assert_allclose(result.grad_var, ref["var"], rtol=RTOL, atol=atol)
    np.testing.assert_allclose(result.gram, ref["gram"], rtol=RTOL, atol=atol)
    np.testing.assert_allclose(result.target_alignment, ref["align"], rtol=RTOL, atol=atol)


# -- (b) make_probe picks the fused path; every fallback or skip is said once and recorded -------------------------


def test_make_probe_takes_the_fused_path_for_gpt2_encoder_and_cnn():
    for model in (gpt2(), Encoder(), Encoder(batch_first=False), SmallCNN(), Conv1dNet(), llama(), NormZoo()):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # statically everything is covered: nothing to say at construction
            probe = make_probe(model)
        assert isinstance(probe, FusedGradientProbe), type(model).__name__
        assert probe.coverage_report["hook_coverage"] == 1.0


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(x) * self.scale


def test_make_probe_fallback_is_said_and_recorded():
    with pytest.warns(UserWarning, match=r"make_probe: .*held by an unsupported module \(Holder\).*scale"):
        probe = make_probe(Holder())
    assert type(probe) is GradientProbe
    report = probe.coverage_report
    assert report["probe"] == "GradientProbe" and report["mode"] == "micro_fallback"
    assert report["hook_coverage"] == pytest.approx(12 / 15) and report["measured_fraction"] == 1.0
    assert report["uncovered"] == [
        {"reason": "held by an unsupported module (Holder)", "tensors": 1, "scalars": 3, "parameters": ["scale"]}
    ]
    json.dumps(report)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for: nothing to say
        micro = make_probe(Holder(), fused=False)
        assert isinstance(micro, GradientProbe) and micro.coverage_report["mode"] == "micro"


def test_attention_weights_in_the_loss_are_detected():
    class UsesWeights(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Embedding(64, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 64)
            self.double()

        def forward(self, ids):
            x = self.embed(ids)
            out, weights = self.attn(x, x, x)
            return self.head(out + weights.sum(-1, keepdim=True))

    model = UsesWeights()
    with pytest.warns(UserWarning, match="falling back.*attention weights"):  # "auto": too large a share to skip
        probe = FusedGradientProbe(model)
        probe.backward(ids_batch(len(GROUPS), 23), GROUPS, 3, lm_loss, measure=True)
    assert not probe.fused and probe.coverage_report["mode"] == "fused_fallback"
    with pytest.raises(RuntimeError, match="attention weights"):
        probe = FusedGradientProbe(model, uncovered="error")
        probe.backward(ids_batch(len(GROUPS), 23), GROUPS, 3, lm_loss, measure=True)


def test_mixer_records_the_coverage_report_once(tmp_path, caplog):
    from gradmix import Mixer
    from gradmix.sources import Domain

    gen = torch.Generator().manual_seed(0)
    domains = [Domain(name, torch.randint(0, 64, (40, 8), generator=gen)) for name in ("a", "b")]
    model = NormZoo(bad=True).float()
    mixer = Mixer(domains, "pike", 8, model=model, update_every=2, log_every=1, run_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="gradmix.probe.fused"):  # the default's skip: logged, recorded
        for batch in mixer.batches(4):
            mixer.backward(model, batch, lm_loss)
            model.zero_grad()
            mixer.step()
    assert any("bad.weight" in record.getMessage() for record in caplog.records)
    mixer.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    reports = [r["probe_coverage"] for r in records if "probe_coverage" in r]
    # written when it changes: the static report with the first record, the run-time skip with the next one
    assert len(reports) == 2 and all(r["mode"] == "fused" for r in reports)
    assert reports[0]["hook_coverage"] == 1.0 and reports[0]["uncovered"] == []
    assert reports[1]["uncovered"][0]["parameters"] == ["bad.weight"]
