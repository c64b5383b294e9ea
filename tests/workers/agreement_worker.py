"""Launched by torchrun (2 processes, gloo). Two modes:

``agree OUT``: every rank builds one Mixer per case, rank 1 changing one setting (batch size, domain names, sizes,
method, fixed weights, seed, accumulation, method parameter) or rank 0 finding its run folder used; each rank writes
``OUT.rank{r}.json``: {case: "ok" or "<ErrorClass>: <message>"}.

``timeout OUT``: the process group comes from ``gradmix.distributed.init_process_group`` (timeout from
``$GRADMIX_DIST_TIMEOUT``); rank 1 hangs, rank 0's all-reduce must fail within the timeout. Rank 0 writes
``OUT.rank0.json``: {"elapsed": seconds, "error": message or None}.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from resume_worker import domains

from gradmix import Mixer
from gradmix.distributed import init_process_group
from gradmix.sources import Domain, DomainSet, DomainSource


def leave(code: int = 0) -> None:
    """Exit without C++ teardown (gloo can abort while tearing down its threads at exit)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _windows(source: DomainSource) -> np.ndarray:
    assert isinstance(source, Domain)  # DomainSet.from_arrays holds in-memory Domains
    return source.windows.numpy()


def renamed() -> DomainSet:
    base = domains()
    arrays = {("x" if name == "d2" else name): _windows(d) for name, d in zip(base.names, base.domains)}
    return DomainSet.from_arrays(arrays)


def shorter() -> DomainSet:
    base = domains()
    return DomainSet.from_arrays({name: _windows(d)[:20] for name, d in zip(base.names, base.domains)})


def agree(out: str) -> None:
    rank = dist.get_rank()
    base: dict[str, Any] = {"method": "uniform", "batch_size": 8, "seed": 3}
    cases: dict[str, dict[str, Any]] = {
        "agree": {},
        "batch_size": {"batch_size": 16},
        "domain_names": {"domains": renamed()},
        "domain_sizes": {"domains": shorter()},
        "method": {"method": "round_robin"},
        "initial_weights": {"method": "fixed", "method_params": {"weights": [0.2, 0.3, 0.5]}},
        "seed": {"seed": 4},
        "accumulation_steps": {"accumulation_steps": 2},
        "method_params": {"method": "temperature", "method_params": {"alpha": 0.3}},
        "used_folder": {},
        "agree_again": {},
    }
    results: dict[str, str] = {}
    for case, change in cases.items():
        kwargs = dict(base)
        if case == "initial_weights":
            kwargs.update({"method": "fixed", "method_params": {"weights": [0.5, 0.3, 0.2]}})
        if case == "method_params":
            kwargs.update({"method": "temperature", "method_params": {"alpha": 0.5}})
        if rank == 1:
            kwargs.update(change)
        data = kwargs.pop("domains", None) or domains()
        run_dir = f"{out}.{case}" if case == "used_folder" else None
        try:
            mixer = Mixer(data, kwargs.pop("method"), kwargs.pop("batch_size"), run_dir=run_dir, **kwargs)
            mixer.close()
            results[case] = "ok"
        except ValueError as exc:
            results[case] = f"{type(exc).__name__}: {exc}"
    with open(f"{out}.rank{rank}.json", "w") as fh:
        json.dump(results, fh)
    dist.barrier()


def hang(out: str) -> None:
    rank = dist.get_rank()
    if rank == 1:  # a hung rank: never joins the collective (it leaves once rank 0 has written its result)
        deadline = time.monotonic() + 120
        while not os.path.exists(f"{out}.rank0.json") and time.monotonic() < deadline:
            time.sleep(0.2)
        return
    started = time.monotonic()
    error = None
    try:
        dist.all_reduce(torch.ones(1))
    except Exception as exc:  # gloo: "Timed out waiting ... for recv" (the timeout reaches the collective)
        error = f"{type(exc).__name__}: {exc}"[:500]
    with open(f"{out}.rank0.json.tmp", "w") as fh:
        json.dump({"elapsed": time.monotonic() - started, "error": error}, fh)
    os.replace(f"{out}.rank0.json.tmp", f"{out}.rank0.json")


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    init_process_group("gloo")
    if mode == "agree":
        agree(out)
    else:
        hang(out)
    leave(0)


if __name__ == "__main__":
    main()
