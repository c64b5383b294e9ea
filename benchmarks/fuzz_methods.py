"""Long-run fuzz of every mixing method: random, extreme and adversarial statistics, with state round trips.

Run: python benchmarks/fuzz_methods.py [--updates 1000000] [--methods 'pike;dga'] [--out benchmarks/results/fuzz.json]

For each method and update: statistics drawn from a mix of regimes (ordinary, tiny/huge magnitudes over 600
orders, NaN / inf entries, zeros, negative unbiased estimates, one domain adversarially dominant, all-missing), the
method updates, and the weights must be finite, >= 0 and sum to 1 within 1e-9. Every ``--roundtrip-every`` updates
the state goes through a real checkpoint file (``save_checkpoint_file`` / ``load_checkpoint_file``) into a fresh
instance, whose weights and next update must equal the original's exactly. Any warning is an error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from gradmix import available_methods, make_method
from gradmix.checkpoint import load_checkpoint_file, save_checkpoint_file
from gradmix.methods import method_class
from gradmix.stats import DomainStats

K = 5


# settings that remove a method's safety rails: they must stay valid too
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "pike(max_log_step=None,normalize=none)": ("pike", {"max_log_step": None, "normalize": "none"}),
    "pike(conceptual)": ("pike", {"mode": "conceptual"}),
    "fair_pike(tau=50)": ("fair_pike", {"tau": 50.0}),
    "dga(ema=0)": ("dga", {"ema": 0.0}),
}


def build(name: str) -> Any:
    base, extra = VARIANTS.get(name, (name, {}))
    return make_method(base, K, **method_params(base), **extra)


def method_params(name: str) -> dict[str, Any]:
    """Parameters the methods need (sizes, reference losses, target histograms, fixed weights)."""
    cls = method_class(name)
    params: dict[str, Any] = {}
    if cls.needs_sizes:
        params["sizes"] = [10, 1000, 50, 7, 100000]
    if name == "doremi":
        params["reference_loss"] = [2.0, 3.0, 1.0, 4.0, 2.5]
    if name == "importance":
        params["target_counts"] = [5, 0, 3, 1, 0]
    if name == "fixed":
        params["weights"] = [0.1, 0.2, 0.3, 0.2, 0.2]
    if name == "schedule":
        params["schedule"] = [(1, [0.1, 0.2, 0.3, 0.2, 0.2]), (50, [0.3, 0.1, 0.1, 0.4, 0.1])]
    return params


def draw_stats(rng: np.random.Generator, step: int, k: int) -> DomainStats:
    regime = rng.integers(0, 8)
    scale = 10.0 ** rng.uniform(-300, 300) if regime in (1, 2) else 1.0

    def vec(positive: bool = False) -> np.ndarray:
        x = rng.normal(size=k) * scale
        if positive and regime != 4:
            x = np.abs(x)
        if regime == 3:  # holes and infinities
            x[rng.random(k) < 0.3] = np.nan
            x[rng.random(k) < 0.1] = np.inf * rng.choice([-1, 1])
        if regime == 5:  # one domain dominates everything
            x[:] = 1e-6
            x[step % k] = 1e6
        if regime == 6:
            x[:] = 0.0
        if regime == 7:
            x[:] = np.nan
        return x

    with np.errstate(over="ignore", invalid="ignore"):
        return DomainStats(
            step=step,
            num_domains=k,
            loss=np.abs(vec()),
            examples=np.full(k, 8.0),
            batch_size=32,
            grad_sq_norm=vec(positive=True),
            grad_var=vec(positive=True),
            target_alignment=vec(),
            target_loss=float(abs(rng.normal())),
            gram=None,
        )


def fuzz(name: str, updates: int, roundtrip_every: int, seed: int, folder: Path) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    method = build(name)
    roundtrips = 0
    skips = 0
    started = time.perf_counter()
    for step in range(1, updates + 1):
        stats = draw_stats(rng, step, method.num_stat_groups)
        w = method.update(stats)
        skips += bool(method.last_skip_reason)
        if not (np.all(np.isfinite(w)) and np.all(w >= 0) and abs(w.sum() - 1.0) <= 1e-9 and w.shape == (K,)):
            raise AssertionError(f"{name}: invalid weights {w} after update {step}")
        if step % roundtrip_every == 0:
            path = save_checkpoint_file({"method": method.state_dict()}, folder / f"{name}.ckpt")
            twin = build(name)
            twin.load_state_dict(load_checkpoint_file(path)["method"])
            if not np.array_equal(twin.weights, method.weights):
                raise AssertionError(
                    f"{name}: weights changed in a state round trip at update {step}: "
                    f"{np.abs(twin.weights - method.weights).max():.3e}"
                )
            probe = draw_stats(rng, step + 1, method.num_stat_groups)
            a, b = method.update(probe), twin.update(probe)
            if not np.array_equal(a, b):
                raise AssertionError(f"{name}: the update after a round trip differs at update {step}")
            method = twin
            roundtrips += 1
    return {
        "method": name,
        "updates": updates,
        "roundtrips": roundtrips,
        "skipped_updates": skips,
        "seconds": time.perf_counter() - started,
        "final_weights": method.weights.tolist(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--updates", type=int, default=1_000_000)
    parser.add_argument("--roundtrip-every", type=int, default=10_000)
    parser.add_argument("--methods", default=None, help="';'-separated (default: all registered + variants)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    names = args.methods.split(";") if args.methods else available_methods() + list(VARIANTS)
    results = []
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("error")  # no warning may leak to a user
        for name in names:
            result = fuzz(name, args.updates, args.roundtrip_every, args.seed, Path(tmp))
            results.append(result)
            print(
                f"{name:<14} {result['updates']:>9} updates  {result['roundtrips']:>4} round trips  "
                f"{result['skipped_updates']:>8} skipped  {result['seconds']:7.1f} s",
                flush=True,
            )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"cpus": os.cpu_count(), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
