"""Sampler throughput with the weights changing before every batch (issue: >= 2M indices/s).

Run: python benchmarks/bench_sampler.py [--batch-size 4096] [--domains 8] [--seconds 3]
Prints indices/s for the array path (next_arrays) and the list-of-pairs path (iteration), quota and multinomial.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from gradmix import MixtureSampler


def measure(mode: str, batch_size: int, num_domains: int, seconds: float, as_pairs: bool) -> float:
    rng = np.random.default_rng(0)
    sizes = rng.integers(10_000, 1_000_000, size=num_domains)
    sampler = MixtureSampler(sizes, batch_size, seed=0, mode=mode)
    weight_stream = rng.random((1024, num_domains)) + 1e-3
    produced = 0
    t0 = time.perf_counter()
    i = 0
    while time.perf_counter() - t0 < seconds:
        sampler.set_weights(weight_stream[i % 1024])
        if as_pairs:
            produced += len(next(sampler))
        else:
            produced += len(sampler.next_arrays()[0])
        i += 1
    return produced / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--domains", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    results = {}
    for mode in ("quota", "multinomial"):
        for as_pairs in (False, True):
            key = f"{mode}/{'pairs' if as_pairs else 'arrays'}"
            results[key] = measure(mode, args.batch_size, args.domains, args.seconds, as_pairs)
            print(f"{key:22s} batch={args.batch_size} K={args.domains}: {results[key] / 1e6:.2f} M indices/s")
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "indices_per_s": results}, fh, indent=2)


if __name__ == "__main__":
    main()
