"""DataLoader throughput: ``mixer.dataloader()`` against a plain torch ``DataLoader`` over the same memory-mapped files.

Run: python benchmarks/bench_dataloader.py [--quick] [--out benchmarks/results/dataloader.json]

K ``.bin`` token files (``--dtype`` uint16 or int32, ``--tokens`` in all, window T) are written to a temp dir.
"plain" is the loader a user would write without gradmix: a map-style dataset whose ``__getitem__`` slices one window
out of the memmap, random order (``RandomSampler``: one permutation after another), the same batch size, the default
collate. "mixer" is ``Mixer(..., "uniform").dataloader()`` over ``DomainSet.from_token_files`` of the same files.
Both are timed with ``num_workers`` 0 and 2, interleaved (plain, mixer, plain, mixer, ...) over several repeats, so
load from other jobs on the machine hits both alike.

Rates are batches per wall second and batches per CPU second (main process plus its workers, from /proc). The ratio
is mixer / plain of the medians. The machine is shared: the load average (``os.getloadavg()``) is recorded before
and after every measurement and printed beside the numbers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from gradmix import Mixer
from gradmix.sources import DomainSet

_TICK = os.sysconf("SC_CLK_TCK")


class PlainWindows(Dataset):
    """The straightforward baseline: example i is window (i mod n_d) of file d, sliced out of its memmap."""

    def __init__(self, paths: list[Path], window: int, dtype: str) -> None:
        self.paths, self.window, self.dtype = paths, window, np.dtype(dtype)
        self.per_file = [(p.stat().st_size // self.dtype.itemsize - 1) // window for p in paths]
        self.starts = np.cumsum([0, *self.per_file])
        self._mm: list[np.memmap] | None = None  # opened per process, like TokenFileDomain

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._mm is None:
            self._mm = [np.memmap(p, dtype=self.dtype, mode="r") for p in self.paths]
        d = int(np.searchsorted(self.starts, i, side="right")) - 1
        j = i - int(self.starts[d])
        return torch.from_numpy(self._mm[d][j * self.window : j * self.window + self.window + 1].astype(np.int64))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_mm": None}


def _cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the given processes (workers), from /proc."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / _TICK


def measure(loader: DataLoader, batches: int, warmup: int) -> dict[str, float]:
    """Batches/s over ``batches`` batches after ``warmup`` (worker start-up and the first prefetch excluded)."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    workers = [w.pid for w in getattr(it, "_workers", [])]
    load0 = os.getloadavg()[0]
    c0, w0, t0 = time.process_time(), _cpu_seconds(workers), time.perf_counter()
    for _ in range(batches):
        next(it)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0 + _cpu_seconds(workers) - w0
    load1 = os.getloadavg()[0]
    del it
    return {
        "batches_per_s": batches / wall,
        "batches_per_cpu_s": batches / cpu if cpu > 0 else float("nan"),
        "wall_s": wall,
        "cpu_s": cpu,
        "load1": (load0 + load1) / 2,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--tokens", type=int, default=4_000_000, help="tokens in all files together")
    ap.add_argument("--domains", type=int, default=8)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--dtype", choices=["uint16", "int32"], default="uint16")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=600, help="timed batches per measurement")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--quick", action="store_true", help="fewer batches and repeats (a smoke run)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dataloader.json")
    args = ap.parse_args()
    if args.quick:
        args.batches, args.repeats = 100, 2
    torch.set_num_threads(1)
    warmup = 20

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        paths = []
        for k in range(args.domains):
            path = Path(tmp) / f"d{k}.bin"
            rng.integers(0, 50_000, args.tokens // args.domains, dtype=args.dtype).tofile(path)
            paths.append(path)
        plain_ds = PlainWindows(paths, args.window, args.dtype)
        domains = DomainSet.from_token_files({p.stem: p for p in paths}, args.window, dtype=args.dtype)
        mixer = Mixer(domains, "uniform", args.batch_size, seed=0, log_every=10**9)

        def loader(kind: str, workers: int) -> DataLoader:
            extra: dict[str, Any] = {"num_workers": workers}
            if kind == "plain":  # random windows; permutation after permutation, as long as the measurement needs
                draws = (warmup + args.batches + 8) * args.batch_size
                order = RandomSampler(plain_ds, num_samples=draws, generator=torch.Generator().manual_seed(0))
                return DataLoader(plain_ds, batch_size=args.batch_size, sampler=order, **extra)
            return mixer.dataloader(**extra)

        runs: dict[str, list[dict[str, float]]] = {}
        for rep, workers, kind in itertools.product(range(args.repeats), args.workers, ("plain", "mixer")):
            r = measure(loader(kind, workers), args.batches, warmup)
            runs.setdefault(f"{kind}/{workers}", []).append(r)
            print(
                f"rep {rep} workers={workers} {kind:5s}: {r['batches_per_s']:8.1f} batches/s wall, "
                f"{r['batches_per_cpu_s']:8.1f} per CPU-s, load {r['load1']:.2f}",
                flush=True,
            )

    rows = []
    for workers in args.workers:
        med = {
            kind: {
                key: statistics.median(r[key] for r in runs[f"{kind}/{workers}"])
                for key in ("batches_per_s", "batches_per_cpu_s", "load1")
            }
            for kind in ("plain", "mixer")
        }
        paired = [
            m["batches_per_s"] / p["batches_per_s"]
            for p, m in zip(runs[f"plain/{workers}"], runs[f"mixer/{workers}"], strict=True)
        ]
        rows.append(
            {
                "num_workers": workers,
                "plain_batches_per_s": med["plain"]["batches_per_s"],
                "mixer_batches_per_s": med["mixer"]["batches_per_s"],
                "ratio_wall": med["mixer"]["batches_per_s"] / med["plain"]["batches_per_s"],
                "ratio_wall_paired_min": min(paired),
                "plain_batches_per_cpu_s": med["plain"]["batches_per_cpu_s"],
                "mixer_batches_per_cpu_s": med["mixer"]["batches_per_cpu_s"],
                "ratio_cpu": med["mixer"]["batches_per_cpu_s"] / med["plain"]["batches_per_cpu_s"],
                "load1_median": statistics.median(
                    r["load1"] for key in runs if key.endswith(f"/{workers}") for r in runs[key]
                ),
            }
        )

    print(
        f"\nK={args.domains} files, {args.tokens:,} {args.dtype} tokens, T={args.window}, batch {args.batch_size}, "
        f"{args.batches} batches x {args.repeats} repeats (medians); {os.cpu_count()} CPUs\n"
    )
    print(
        "| num_workers | plain batches/s | mixer batches/s | ratio | min paired ratio | plain /CPU-s | mixer /CPU-s "
        "| ratio (CPU) | load avg (1 min) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['num_workers']} | {r['plain_batches_per_s']:,.0f} | {r['mixer_batches_per_s']:,.0f} | "
            f"{r['ratio_wall']:.2f} | {r['ratio_wall_paired_min']:.2f} | {r['plain_batches_per_cpu_s']:,.0f} | "
            f"{r['mixer_batches_per_cpu_s']:,.0f} | {r['ratio_cpu']:.2f} | {r['load1_median']:.2f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "platform": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
        "rows": rows,
        "runs": runs,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
