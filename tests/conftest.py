"""Fixtures and helpers shared by the tests.

Plain helpers are also importable (``from conftest import assert_probability_vector``); fixtures wrap them for tests
that prefer injection. The tiny language model, its per-example loss and the toy domains are the ones the Mixer
tests use (tests/test_controller.py and the probe tests still carry their own copies).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

# CI replays the same examples on every run (a red CI must be reproducible); a local run explores new ones.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# `threads = "auto"` (the configs' default) follows the machine's load; the tests compare runs bit for bit, so they
# pin what "auto" means (gradmix_kit.experiment.threads; tests/test_threads.py unsets it where it tests "auto")
os.environ.setdefault("GRADMIX_THREADS", "1")


def assert_probability_vector(weights, k: int) -> None:
    """Shape (k,), finite, >= 0, sums to 1 within 1e-9: the contract every method's weights must meet."""
    weights = np.asarray(weights)
    assert weights.shape == (k,), weights.shape
    assert np.all(np.isfinite(weights)), weights
    assert np.all(weights >= 0), weights
    assert abs(weights.sum() - 1.0) <= 1e-9, weights.sum()


@pytest.fixture
def probability_vector() -> Callable[[object, int], None]:
    return assert_probability_vector


def _tiny_lm_class():
    import torch

    class TinyLM(torch.nn.Module):
        """Embedding -> tanh -> linear: a next-token model small enough for any unit test."""

        def __init__(self, vocab: int = 40) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(vocab, 8)
            self.out = torch.nn.Linear(8, vocab)

        def forward(self, ids):
            return self.out(torch.tanh(self.emb(ids)))

    return TinyLM


def per_example_lm_loss(model, batch):
    """Mean next-token cross-entropy per example (shape (n,)), the loss_fn a Mixer expects."""
    import torch

    ids = batch["input_ids"]
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    )
    return loss.view(ids.shape[0], -1).mean(1)


def make_toy_domains(sizes: Sequence[int] = (30, 20, 50)):
    """Domains d0, d1, ... of 7-token windows, each drawn from its own token range (ids < 40)."""
    from gradmix.sources import DomainSet

    rng = np.random.default_rng(0)
    return DomainSet.from_arrays({f"d{i}": rng.integers(i * 10, i * 10 + 12, size=(n, 7)) for i, n in enumerate(sizes)})


@pytest.fixture
def tiny_lm():
    import torch

    torch.manual_seed(0)
    return _tiny_lm_class()()


@pytest.fixture
def loss_fn():
    return per_example_lm_loss


@pytest.fixture
def make_domains():
    return make_toy_domains


def kill_after_checkpoint(
    cmd: Sequence[str],
    marker: Path,
    *,
    env: dict[str, str],
    cwd: Path,
    past: float,
    timeout: float,
    tree: bool = False,
) -> None:
    """Start ``cmd``, wait until ``marker`` (a complete checkpoint's last file) exists, let it run ``past`` seconds
    more and SIGKILL it; the process must still have been running (killed mid-run, not finished). ``tree``: ``cmd``
    is a launcher (torchrun): it and every process it started are SIGKILLed (tests/workers/process_tree.py)."""
    proc = subprocess.Popen(
        list(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd, start_new_session=tree
    )
    try:
        deadline = time.monotonic() + timeout
        while not marker.exists():
            if proc.poll() is not None:
                assert proc.stderr is not None
                raise AssertionError(f"the run ended before its checkpoint:\n{proc.stderr.read()[-4000:]!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {marker} within the timeout")
            time.sleep(0.02)
        time.sleep(past)
        assert proc.poll() is None, "the run finished before it could be killed"
        _kill(proc, tree)
    finally:
        if proc.poll() is None:
            _kill(proc, tree)
        if proc.stderr is not None:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def _kill(proc: subprocess.Popen, tree: bool) -> None:
    """SIGKILL ``proc`` (and with ``tree`` every process it started) and wait for it."""
    if tree:
        workers = str(Path(__file__).parent / "workers")
        if workers not in sys.path:
            sys.path.insert(0, workers)
        from process_tree import kill_tree

        kill_tree(proc)
    else:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of a run folder's ``metrics.jsonl``, in order."""
    with (run_dir / "metrics.jsonl").open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
