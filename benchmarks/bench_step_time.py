"""Step-time and memory cost of adaptive mixing vs static uniform mixing, same small GPT and batch.

    python benchmarks/bench_step_time.py [--steps 200] [--reps 3] [--json out.json]
    python benchmarks/bench_step_time.py --paired [--steps 400]

Default mode: each configuration runs in its own subprocess (so peak RSS is its own); configurations are
interleaved over ``--reps`` rounds and the median step time per configuration is reported, with the ratio to uniform.
``--paired``: one process trains a uniform model and an adaptive one side by side, alternating blocks of T steps,
so machine-load drift hits both arms alike (the robust way to measure a few percent on a shared machine); it also
reports how much a measuring step costs relative to a plain one.
Data: random token windows (timing does not depend on the text). Model: gradmix_kit.experiment GPT,
vocab 4096, d_model 128, 2 layers, context 128, batch 16 (~0.9M parameters).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

CONFIGS: dict[str, tuple[str, int, int, dict[str, Any], dict[str, Any]]] = {
    # name: (method, K, update_every, probe_params, method_params)
    "uniform": ("uniform", 6, 20, {}, {}),
    "pike T0=20 (default probe: fused)": ("pike", 6, 20, {}, {}),
    "pike T0=20 (micro-batch probe)": ("pike", 6, 20, {"fused": False}, {}),
    "fair_pike T0=20 (default probe: fused)": ("fair_pike", 6, 20, {}, {}),
    "fair_pike T0=20 (micro-batch probe)": ("fair_pike", 6, 20, {"fused": False}, {}),
    "uniform K=16": ("uniform", 16, 20, {}, {}),
    "dga K=16 T_r=20 (default probe: fused)": ("dga", 16, 20, {}, {}),
    "dga K=16 T_r=20 (micro-batch probe)": ("dga", 16, 20, {"fused": False}, {}),
    "uniform K=64": ("uniform", 64, 20, {}, {}),
    "dga K=64 T_r=20 (default probe: fused)": ("dga", 64, 20, {}, {}),
}


PAIRS = {
    "pike K=6 T0=20": ("uniform", "pike T0=20 (default probe: fused)"),
    "pike K=6 T0=20 micro": ("uniform", "pike T0=20 (micro-batch probe)"),
    "fair_pike K=6 T0=20": ("uniform", "fair_pike T0=20 (default probe: fused)"),
    "fair_pike K=6 T0=20 micro": ("uniform", "fair_pike T0=20 (micro-batch probe)"),
    "dga K=16 T_r=20": ("uniform K=16", "dga K=16 T_r=20 (default probe: fused)"),
    "dga K=16 T_r=20 micro": ("uniform K=16", "dga K=16 T_r=20 (micro-batch probe)"),
    "dga K=64 T_r=20": ("uniform K=64", "dga K=64 T_r=20 (default probe: fused)"),
}


def _setup(name: str):
    import numpy as np
    import torch

    from gradmix import Mixer
    from gradmix.sources import Domain, DomainSet
    from gradmix_kit.experiment.model import GPT, GPTConfig

    torch.manual_seed(0)
    method, k, every, probe_params, method_params = CONFIGS[name]
    rng = np.random.default_rng(0)
    domains = DomainSet.from_arrays({f"d{i}": rng.integers(0, 4096, size=(400, 129)) for i in range(k)})
    target = Domain("target", torch.as_tensor(rng.integers(0, 4096, size=(200, 129))))
    model = GPT(GPTConfig(vocab_size=4096, context_length=128, d_model=128, n_layers=2, n_heads=4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mixer = Mixer(
        domains,
        method,
        16,
        model=model,
        update_every=every,
        method_params=method_params,
        probe_params=probe_params,
        target=target if method == "dga" else None,
        target_batch_size=16,
    )
    return mixer, model, opt, mixer.batches()


def _timed_step(mixer, model, opt, batches) -> float:
    """One full training step with the Mixer; returns its wall time in seconds."""
    from gradmix_kit.experiment.model import per_example_loss

    t0 = time.perf_counter()
    batch = next(batches)
    mixer.backward(model, batch, per_example_loss)
    opt.step()
    opt.zero_grad(set_to_none=True)
    mixer.step()
    return time.perf_counter() - t0


def worker(name: str, steps: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(2)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mixer, model, opt, batches = _setup(name)
    times = [_timed_step(mixer, model, opt, batches) for _ in range(steps + 10)][10:]  # skip warm-up steps
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "name": name,
        "mean_step_s": float(np.mean(times)),
        "total_s": float(np.sum(times)),
        "peak_rss_mb": rss_after / 1024,
        "rss_growth_mb": (rss_after - rss_before) / 1024,
        "probed_scalars": getattr(mixer.probe, "num_probed", 0),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def paired(pair: str, steps: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(2)
    arms = {name: _setup(name) for name in PAIRS[pair]}
    times: dict[str, list[float]] = {name: [] for name in arms}
    measured: list[float] = []
    plain: list[float] = []
    block = CONFIGS[PAIRS[pair][1]][2]
    for start in range(0, steps + block, block):
        for name, (mixer, model, opt, batches) in arms.items():
            for _ in range(block):
                measuring = mixer.should_measure()
                dt = _timed_step(mixer, model, opt, batches)
                if start >= block:  # first block of each arm is warm-up
                    times[name].append(dt)
                    if name == PAIRS[pair][1]:
                        (measured if measuring else plain).append(dt)
    base, method = (float(np.sum(times[n])) for n in PAIRS[pair])
    return {
        "pair": pair,
        "baseline_ms": 1000 * base / len(times[PAIRS[pair][0]]),
        "method_ms": 1000 * method / len(times[PAIRS[pair][1]]),
        "ratio": method / base,
        "measuring_step_cost": float(np.mean(measured) / np.median(plain)),
        "steps_per_arm": len(plain) + len(measured),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="subset of configuration names")
    parser.add_argument("--json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--paired", action="store_true", help="interleaved uniform-vs-method timing in one process")
    args = parser.parse_args()
    if args.paired:
        results = []
        print(f"{'pair':24s} {'uniform ms':>10s} {'method ms':>10s} {'ratio':>7s} {'measuring step / plain step':>28s}")
        for pair in args.only or PAIRS:
            r = paired(pair, args.steps)
            results.append(r)
            print(
                f"{pair:24s} {r['baseline_ms']:10.1f} {r['method_ms']:10.1f} {r['ratio']:7.3f} "
                f"{r['measuring_step_cost']:28.2f}",
                flush=True,
            )
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"args": vars(args), "paired": results}, fh, indent=2)
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps)))
        return
    names = args.only or list(CONFIGS)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(args.reps):
        for name in names:
            out = subprocess.run(
                [sys.executable, __file__, "--worker", name, "--steps", str(args.steps)],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"rep {rep} {name}: {runs[name][-1]['mean_step_s'] * 1000:.1f} ms/step", file=sys.stderr)
    import statistics

    summary = {}
    for name in names:
        summary[name] = {
            "median_step_ms": statistics.median(r["mean_step_s"] for r in runs[name]) * 1000,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[name]),
            "probed_scalars": runs[name][0]["probed_scalars"],
            "parameters": runs[name][0]["parameters"],
        }
    print(f"{'configuration':44s} {'ms/step':>8s} {'ratio':>7s} {'peak RSS MB':>12s} {'probed':>9s}")
    for name in names:
        base = "uniform K=16" if "K=16" in name and "uniform K=16" in summary else "uniform"
        ratio = summary[name]["median_step_ms"] / summary[base]["median_step_ms"] if base in summary else float("nan")
        summary[name]["ratio_vs_" + base.replace(" ", "_")] = ratio
        print(
            f"{name:44s} {summary[name]['median_step_ms']:8.1f} {ratio:7.3f} {summary[name]['peak_rss_mb']:12.0f} "
            f"{summary[name]['probed_scalars']:9d}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "summary": summary, "runs": runs}, fh, indent=2)


if __name__ == "__main__":
    main()
