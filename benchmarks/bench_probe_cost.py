"""Cost of a measuring step over a plain step: FusedGradientProbe (one forward + one backward, module hooks) vs the
micro-batch GradientProbe, for K = 4 ... 256 groups and GPT-like models of 0.5M ... 50M parameters.

    python benchmarks/bench_probe_cost.py                 # full table (~5-10 min on 2 busy cores)
    python benchmarks/bench_probe_cost.py --quick         # ~1 min
    python benchmarks/bench_probe_cost.py --device cuda   # on a GPU machine (larger batch; CUDA peak memory)

Method. One process per run; for each (model, probe, K) the plain step and the measuring step are timed in pairs,
interleaved (plain, measuring, measuring, plain, ...), after warm-up, ``--repeats`` pairs; the report gives the median
of the per-pair ratios measuring / plain and their spread (min-max). A step = probe.backward (forward + backward) +
AdamW step + zero_grad, the same code path for both (plain: ``measure=False``). Groups: each example's group drawn
uniformly from K (so at K >= n every example is its own group). "DGA m=K" rows add a target batch of n examples and
the alignment (one extra forward/backward of the target batch, for both probes). Model: gradmix_kit's GPT (pre-LN
blocks, tied embedding/head, learned positions); the position embedding is called on arange(T), so the fused probe
leaves it out of the statistics (``uncovered="auto"``, ~0.1-1.5% of the scalars) and says so.

Peak memory (one extra plain and one extra measuring step after the timed pairs, so the sampler does not perturb the
timings). CPU: resident set size sampled every 0.5 ms by a thread (``/proc/self/statm``) during the step, minus the
RSS right before it ("peak RSS over baseline"); a coarse, allocator-dependent number (freed blocks are reused).
CUDA: ``torch.cuda.max_memory_allocated`` during the step minus the allocation before it.
FLOP ratio: matmul/attention flops of a measuring step over a plain step as counted by
``torch.utils.flop_counter.FlopCounterMode`` (deterministic; elementwise work, memory traffic and Python overhead are
not in it; the micro-batch probe reads 1.00 since its micro-passes add no flops, only small-batch inefficiency).
Timing: wall-clock ratio, and the ratio of process CPU time (``time.process_time``, all threads), which is less
sensitive to other load on a shared machine.
Results: benchmarks/results/probe_cost.json (rewritten after every row) (and a Markdown table on stdout).

``--layers``: the per-layer cost model (``gradmix.probe.products.form_costs`` / ``choose_form``) against
measurement, one weight matrix at a time (Llama-style 10M and 50M shapes, n x T tokens, K groups): for each form -
explicit per-example rows, per-group sums, token-level Gram blocks - the model's extra cost over a plain step (in ms
at the rate the plain weight-gradient matmul runs here) and transient bytes, its choice, and the measured time
(process CPU time, min over ``--repeats``) and peak memory (over the memory before; CPU: peak RSS, see
``bench_step_time.PeakMemory``) of the same code the probe runs. The explicit and per-group forms replace autograd's
weight gradient when the probe reroutes the layer (``gradmix.probe.reroute``), so their measured extra is their time
minus the plain weight gradient's; the Gram form's is its whole time. ``--no-reroute``: layers autograd keeps (tied,
autocast).

    python benchmarks/bench_probe_cost.py --layers [--ks 4 64] [--seq 64 128] [--device cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gradmix.probe import FusedGradientProbe, GradientProbe
from gradmix_kit.experiment.model import GPT, GPTConfig, per_example_loss

MODELS = {
    # name: (vocab, d_model, layers, heads, batch n, tokens T)
    "0.5M": (1024, 128, 2, 4, 16, 64),
    "5M": (4096, 256, 4, 4, 16, 64),
    "50M": (8192, 512, 14, 8, 8, 64),
}


class PeakRSS:
    """Peak resident set size (bytes) over the start value while the context runs, sampled by a thread."""

    def __init__(self, interval: float = 0.0005) -> None:
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def __enter__(self):
        self.start = self._rss()
        self.peak = self.start
        self._stop = False

        def loop():
            while not self._stop:
                self.peak = max(self.peak, self._rss())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.delta = self.peak - self.start


def build(name: str, device: str, batch_scale: int):
    vocab, d, layers, heads, n, length = MODELS[name]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, context_length=length, d_model=d, n_layers=layers, n_heads=heads))
    model.to(device)
    n *= batch_scale
    gen = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, vocab, (n, length + 1), generator=gen).to(device)}
    target = {"input_ids": torch.randint(0, vocab, (n, length + 1), generator=gen).to(device)}
    return model, batch, target, n


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def one_step(model, opt, probe, batch, groups, k, measure, target, device, memory=False) -> tuple[float, float, float]:
    """(wall seconds, process CPU seconds, peak memory over baseline in bytes or NaN) of one training step."""
    sync(device)
    cuda = device.startswith("cuda")
    if cuda and memory:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    sampler = PeakRSS() if (memory and not cuda) else contextlib.nullcontext()
    with sampler:
        c0, t0 = time.process_time(), time.perf_counter()
        probe.backward(batch, groups, k, per_example_loss, measure=measure, target_batch=target if measure else None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    if not memory:
        peak = float("nan")
    elif cuda:
        peak = float(torch.cuda.max_memory_allocated() - base)
    else:
        assert isinstance(sampler, PeakRSS)
        peak = float(sampler.delta)
    return elapsed, cpu, peak


def measure_config(model_name, kind, k, dga, repeats, device, batch_scale) -> dict:
    model, batch, target, n = build(model_name, device, batch_scale)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(k)
    groups = torch.randint(0, k, (n,), generator=gen).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fused probe's note that it leaves out the position embedding
        probe = FusedGradientProbe(model) if kind == "fused" else GradientProbe(model)
        tgt = target if dga else None
        for measure in (False, True):  # warm-up (allocator, first-call coverage checks)
            one_step(model, opt, probe, batch, groups, k, measure, tgt, device)
        ratios, cpu_ratios, plain_t, meas_t = [], [], [], []
        for r in range(repeats):
            order = (False, True) if r % 2 == 0 else (True, False)
            times = {}
            for measure in order:
                times[measure] = one_step(model, opt, probe, batch, groups, k, measure, tgt, device)
            plain_t.append(times[False][0])
            meas_t.append(times[True][0])
            ratios.append(times[True][0] / times[False][0])
            cpu_ratios.append(times[True][1] / times[False][1])
        flops = {}
        for measure in (False, True):  # matmul/attention flops, counted by torch (load-independent)
            with FlopCounterMode(display=False) as counter:
                one_step(model, opt, probe, batch, groups, k, measure, tgt, device)
            flops[measure] = counter.get_total_flops()
        plain_mem = one_step(model, opt, probe, batch, groups, k, False, tgt, device, memory=True)[2]
        meas_mem = one_step(model, opt, probe, batch, groups, k, True, tgt, device, memory=True)[2]
    params = sum(p.numel() for p in model.parameters())
    return {
        "model": model_name,
        "parameters": params,
        "batch": n,
        "tokens": MODELS[model_name][5],
        "probe": kind,
        "method": "dga" if dga else "pike",
        "K": k,
        "groups_present": int(torch.unique(groups).numel()),
        "plain_ms": 1000 * statistics.median(plain_t),
        "measuring_ms": 1000 * statistics.median(meas_t),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "cpu_ratio_median": statistics.median(cpu_ratios),
        "plain_gflop": flops[False] / 1e9,
        "flop_ratio": flops[True] / max(flops[False], 1),
        "plain_peak_mb": plain_mem / 2**20,
        "measuring_peak_mb": meas_mem / 2**20,
        "probed_scalars": getattr(probe, "num_probed", 0),
        "repeats": repeats,
    }


def plan(quick: bool, device: str) -> list[tuple[str, str, int, bool, int]]:
    """(model, probe, K, dga, repeats) in run order."""
    ks = (4, 16, 64, 256)
    out = []
    if quick:
        for model in ("0.5M", "5M"):
            for k in ks:
                out.append((model, "fused", k, False, 3))
            out.append((model, "micro", 4, False, 3))
            out.append((model, "fused", 16, True, 3))
        out.append(("0.5M", "micro", 16, False, 3))
        return out
    cuda = device.startswith("cuda")
    for model in MODELS:
        big = model == "50M" and not cuda
        reps = 3
        for k in (4, 16, 256) if big else ks:
            out.append((model, "fused", k, False, reps))
        for k in (16,) if big else ks:
            out.append((model, "fused", k, True, reps))
        micro_ks = (4,) if big else ((4, 16, 64, 256) if model == "0.5M" or cuda else (4, 16))
        for k in micro_ks:
            out.append((model, "micro", k, False, reps))
        for k in () if big else micro_ks[:2]:
            out.append((model, "micro", k, True, reps))
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| model | params | n x T | method | K (present) | probe | plain ms | measuring ms | wall ratio median "
        "[min-max] | CPU-time ratio | FLOP ratio | peak MB plain / measuring |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        method = "PiKE stats" if r["method"] == "pike" else "DGA (+target)"
        lines.append(
            f"| {r['model']} | {r['parameters'] / 1e6:.2f}M | {r['batch']}x{r['tokens']} | {method} | "
            f"{r['K']} ({r['groups_present']}) | {r['probe']} | {r['plain_ms']:.0f} | {r['measuring_ms']:.0f} | "
            f"{r['ratio_median']:.2f} [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}] | {r['cpu_ratio_median']:.2f} | "
            f"{r['flop_ratio']:.2f} | {r['plain_peak_mb']:.0f} / {r['measuring_peak_mb']:.0f} |"
        )
    return "\n".join(lines)


# -- per-layer: the cost model against measurement (--layers) ---------------------------------------------------------

LAYERS = {
    # name: (rows, cols) of the weight: Llama-style 10M (d 256, MLP 688, vocab 8192) and 50M (d 512, MLP 1376, 16384)
    "10M attention 256x256": (256, 256),
    "10M mlp up 688x256": (688, 256),
    "10M mlp down 256x688": (256, 688),
    "10M lm head 8192x256": (8192, 256),
    "50M attention 512x512": (512, 512),
    "50M mlp up 1376x512": (1376, 512),
    "50M lm head 16384x512": (16384, 512),
}


def layer_forms(terms, grouping, rows, cols, n, device, block_bytes, reroute):
    """The probe's per-layer code for each form (gradmix.probe.fused: _process, _sink, _fold_rows), as callables."""
    from gradmix.probe.products import (
        add_gram_blocks,
        example_blocks,
        example_norms,
        explicit_block_bytes,
        explicit_reductions,
        group_row_blocks,
        weight_row_blocks,
    )

    dtype = terms[0][2].dtype
    grad = torch.empty(rows, cols, dtype=dtype, device=device)

    def explicit():
        budget = explicit_block_bytes(block_bytes, n, grouping.rows)
        for per, span in weight_row_blocks(terms, n, rows, cols, dtype, device, budget):
            _, sums, _, column_sums = explicit_reductions(per, grouping, False, reroute)
            if sums is not per:
                torch.linalg.vector_norm(sums, dim=1)
            if column_sums is not None:
                grad[span].view(-1).copy_(column_sums)

    def groups():
        if grouping.multi.numel():
            example_norms(terms, grouping.multi, n, rows, cols, dtype, device, block_bytes)
        for sums, span in group_row_blocks(terms, grouping, rows, cols, dtype, device, block_bytes):
            torch.linalg.vector_norm(sums, dim=1)
            if reroute:
                torch.sum(sums, dim=0, out=grad[span].view(-1))

    blocks = example_blocks(grouping_cpu(grouping), n, False, device)
    m = torch.zeros(n + 1, n + 1, dtype=torch.float64, device=device)

    def gram():
        add_gram_blocks(m, terms, blocks, device)

    return {"explicit": explicit, "groups": groups, "gram": gram}, blocks


