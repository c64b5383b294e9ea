"""How noisy are PiKE's statistics? Variance of the per-domain ||grad L_k||^2 and sigma_k^2 estimates.

    python benchmarks/bench_pike_estimator.py [--config configs/bench_multilingual.toml] [--warmup 200] [--reps 40]

Trains the benchmark GPT with uniform mixing for ``--warmup`` steps, freezes it, then measures the probe's
estimates on ``--reps`` fresh batches, for several estimator settings: one training batch (the default probe,
2 parts per domain), per-sample parts, and statistics averaged over T consecutive batches (``probe_every``), which
is what accumulating between updates buys. Reports, per setting, the coefficient of variation of each estimate across
repetitions, the share of negative ||g||^2 estimates, and the signal-to-noise ratio of PiKE's normalised step
(spread of the mean step across domains / std of the step across repetitions): below ~1 the update is mostly noise.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import torch

from gradmix.probe import GradientProbe
from gradmix.sampler import MixtureSampler
from gradmix_kit.experiment.config import load_config
from gradmix_kit.experiment.model import GPT, GPTConfig, per_example_loss
from gradmix_kit.experiment.runner import prepare_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/bench_multilingual.toml")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--json")
    args = parser.parse_args()
    cfg = load_config(args.config)
    torch.manual_seed(0)
    data = prepare_data(cfg)
    names = data.train.names
    k = len(names)
    b = cfg["train"]["batch_size"]
    model = GPT(GPTConfig(vocab_size=data.vocab_size, context_length=data.train.window_tokens, **cfg["model"]))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["train"]["lr"])
    sampler = MixtureSampler(data.train.sizes, b, seed=0)
    for _ in range(args.warmup):
        batch = data.train.gather(*sampler.next_arrays())
        per_example_loss(model, batch).mean().backward()
        opt.step()
        opt.zero_grad()

    def estimates(num_splits: int, accumulate: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        probe = GradientProbe(model, num_splits=num_splits)
        s = MixtureSampler(data.train.sizes, b, seed=1000 + seed)
        sq: list[np.ndarray] = []
        var: list[np.ndarray] = []
        for _ in range(accumulate):
            batch = data.train.gather(*s.next_arrays())
            r = probe.backward(batch, batch["domain"], k, per_example_loss, measure=True)
            model.zero_grad(set_to_none=True)
            assert r is not None and r.grad_sq_norm is not None and r.grad_var is not None
            sq.append(r.grad_sq_norm)
            var.append(r.grad_var)
        with np.errstate(all="ignore"):
            return np.nanmean(sq, axis=0), np.nanmean(var, axis=0)

    settings = {
        "1 batch, 2 parts/domain (default)": (2, 1),
        "1 batch, per-sample parts": (b, 1),
        "mean of 5 batches, 2 parts": (2, 5),
        "mean of 20 batches, 2 parts": (2, 20),
        "mean of 20 batches, per-sample": (b, 20),
    }
    results: dict[str, dict[str, Any]] = {}
    for label, (splits, acc) in settings.items():
        sq, var = zip(*(estimates(splits, acc, rep) for rep in range(args.reps)))
        sq, var = np.array(sq), np.array(var)
        with np.errstate(all="ignore"):
            norm = np.nanmean(np.clip(sq, 0, None), axis=1, keepdims=True)
            step = np.clip(sq, 0, None) / norm - var / (2 * b) / norm  # PiKE's normalised step (zeta1 = zeta2 = 1)
            snr = float(np.nanstd(np.nanmean(step, axis=0)) / np.nanmean(np.nanstd(step, axis=0)))
            results[label] = {
                "cv_grad_sq_norm": dict(zip(names, np.round(np.nanstd(sq, 0) / np.abs(np.nanmean(sq, 0)), 3).tolist())),
                "cv_grad_var": dict(zip(names, np.round(np.nanstd(var, 0) / np.abs(np.nanmean(var, 0)), 3).tolist())),
                "negative_sq_norm_share": float(np.mean(sq < 0)),
                "mean_grad_sq_norm": dict(zip(names, np.nanmean(sq, 0).tolist())),
                "mean_grad_var": dict(zip(names, np.nanmean(var, 0).tolist())),
                "variance_term_share": float(np.nanmean(var / (2 * b)) / np.nanmean(np.clip(sq, 0, None))),
                "step_snr": snr,
            }
        r = results[label]
        print(
            f"{label:36s} median CV ||g||^2 {np.median(list(r['cv_grad_sq_norm'].values())):6.2f}  "
            f"median CV sigma^2 {np.median(list(r['cv_grad_var'].values())):5.2f}  "
            f"negative ||g||^2 {r['negative_sq_norm_share']:5.1%}  sigma^2/(2b) / ||g||^2 "
            f"{r['variance_term_share']:5.2f}  step SNR {r['step_snr']:5.2f}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"config": args.config, "warmup": args.warmup, "reps": args.reps, "domains": names, "results": results},
                fh,
                indent=2,
            )


if __name__ == "__main__":
    main()
