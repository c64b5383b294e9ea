"""Step time and memory of gradient measurement: a measuring step of the fused probe over a plain step (default), and
adaptive mixing over uniform mixing end to end (``--paired``, ``--separate``).

    python benchmarks/bench_step_time.py                                   # Llama 1M and 10M, K = 4, 16, 64, 256
    python benchmarks/bench_step_time.py --models 10M --rounds 10 --json benchmarks/results/step_time_llama.json
    python benchmarks/bench_step_time.py --device cuda --models 10M 50M    # on a GPU machine (CUDA events)
    python benchmarks/bench_step_time.py --paired [--steps 400]            # uniform vs adaptive Mixer runs
    python benchmarks/bench_step_time.py --separate [--reps 3]             # one subprocess per configuration

Default mode: measuring step / plain step. Llama-style models (``transformers`` ``LlamaConfig`` /
``LlamaForCausalLM`` from random init, no hub): 1M, 10M, 50M parameters (``MODELS``), a batch of ``--batch``
random token windows of ``--seq`` tokens, each example's group drawn uniformly from K (so at K >= batch most groups
hold one example). A step is ``probe.backward`` (forward + backward) + AdamW step + zero_grad, the same code for
both arms (plain: ``measure=False``). One process; per (model, K), after two warm-up steps of each arm, ``--rounds``
rounds of one plain and one measuring step, interleaved (the order alternates), so load drift hits both arms alike.
Reported: the per-round ratio measuring / plain in CPU time (``time.process_time``, all threads of the process: what
the step costs, whatever else runs on the machine) and in wall time (on CUDA: CUDA events), mean and 95% t-interval
over rounds; peak memory of one step of each arm over the memory before it, measured after all timings (CPU: the
process's peak resident set, reset before the step through ``/proc/self/clear_refs``, with glibc's mmap threshold
fixed so that freed buffers leave the RSS; CUDA: ``torch.cuda.max_memory_allocated``); which per-layer form the
probe's cost model chose (``FusedGradientProbe.layer_forms``). ``--threads`` (default 1) sets torch's CPU threads.

``--paired``: one process trains a uniform-mixing model and an adaptive one side by side (gradmix_kit's GPT,
vocab 4096, d_model 128, 2 layers, context 128, batch 16), alternating blocks of T steps; reports the overall ratio
(wall and CPU time) and what a measuring step costs. ``--separate``: each configuration in its own subprocess (its
own peak RSS), ``--reps`` rounds. Both used 2 threads before ``--threads`` existed (now 1 by default).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

MODELS: dict[str, dict[str, int]] = {
    # LlamaConfig fields; parameters with the untied embedding and head
    "1M": {"vocab_size": 2048, "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4, "heads": 4},
    "10M": {"vocab_size": 8192, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 8, "heads": 8},
    "50M": {"vocab_size": 16384, "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 10, "heads": 8},
}

_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131)
"""97.5% quantiles of Student's t with 1 ... 15 degrees of freedom (more: 2.1 down to 1.96)."""


# -- statistics and memory ----------------------------------------------------------------------------------------


def interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its 95% t-interval (NaN bounds with one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    df = len(values) - 1
    t = _T975[df - 1] if df <= len(_T975) else (2.086 if df <= 20 else (2.042 if df <= 30 else 1.96))
    half = t * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def exact_rss_peaks() -> bool:
    """Fix glibc's mmap threshold (64 KiB) so that freed large buffers leave the resident set, and check that the
    kernel lets the peak be reset. Call after the timings: it makes every large allocation an mmap."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        _status("VmHWM")
        return True
    except (OSError, KeyError):
        return False


class PeakMemory:
    """Peak memory (bytes) over the value before, while the context runs: CUDA ``max_memory_allocated``, else the
    process's peak RSS (``VmHWM``, reset on entry); NaN where neither can be read."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.peak = float("nan")

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")
                self.start = _status("VmRSS")
            except (OSError, KeyError):
                self.start = -1
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = float(torch.cuda.max_memory_allocated() - self.start)
        elif self.start >= 0:
            self.peak = float(_status("VmHWM") - self.start)


# -- measuring step vs plain step (default mode) ------------------------------------------------------------------


def llama(size: str, seq: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = MODELS[size]
    config = LlamaConfig(
        vocab_size=spec["vocab_size"],
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["heads"],
        max_position_embeddings=max(seq + 1, 64),
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def causal_lm_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-example mean next-token cross-entropy."""
    ids = batch["input_ids"]
    logits = model(input_ids=ids[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(dim=1)


def setup(size: str, args: argparse.Namespace) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict, Any]:
    """(model, AdamW, batch, FusedGradientProbe) for one model size."""
    from gradmix.probe import FusedGradientProbe

    model = llama(size, args.seq).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, MODELS[size]["vocab_size"], (args.batch, args.seq + 1), generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = FusedGradientProbe(model)
    return model, opt, {"input_ids": ids.to(args.device)}, probe


def draw_groups(k: int, args: argparse.Namespace) -> torch.Tensor:
    return torch.randint(0, k, (args.batch,), generator=torch.Generator().manual_seed(k)).to(args.device)


class StepTimer:
    """(wall seconds, CPU seconds) of one call; on CUDA the wall time comes from CUDA events."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def __call__(self, fn) -> tuple[float, float]:
        if self.cuda:
            torch.cuda.synchronize()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            cpu = time.process_time()
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            return start.elapsed_time(stop) / 1000.0, time.process_time() - cpu
        cpu, wall = time.process_time(), time.perf_counter()
        fn()
        return time.perf_counter() - wall, time.process_time() - cpu


def probe_step_config(size: str, ks: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Interleaved plain / measuring steps for one model at every K (timings; memory comes later)."""
    model, opt, batch, probe = setup(size, args)
    timer = StepTimer(args.device)
    rows = []
    for k in ks:
        groups = draw_groups(k, args)

        def step(measure: bool, k: int = k, groups: torch.Tensor = groups) -> None:
            probe.backward(batch, groups, k, causal_lm_loss, measure=measure)
            opt.step()
            opt.zero_grad(set_to_none=True)

        for measure in (False, True, False, True):  # warm-up: allocator, first-call checks
            step(measure)
        times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for r in range(args.rounds):
            for measure in (False, True) if r % 2 == 0 else (True, False):
                times[measure].append(timer(lambda measure=measure: step(measure)))
        wall = [m[0] / p[0] for p, m in zip(times[False], times[True])]
        cpu = [m[1] / p[1] for p, m in zip(times[False], times[True])]
        row = {
            "model": size,
            "parameters": sum(p.numel() for p in model.parameters()),
            "batch": args.batch,
            "seq": args.seq,
            "K": k,
            "groups_present": int(torch.unique(groups).numel()),
            "rounds": args.rounds,
            "plain_ms": 1000 * statistics.median(t[0] for t in times[False]),
            "measuring_ms": 1000 * statistics.median(t[0] for t in times[True]),
            "plain_cpu_ms": 1000 * statistics.median(t[1] for t in times[False]),
            "measuring_cpu_ms": 1000 * statistics.median(t[1] for t in times[True]),
            "cpu_ratio": interval(cpu),
            "wall_ratio": interval(wall),
            "cpu_ratios": cpu,
            "wall_ratios": wall,
            "forms": dict(Counter(getattr(probe, "layer_forms", {}).values())),  # older probes: none
        }
        rows.append(row)
        print(_line(row), file=sys.stderr, flush=True)
    return rows


def probe_step_memory(size: str, rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Peak memory of one plain and one measuring step per K (after the timings: see ``exact_rss_peaks``)."""
    _, opt, batch, probe = setup(size, args)
    for row in rows:
        k = row["K"]
        groups = draw_groups(k, args)
        for measure in (False, True, False, True):
            with PeakMemory(args.device) as peak:
                probe.backward(batch, groups, k, causal_lm_loss, measure=measure)
                opt.step()
                opt.zero_grad(set_to_none=True)
            row["measuring_peak_mb" if measure else "plain_peak_mb"] = peak.peak / 2**20  # the second of each


def _ratio(r: tuple[float, float, float]) -> str:
    return f"{r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}]"


def _line(row: dict[str, Any]) -> str:
    return (
        f"{row['model']} K={row['K']:3d} ({row['groups_present']} present): plain {row['plain_cpu_ms']:.0f} ms CPU, "
        f"measuring {row['measuring_cpu_ms']:.0f} ms CPU; ratio CPU {_ratio(row['cpu_ratio'])}, "
        f"wall {_ratio(row['wall_ratio'])}; forms {row['forms']}"
    )


def probe_step_table(rows: list[dict[str, Any]], device: str) -> str:
    timing = "CUDA events" if device.startswith("cuda") else "wall"
    lines = [
        f"| model | params | n x T | K (present) | plain ms (CPU) | measuring ms (CPU) | CPU-time ratio [95% CI] | "
        f"{timing} ratio [95% CI] | peak MB plain / measuring | layer forms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        forms = ", ".join(f"{k} {v}" for k, v in sorted(r["forms"].items()))
        lines.append(
            f"| {r['model']} | {r['parameters'] / 1e6:.1f}M | {r['batch']}x{r['seq']} | "
            f"{r['K']} ({r['groups_present']}) | {r['plain_cpu_ms']:.0f} | {r['measuring_cpu_ms']:.0f} | "
            f"{_ratio(r['cpu_ratio'])} | "
            f"{_ratio(r['wall_ratio'])} | {r.get('plain_peak_mb', float('nan')):.0f} / "
            f"{r.get('measuring_peak_mb', float('nan')):.0f} | {forms} |"
        )
    return "\n".join(lines)


def probe_step_main(args: argparse.Namespace) -> None:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: no GPU here; nothing to measure", file=sys.stderr)
        return
    started = time.perf_counter()
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for size in args.models:
        rows.extend(probe_step_config(size, args.ks, args))
    exact = args.device.startswith("cuda") or exact_rss_peaks()
    for size in args.models:
        probe_step_memory(size, [r for r in rows if r["model"] == size], args)
    markdown = probe_step_table(rows, args.device)
    print(markdown)
    meta = {
        "mode": "measuring step / plain step",
        "device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "seconds": time.perf_counter() - started,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "memory": "CUDA max_memory_allocated over the start"
        if args.device.startswith("cuda")
        else ("peak RSS (VmHWM) over the start" if exact else "not measured"),
    }
    print(f"\n{meta['seconds']:.0f} s, load average {load_before} -> {meta['load_average_after']}", file=sys.stderr)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "args": vars(args), "rows": rows, "markdown": markdown}, indent=2))


# -- adaptive vs uniform mixing (--paired, --separate) --------------------------------------------------------------

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


def _timed_step(mixer, model, opt, batches) -> tuple[float, float]:
    """One full training step with the Mixer: (wall, CPU) seconds."""
    from gradmix_kit.experiment.model import per_example_loss

    t0, c0 = time.perf_counter(), time.process_time()
    batch = next(batches)
    mixer.backward(model, batch, per_example_loss)
    opt.step()
    opt.zero_grad(set_to_none=True)
    mixer.step()
    return time.perf_counter() - t0, time.process_time() - c0


def worker(name: str, steps: int) -> dict:
    import numpy as np

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mixer, model, opt, batches = _setup(name)
    times = [_timed_step(mixer, model, opt, batches)[0] for _ in range(steps + 10)][10:]  # skip warm-up steps
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

    arms = {name: _setup(name) for name in PAIRS[pair]}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in arms}
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
                        (measured if measuring else plain).append(dt[1])
    base, method = (float(np.sum([t[0] for t in times[n]])) for n in PAIRS[pair])
    base_cpu, method_cpu = (float(np.sum([t[1] for t in times[n]])) for n in PAIRS[pair])
    return {
        "pair": pair,
        "baseline_ms": 1000 * base / len(times[PAIRS[pair][0]]),
        "method_ms": 1000 * method / len(times[PAIRS[pair][1]]),
        "ratio": method / base,
        "cpu_ratio": method_cpu / base_cpu,
        "measuring_step_cost_cpu": float(np.mean(measured) / np.median(plain)),
        "steps_per_arm": len(plain) + len(measured),
    }


def paired_main(args: argparse.Namespace) -> None:
    results = []
    heads = ("uniform ms", "method ms", "wall ratio", "CPU ratio", "measuring")
    print(f"{'pair':24s} " + " ".join(f"{h:>10s}" for h in heads))
    for pair in args.only or PAIRS:
        r = paired(pair, args.steps)
        results.append(r)
        print(
            f"{pair:24s} {r['baseline_ms']:10.1f} {r['method_ms']:10.1f} {r['ratio']:10.3f} {r['cpu_ratio']:10.3f} "
            f"{r['measuring_step_cost_cpu']:10.2f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "threads": torch.get_num_threads(), "paired": results}, fh, indent=2)


def separate_main(args: argparse.Namespace) -> None:
    names = args.only or list(CONFIGS)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(args.reps):
        for name in names:
            command = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps), "--threads"]
            out = subprocess.run([*command, str(args.threads)], capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"rep {rep} {name}: {runs[name][-1]['mean_step_s'] * 1000:.1f} ms/step", file=sys.stderr)
    summary: dict[str, dict[str, Any]] = {}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default mode)")
    parser.add_argument("--models", nargs="+", default=["1M", "10M"], choices=list(MODELS), help="default mode")
    parser.add_argument("--ks", nargs="+", type=int, default=[4, 16, 64, 256], help="numbers of groups")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved plain/measuring rounds per K")
    parser.add_argument("--batch", type=int, default=16, help="examples per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per example")
    parser.add_argument("--paired", action="store_true", help="interleaved uniform-vs-method Mixer runs")
    parser.add_argument("--separate", action="store_true", help="one subprocess per Mixer configuration")
    parser.add_argument("--steps", type=int, default=200, help="--paired / --separate: timed steps")
    parser.add_argument("--reps", type=int, help="--separate: rounds (given alone, it selects --separate)")
    parser.add_argument("--only", nargs="*", help="--paired / --separate: subset of names")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps)))
    elif args.paired:
        paired_main(args)
    elif args.separate or args.reps is not None:
        args.reps = 3 if args.reps is None else args.reps
        separate_main(args)
    else:
        probe_step_main(args)


if __name__ == "__main__":
    main()