def grouping_cpu(grouping) -> torch.Tensor:
    """The group id of each example (CPU), from a Grouping."""
    return torch.tensor(grouping.present)[grouping.slot.cpu()]


def layer_rows(args) -> list[dict]:
    from gradmix.probe.products import Grouping, choose_form, form_costs

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    block_bytes = 64 * 1024 * 1024 if cuda else 2 * 1024 * 1024
    chunk_bytes = 64 * 1024 * 1024
    rows_out = []
    chosen = {
        name: shape for name, shape in LAYERS.items() if not args.only_layer or any(p in name for p in args.only_layer)
    }
    for name, (rows, cols) in chosen.items():
        for seq in args.seq:
            for k in args.ks:
                n = args.batch
                gen = torch.Generator().manual_seed(k)
                groups = torch.randint(0, k, (n,), generator=gen)
                grouping = Grouping(groups, device)
                a = torch.randn(n, seq, cols, generator=gen).to(device)
                g = torch.randn(n, seq, rows, generator=gen).to(device)
                terms = [("linear", a, g)]
                forms, blocks = layer_forms(terms, grouping, rows, cols, n, device, block_bytes, not args.no_reroute)
                costs = form_costs(
                    n,
                    terms,
                    rows,
                    cols,
                    blocks,
                    False,
                    chunk_bytes,
                    grouping=grouping,
                    weight_grad_from_blocks=not args.no_reroute,
                    block_bytes=block_bytes,
                )
                choice = choose_form(costs, chunk_bytes)

                def weight_grad(a=a, g=g, rows=rows, cols=cols):
                    return g.reshape(-1, rows).T @ a.reshape(-1, cols)

                timed = {"weight_grad": weight_grad, **forms}
                times: dict[str, list[float]] = {key: [] for key in timed}
                for _ in range(args.repeats):
                    for key, fn in timed.items():
                        sync(args.device)
                        c0 = time.perf_counter() if cuda else time.process_time()
                        fn()
                        sync(args.device)
                        times[key].append((time.perf_counter() if cuda else time.process_time()) - c0)
                best = {key: min(v) * 1000 for key, v in times.items()}
                rate = 2.0 * n * seq * rows * cols / (best["weight_grad"] / 1000)  # flop/s of the plain matmul
                replaced = 0.0 if args.no_reroute else best["weight_grad"]
                measured = {
                    "explicit": best["explicit"] - replaced,
                    "groups": best["groups"] - replaced,
                    "gram": best["gram"],
                }
                row = {
                    "layer": name,
                    "rows": rows,
                    "cols": cols,
                    "batch": n,
                    "seq": seq,
                    "K": k,
                    "groups_present": grouping.rows,
                    "shared_examples": int(grouping.multi.numel()),
                    "reroute": not args.no_reroute,
                    "weight_grad_ms": best["weight_grad"],
                    "model_ms": {f: 1000 * c.flops / rate for f, c in costs.items()},
                    "model_mb": {f: c.bytes / 2**20 for f, c in costs.items()},
                    "model_choice": choice,
                    "measured_extra_ms": measured,
                    "measured_best": min(measured, key=lambda f: measured[f]),
                    "fits_chunk": {f: f == "explicit" or c.bytes <= chunk_bytes for f, c in costs.items()},
                }
                rows_out.append(row)
                print(
                    f"{name} T={seq} K={k}: model {choice} "
                    + ", ".join(f"{f} {row['model_ms'][f]:.1f}" for f in costs)
                    + " | measured "
                    + ", ".join(f"{f} {measured[f]:.1f}" for f in measured)
                    + f" (weight grad {best['weight_grad']:.1f} ms)",
                    file=sys.stderr,
                    flush=True,
                )
    return rows_out


