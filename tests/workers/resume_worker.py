"""Worker for the resume test: trains with a Mixer behind a DataLoader with worker processes.

usage: resume_worker.py OUT_JSONL CKPT STEPS METHOD [--kill-at M] [--resume]
Writes one JSON line per consumed step: step, (domain, index) pairs of the batch, weights after the step.
With --kill-at M it checkpoints after step M and SIGKILLs itself; with --resume it restores and continues.
"""

from __future__ import annotations

import argparse
import json
import os
import signal

import numpy as np
import torch

from gradmix import Mixer
from gradmix.sources import DomainSet


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 16) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.out = torch.nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(ids)))


def per_example_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    ids = batch["input_ids"]
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    )
    return loss.view(ids.shape[0], -1).mean(dim=1)


def domains() -> DomainSet:
    rng = np.random.default_rng(0)
    arrays = {}
    for k, (n, lo, hi) in enumerate([(40, 0, 10), (25, 10, 30), (60, 25, 50)]):
        arrays[f"d{k}"] = rng.integers(lo, hi, size=(n, 9))
    return DomainSet.from_arrays(arrays)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("ckpt")
    parser.add_argument("steps", type=int)
    parser.add_argument("method")
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    params = {"min_weight": 0.02, "variant": "gradmix_v1"} if args.method in ("pike", "fair_pike") else {}
    mixer = Mixer(
        domains(),
        args.method,
        8,
        method_params=params,
        model=model,
        update_every=3,
        seed=11,
        max_repeats=None,
        log_every=1000,
    )
    if args.resume:
        mixer.load_checkpoint(args.ckpt, model=model, optimizer=opt)
    loader = mixer.dataloader(num_workers=args.workers, prefetch_factor=2 if args.workers else None)
    with open(args.out, "a") as fh:
        for batch in loader:
            if mixer.step_count >= args.steps:
                break
            mixer.backward(model, batch, per_example_loss)
            opt.step()
            opt.zero_grad()
            mixer.step()
            pairs = list(zip(batch["domain"].tolist(), batch["index"].tolist()))
            fh.write(
                json.dumps({"step": mixer.step_count, "pairs": pairs, "weights": [float(w) for w in mixer.weights]})
                + "\n"
            )
            fh.flush()
            if args.kill_at is not None and mixer.step_count == args.kill_at:
                mixer.save_checkpoint(args.ckpt, model=model, optimizer=opt)
                os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main()
