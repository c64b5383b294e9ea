"""Sampler benchmark: throughput and memory against N and K, first-batch latency, and how closely the realised mix
follows a weight history (cumulative-share error) with the old per-batch rounding and with error diffusion.

Run: python benchmarks/bench_sampler.py [--quick] [--out benchmarks/results/sampler.json]

All weights change before every batch (the hardest case for throughput). "old" is the per-batch largest-remainder
rounding gradmix shipped before (each batch rounded on its own, ties to the lower index), re-implemented here as the
reference; "new" is ``MixtureSampler(mode="quota")``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

from gradmix import MixtureSampler


def old_per_batch_counts(weights: np.ndarray, total: int) -> np.ndarray:
    """The pre-0.2 rule: Hamilton rounding of one batch, no carry, ties to the lower index."""
    exact = weights * total
    counts = np.floor(exact).astype(np.int64)
    short = int(total - counts.sum())
    if short > 0:
        counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


def throughput(sizes: list[int], batch_size: int, batches: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    k = len(sizes)
    weights = rng.dirichlet(np.full(k, 2.0), size=64) + 1e-4
    tracemalloc.start()
    t0 = time.perf_counter()
    sampler = MixtureSampler(sizes, batch_size, weights[0], seed=seed)
    sampler.next_global_arrays()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(batches):
        sampler.set_weights(weights[i % 64])
        sampler.next_global_arrays()
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # throughput again without tracemalloc's overhead
    t0 = time.perf_counter()
    for i in range(batches):
        sampler.set_weights(weights[i % 64])
        sampler.next_global_arrays()
    clean = time.perf_counter() - t0
    return {
        "first_batch_ms": first * 1e3,
        "indices_per_s": batches * batch_size / clean,
        "indices_per_s_traced": batches * batch_size / elapsed,
        "peak_traced_mib": peak / 2**20,
    }


def pike_like_history(k: int, steps: int, update_every: int, seed: int) -> np.ndarray:
    """Weights that drift like PiKE's: a multiplicative update every ``update_every`` batches, 0.10-0.15 at K = 8."""
    rng = np.random.default_rng(seed)
    log_w = np.zeros(k)
    out = np.empty((steps, k))
    for t in range(steps):
        if t and t % update_every == 0:
            log_w += rng.normal(0, 0.05, k)
            log_w = np.clip(log_w, -0.4, 0.4)
        w = np.exp(log_w)
        out[t] = w / w.sum()
    return out


def share_error(history: np.ndarray, batch_size: int) -> dict[str, Any]:
    k = history.shape[1]
    target = np.cumsum(history * batch_size, axis=0)
    old = np.cumsum([old_per_batch_counts(w, batch_size) for w in history], axis=0)
    sampler = MixtureSampler([10**9] * k, batch_size, history[0], seed=0)
    new_counts = []
    for w in history:
        sampler.set_weights(w)
        new_counts.append(np.bincount(sampler.next_global_arrays()[0], minlength=k))
    new = np.cumsum(new_counts, axis=0)
    steps = np.arange(1, len(history) + 1)[:, None] * batch_size
    return {
        "old_max_abs_count_error": float(np.abs(old - target).max()),
        "new_max_abs_count_error": float(np.abs(new - target).max()),
        "old_final_share_error": float(np.abs(old[-1] - target[-1]).max() / steps[-1, 0]),
        "new_final_share_error": float(np.abs(new[-1] - target[-1]).max() / steps[-1, 0]),
        "old_mean_share_error": float((np.abs(old - target) / steps).max(axis=1).mean()),
        "new_mean_share_error": float((np.abs(new - target) / steps).max(axis=1).mean()),
    }


def worst_lag(kind: str, k: int, batch_size: int, steps: int, seed: int) -> float:
    """Largest sum_s b*w_k(s) - count_k over a run: "constant" weights, "random" (redrawn every batch, some near 0),
    or "adversary" (the cup game: weight spread, after seeing each draw, over the domains not yet served)."""
    rng = np.random.default_rng(seed)
    sampler = MixtureSampler([10**9] * k, batch_size, seed=seed)
    target, drawn, worst = np.zeros(k), np.zeros(k), 0.0
    fixed = rng.random(k) ** 3 + 1e-3
    active = set(range(k))
    for _ in range(steps):
        if kind == "constant":
            w = fixed
        elif kind == "random":
            w = rng.random(k) * (rng.random(k) > 0.2) + 1e-9
        else:
            if len(active) <= 1:
                active = set(range(k))
            w = np.array([1.0 if i in active else 1e-12 for i in range(k)])
        w = w / w.sum()
        sampler.set_weights(w)
        counts = np.bincount(sampler.next_global_arrays()[0], minlength=k)
        target += batch_size * w
        drawn += counts
        worst = max(worst, float((target - drawn).max()))
        if kind == "adversary":
            active -= set(np.flatnonzero(counts).tolist())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches (a smoke run)")
    parser.add_argument("--out", default="benchmarks/results/sampler.json")
    args = parser.parse_args()
    batches = 200 if args.quick else 2000
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg_at_start": os.getloadavg()},
        "batch_size": 512,
    }

    results["vs_size"] = []
    for exponent in (3, 6, 9, 12):
        r = throughput([10**exponent] * 8, 512, batches)
        r.update(N=f"1e{exponent}", K=8)
        results["vs_size"].append(r)
        print(
            f"N=1e{exponent:<3} K=8    first batch {r['first_batch_ms']:7.2f} ms  "
            f"{r['indices_per_s'] / 1e6:5.2f} M idx/s  peak {r['peak_traced_mib']:6.2f} MiB"
        )
    results["vs_domains"] = []
    for k in (2, 8, 64, 256, 1024):
        r = throughput([10**9] * k, 512, max(batches // 4, 50) if k >= 256 else batches)
        r.update(N="1e9", K=k)
        results["vs_domains"].append(r)
        print(
            f"N=1e9   K={k:<5} first batch {r['first_batch_ms']:7.2f} ms  {r['indices_per_s'] / 1e6:5.2f} M idx/s"
            f"  peak {r['peak_traced_mib']:6.2f} MiB"
        )

    results["vs_batch"] = []
    for b in (64, 512, 4096):
        r = throughput([10**9] * 8, b, batches)
        r.update(N="1e9", K=8, batch_size=b)
        results["vs_batch"].append(r)
        print(f"N=1e9   K=8  b={b:<5} {r['indices_per_s'] / 1e6:5.2f} M idx/s")

    results["share_error"] = []
    for k, b in ((8, 16), (6, 16), (3, 8), (16, 32)):
        history = pike_like_history(k, 10_000, 20, seed=k)
        r = share_error(history, b)
        r.update(K=k, batch_size=b, batches=10_000, history="PiKE-like drift, update every 20 batches")
        results["share_error"].append(r)
        print(
            f"share error K={k:<3} b={b:<3} max |count - target|: old {r['old_max_abs_count_error']:8.2f}  new "
            f"{r['new_max_abs_count_error']:5.2f}   final share error: old {r['old_final_share_error']:.2e}  new "
            f"{r['new_final_share_error']:.2e}"
        )
    results["worst_lag"] = []
    for kind in ("constant", "random", "adversary"):
        for k in (4, 8, 16, 64):
            lags = [
                worst_lag(kind, k, 1 if kind == "adversary" else b, 2000 if not args.quick else 300, seed)
                for seed, b in enumerate((1, 3, 8, 16, 32))
            ]
            results["worst_lag"].append({"kind": kind, "K": k, "max_lag": max(lags)})
            print(f"worst lag {kind:<9} K={k:<3} {max(lags):.3f} examples behind")
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