def layer_memory(rows_out: list[dict], args) -> None:
    """Peak memory of each form, after all timings (``bench_step_time.exact_rss_peaks`` changes the allocator)."""
    from bench_step_time import PeakMemory, exact_rss_peaks

    from gradmix.probe.products import Grouping

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda and not exact_rss_peaks():
        return
    block_bytes = 64 * 1024 * 1024 if cuda else 2 * 1024 * 1024
    for row in rows_out:
        n, seq, rows, cols = row["batch"], row["seq"], row["rows"], row["cols"]
        gen = torch.Generator().manual_seed(row["K"])
        groups = torch.randint(0, row["K"], (n,), generator=gen)
        grouping = Grouping(groups, device)
        a = torch.randn(n, seq, cols, generator=gen).to(device)
        g = torch.randn(n, seq, rows, generator=gen).to(device)
        forms, _ = layer_forms([("linear", a, g)], grouping, rows, cols, n, device, block_bytes, row["reroute"])
        peaks = {}
        for key, fn in forms.items():
            fn()  # first call: allocations that stay (the weight gradient buffer is allocated outside)
            with PeakMemory(args.device) as peak:
                fn()
            peaks[key] = peak.peak / 2**20
        row["measured_mb"] = peaks


def layer_table(rows_out: list[dict]) -> str:
    forms = ("explicit", "groups", "gram")
    lines = [
        "| layer | n x T | K (present, shared) | model extra ms: explicit / groups / gram | model choice | measured "
        "extra ms: explicit / groups / gram | measured best | model MB: explicit / groups / gram | measured MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows_out:
        mb = r.get("measured_mb", {})
        lines.append(
            f"| {r['layer']} | {r['batch']}x{r['seq']} | {r['K']} ({r['groups_present']}, {r['shared_examples']}) | "
            + " / ".join(f"{r['model_ms'][f]:.1f}" for f in forms)
            + f" | {r['model_choice']} | "
            + " / ".join(f"{r['measured_extra_ms'][f]:.1f}" for f in forms)
            + f" | {r['measured_best']} | "
            + " / ".join(f"{r['model_mb'][f]:.0f}" + ("" if r["fits_chunk"][f] else "*") for f in forms)
            + " | "
            + " / ".join(f"{mb.get(f, float('nan')):.0f}" for f in forms)
            + " |"
        )
    lines.append("")
    lines.append("(* over chunk_bytes: the model never picks it)")
    return "\n".join(lines)


def layers_main(args) -> None:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: no GPU here; nothing to measure", file=sys.stderr)
        return
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows_out = layer_rows(args)
    layer_memory(rows_out, args)
    markdown = layer_table(rows_out)
    print(markdown)
    agree = sum(r["model_choice"] == r["measured_best"] for r in rows_out)
    print(f"\nmodel choice = measured best in {agree} of {len(rows_out)} cases", file=sys.stderr)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"device": args.device, "threads": args.threads, "torch": torch.__version__}
        meta["seconds"] = time.perf_counter() - started
        out.write_text(json.dumps({"meta": meta, "rows": rows_out, "markdown": markdown}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two small models, fewer configurations (~1 min)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2; --layers: 1)")
    parser.add_argument("--batch-scale", type=int, default=None, help="multiply the batch (default 1; 4 on cuda)")
    parser.add_argument("--only-model", nargs="*", help="subset of model names")
    parser.add_argument("--json", default=None, help="results file (default results/probe_cost.json; --layers: none)")
    parser.add_argument("--layers", action="store_true", help="the per-layer cost model against measurement")
    parser.add_argument("--ks", nargs="+", type=int, default=[4, 16, 64, 256], help="--layers: numbers of groups")
    parser.add_argument("--seq", nargs="+", type=int, default=[64, 128], help="--layers: tokens per example")
    parser.add_argument("--batch", type=int, default=16, help="--layers: examples")
    parser.add_argument("--repeats", type=int, default=5, help="--layers: timings per form (the minimum counts)")
    parser.add_argument("--only-layer", nargs="*", help="--layers: subset of layer names (substring match)")
    parser.add_argument("--no-reroute", action="store_true", help="--layers: autograd keeps the weight gradient")
    args = parser.parse_args()
    if args.layers:
        args.threads = 1 if args.threads is None else args.threads
        layers_main(args)
        return
    args.threads = 2 if args.threads is None else args.threads
    if args.json is None:
        args.json = str(Path(__file__).parent / "results" / "probe_cost.json")
    torch.set_num_threads(args.threads)
    batch_scale = args.batch_scale or (4 if args.device.startswith("cuda") else 1)
    rows = []
    started = time.perf_counter()
    for model, kind, k, dga, reps in plan(args.quick, args.device):
        if args.only_model and model not in args.only_model:
            continue
        row = measure_config(model, kind, k, dga, reps, args.device, batch_scale)
        rows.append(row)
        _write(args, rows, started)
        print(
            f"[{time.perf_counter() - started:6.0f}s] {model} {kind:5s} {row['method']} K={k:3d}: "
            f"ratio {row['ratio_median']:.2f} [{row['ratio_min']:.2f}-{row['ratio_max']:.2f}] "
            f"cpu {row['cpu_ratio_median']:.2f} flops {row['flop_ratio']:.2f} "
            f"plain {row['plain_ms']:.0f} ms, peak {row['plain_peak_mb']:.0f}/{row['measuring_peak_mb']:.0f} MB",
            file=sys.stderr,
            flush=True,
        )
    markdown = _write(args, rows, started)
    print(markdown)
    print(f"\nwrote {args.json} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)


def _write(args, rows: list[dict], started: float) -> str:
    markdown = table(rows)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": args.device,
        "threads": args.threads,
        "quick": args.quick,
        "torch": torch.__version__,
        "seconds": time.perf_counter() - started,
        "load_average": os.getloadavg(),
        "memory": "CUDA max_memory_allocated delta" if args.device.startswith("cuda") else "sampled RSS peak delta",
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows, "markdown": markdown}, indent=2))
    return markdown


if __name__ == "__main__":
    main()
