"""GradientProbe under torch.distributed: two gloo processes hold uneven shares of one global batch.

Every rank must return the same ProbeResult, and the gradients after the probe must equal the single-process
gradient of the whole global batch's mean loss, for a DDP-wrapped model and for a plain one with sync_gradients.
"""

from __future__ import annotations

import datetime
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gradmix.distributed import exit_rank
from gradmix.probe import GradientProbe

pytestmark = pytest.mark.integration

WORLD = 2
NUM_GROUPS = 4
# Global batch of 10: rank 0 holds rows 0..5, rank 1 rows 6..9 (uneven shares, so global_batch_size is needed).
# Group 0: 4 + 2 examples; group 1: 1 + 2 (only rank 1 can estimate); group 2: 1 + 0 (not estimable); group 3: absent.
GROUPS = np.array([0, 0, 1, 0, 2, 0, 0, 1, 1, 0])
SHARES = [slice(0, 6), slice(6, 10)]
TARGET_SHARES = [slice(0, 3), slice(3, 7)]


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))


def loss_fn(model, batch):
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def global_batches():
    gen = torch.Generator().manual_seed(42)
    batch = {"x": torch.randn(len(GROUPS), 3, generator=gen), "y": torch.randint(0, 2, (len(GROUPS),), generator=gen)}
    target = {"x": torch.randn(7, 3, generator=gen), "y": torch.randint(0, 2, (7,), generator=gen)}
    return batch, target


def local(batch, rows):
    return {k: v[rows] for k, v in batch.items()}


def _worker(rank: int, port: int, mode: str, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        model = build_model()
        wrapped: nn.Module
        if mode == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
            probe = GradientProbe(wrapped, num_splits=2, gram=True)
        else:
            wrapped = model
            probe = GradientProbe(model, num_splits=2, gram=True, sync_gradients=True)
        batch, target = global_batches()
        mine, my_target = local(batch, SHARES[rank]), local(target, TARGET_SHARES[rank])
        groups = torch.tensor(GROUPS[SHARES[rank]])
        outputs = {}
        for measure in (True, False):
            wrapped.zero_grad(set_to_none=True)
            result = probe.backward(
                mine,
                groups,
                NUM_GROUPS,
                loss_fn,
                measure=measure,
                target_batch=my_target if measure else None,
                global_batch_size=len(GROUPS),
            )
            assert result is not None
            grads = []
            for p in model.parameters():
                assert p.grad is not None
                grads.append(p.grad.clone())
            outputs[measure] = {"result": result.__dict__, "grads": grads}
        torch.save(outputs, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        dist.destroy_process_group()
        raise
    exit_rank()  # a normal return can abort at interpreter exit under gloo (torch 2.13; docs/bad_inputs.md)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def per_sample(model, batch) -> np.ndarray:
    params = list(model.parameters())
    rows = []
    for i in range(batch["x"].shape[0]):
        grads = torch.autograd.grad(loss_fn(model, local(batch, slice(i, i + 1))).sum(), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double().numpy())
    return np.stack(rows)


def local_estimates(samples: np.ndarray, groups: np.ndarray, k: int):
    """Closed-form unbiased (||mu||^2, sigma^2) of group k from one rank's examples, 2 contiguous parts."""
    members = np.flatnonzero(groups == k)
    if members.size < 2:
        return None
    parts = np.array_split(members, 2)
    sizes = np.array([len(p) for p in parts], dtype=float)
    means = [samples[p].mean(axis=0) for p in parts]
    total = sizes.sum()
    overall = samples[members].mean(axis=0)
    sq = 2 * sizes[0] * sizes[1] * (means[0] @ means[1]) / (total**2 - (sizes**2).sum())
    var = sum(s * np.sum((m - overall) ** 2) for s, m in zip(sizes, means))
    return sq, var, total


@pytest.mark.parametrize("mode", ["ddp", "sync"])
def test_ranks_agree_and_match_single_process(mode, tmp_path):
    mp.spawn(_worker, args=(free_port(), mode, str(tmp_path)), nprocs=WORLD, join=True)
    outputs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    model = build_model()
    batch, target = global_batches()
    samples = per_sample(model, batch)
    target_grad = per_sample(model, target).mean(axis=0)
    with torch.no_grad():
        losses = loss_fn(model, batch).double().numpy()
        target_loss = loss_fn(model, target).double().mean().item()
    model.zero_grad()
    loss_fn(model, batch).mean().backward()
    expected_grads = [p.grad for p in model.parameters()]

    for measure in (True, False):
        first, second = (outputs[r][measure] for r in range(WORLD))
        for key, value in first["result"].items():  # identical on both ranks, bit for bit
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(value, second["result"][key], err_msg=key)
            else:
                assert value == second["result"][key] or (
                    value != value and second["result"][key] != second["result"][key]
                ), key
        for rank_output in (first, second):
            for got, want in zip(rank_output["grads"], expected_grads):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        result = first["result"]
        np.testing.assert_array_equal(result["examples"], [6, 3, 1, 0])
        np.testing.assert_allclose(result["loss"][:3], [losses[k == GROUPS].mean() for k in range(3)], rtol=1e-6)
        assert np.isnan(result["loss"][3])
        assert result["mean_loss"] == pytest.approx(losses.mean(), rel=1e-6)

    result = outputs[0][True]["result"]
    # Global statistics: count-weighted mean of the per-rank unbiased estimates (ranks with >= 2 examples).
    for k in range(NUM_GROUPS):
        estimates = [local_estimates(samples[SHARES[r]], GROUPS[SHARES[r]], k) for r in range(WORLD)]
        estimates = [e for e in estimates if e is not None]
        if not estimates:
            assert np.isnan(result["grad_sq_norm"][k]) and np.isnan(result["grad_var"][k])
            continue
        weights = np.array([e[2] for e in estimates])
        assert result["grad_sq_norm"][k] == pytest.approx(
            np.dot(weights, [e[0] for e in estimates]) / weights.sum(), rel=1e-4, abs=1e-8
        )
        assert result["grad_var"][k] == pytest.approx(
            np.dot(weights, [e[1] for e in estimates]) / weights.sum(), rel=1e-4, abs=1e-8
        )
    assert np.isfinite(result["grad_sq_norm"][[0, 1]]).all() and np.isnan(result["grad_sq_norm"][[2, 3]]).all()
    # Alignment and Gram off-diagonal are exact global quantities.
    means = np.stack(
        [
            samples[k == GROUPS].mean(axis=0) if np.any(k == GROUPS) else np.full(samples.shape[1], np.nan)
            for k in range(NUM_GROUPS)
        ]
    )
    np.testing.assert_allclose(result["target_alignment"], means @ target_grad, rtol=1e-4)
    assert result["target_loss"] == pytest.approx(target_loss, rel=1e-6)
    gram = means @ means.T
    np.fill_diagonal(gram, result["grad_sq_norm"])
    np.testing.assert_allclose(result["gram"], gram, rtol=1e-4)
