"""DGA distribution reweighting: cost of one update vs the number of fine clusters k, at a fixed number m of base
distributions. The step itself is O(m); only alpha = P w (O(nnz) = O(k) with disjoint supports) grows with k.

Run: python benchmarks/bench_dga_update.py [--m 16] [--updates 200]. Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from gradmix import DomainStats
from gradmix.methods.dga import DGA, base_distributions_from_clusters

CLUSTER_COUNTS = (16, 256, 4096, 65536)


def time_updates(num_clusters: int, num_base: int, updates: int, seed: int = 0) -> tuple[float, float, float]:
    """Return (build seconds, mean update microseconds, plain-DGA-on-m update microseconds)."""
    rng = np.random.default_rng(seed)
    fine_to_coarse = rng.permutation(np.arange(num_clusters) % num_base)
    sizes = rng.integers(1, 1000, size=num_clusters).astype(float)
    start = time.perf_counter()
    method = DGA(num_clusters, base_distributions=base_distributions_from_clusters(fine_to_coarse, sizes))
    build = time.perf_counter() - start
    records = [
        DomainStats(step=i, num_domains=num_base, target_alignment=rng.normal(size=num_base)) for i in range(updates)
    ]
    plain = DGA(num_base)
    for record in records[:5]:  # warm-up
        method.update(record)
        plain.update(record)
    start = time.perf_counter()
    for record in records:
        method.update(record)
    per_update = (time.perf_counter() - start) / updates * 1e6
    start = time.perf_counter()
    for record in records:
        plain.update(record)
    per_plain = (time.perf_counter() - start) / updates * 1e6
    return build, per_update, per_plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=16, help="number of base distributions (coarse clusters)")
    parser.add_argument("--updates", type=int, default=200)
    args = parser.parse_args()
    base_distributions_from_clusters([0], [1.0])  # import scipy.sparse outside the timed build
    m = min(args.m, min(CLUSTER_COUNTS))
    if m != args.m:
        print(f"(m capped at {m}: every base distribution needs a cluster)")
    print(f"DGA update cost vs k (m = {m} base distributions, {args.updates} updates each)")
    print(
        f"{'k':>8} | {'build P + DGA (ms)':>18} | {'update (us)':>11} | {'plain DGA on m (us)':>19} | "
        f"{'us per 1k k':>11}"
    )
    print("-" * 82)
    for k in CLUSTER_COUNTS:
        build, per_update, per_plain = time_updates(k, m, args.updates)
        print(
            f"{k:>8} | {build * 1e3:>18.2f} | {per_update:>11.1f} | {per_plain:>19.1f} | {per_update / k * 1e3:>11.2f}"
        )


if __name__ == "__main__":
    main()
