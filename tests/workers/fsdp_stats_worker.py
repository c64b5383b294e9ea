"""Launched by torchrun (gloo): ShardedGradientProbe on a fully_shard-ed tiny GPT vs a one-process computation.

Rank 0 writes OUT.json with, per scenario, the FSDP measurement, the plain GradientProbe's measurement in one process
(float64, full parameters) over the same global batch (example i of rank r at position i * world + r), and the largest
relative difference between the FSDP training gradient (gathered here, for the test only) and the one-process one.
Every rank writes OUT.{scenario}.rank{R}.json with its measurement (identical on all ranks).
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from _tiny_gpt import TinyGPT, byte_domains, per_example_loss

from gradmix.probe import GradientProbe, ShardedGradientProbe
from gradmix.sampler import MixtureSampler

B = 16  # global batch


def _grad(p: torch.nn.Parameter) -> torch.Tensor:
    assert p.grad is not None
    return p.grad


def _full_grad(p: torch.nn.Parameter) -> torch.Tensor:
    grad = p.grad
    assert isinstance(grad, DTensor)  # a fully_shard-ed parameter's gradient is sharded
    return grad.full_tensor()


def reference(ref: torch.nn.Module, micro: list[dict], splits: int, solo) -> tuple[dict, torch.Tensor]:
    """The plain GradientProbe in this one process over the global micro-batches;
    ``solo`` is a process group holding only this rank, so its collectives stay local."""
    probe = GradientProbe(ref, num_splits=splits, gram=True, process_group=solo)
    m = None
    for j, mb in enumerate(micro):
        m = probe.backward(
            mb, mb["domain"], 3, per_example_loss, measure=True, global_batch_size=B, final=j == len(micro) - 1
        )
    grad = torch.cat([_grad(p).reshape(-1) for p in ref.parameters()])
    assert m is not None and m.grad_sq_norm is not None and m.grad_var is not None and m.gram is not None
    return {
        "grad_sq_norm": m.grad_sq_norm.tolist(),
        "grad_var": m.grad_var.tolist(),
        "gram": m.gram.tolist(),
        "examples": m.examples.tolist(),
        "loss_sums": m.loss_sums()[0].tolist(),
    }, grad


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    domains = byte_domains()
    solo = dist.new_group([0])  # collective: every rank creates it; rank 0's one-process reference uses it
    results = {}
    for name, splits, accumulation in (("single", 2, 1), ("per_sample", 8, 1), ("accumulated", 3, 2)):
        torch.manual_seed(0)
        model = TinyGPT()
        ref = copy.deepcopy(model).double()
        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        probe = ShardedGradientProbe(model, num_splits=splits, gram=True)
        sampler = MixtureSampler(domains.sizes, B, [0.55, 0.3, 0.15], seed=7, rank=rank, world_size=world)
        d, e = sampler.next_arrays()
        batch = domains.gather(d, e)
        micro_local = [{key: value[j::accumulation] for key, value in batch.items()} for j in range(accumulation)]
        measurement = None
        for j, mb in enumerate(micro_local):
            measurement = probe.backward(
                mb, mb["domain"], 3, per_example_loss, measure=True, global_batch_size=B, final=j == accumulation - 1
            )
        assert measurement is not None and measurement.grad_sq_norm is not None
        assert measurement.grad_var is not None and measurement.gram is not None
        mine = {
            "grad_sq_norm": measurement.grad_sq_norm.tolist(),
            "grad_var": measurement.grad_var.tolist(),
            "gram": measurement.gram.tolist(),
            "examples": measurement.examples.tolist(),
            "loss_sums": measurement.loss_sums()[0].tolist(),
        }
        grads = torch.cat([_full_grad(p).reshape(-1) for p in model.parameters()]).double()
        gathered: list = [None] * world
        dist.all_gather_object(gathered, [{"input_ids": mb["input_ids"], "domain": mb["domain"]} for mb in micro_local])
        with open(f"{out}.{name}.rank{rank}.json", "w") as fh:
            json.dump(mine, fh)
        if rank == 0:
            # the global (micro-)batch: example i of rank r at position i * world + r (rank r's share = global[r::W])
            micro = [
                {
                    key: torch.stack([gathered[r][c][key] for r in range(world)], 1).flatten(0, 1)
                    for key in ("input_ids", "domain")
                }
                for c in range(accumulation)
            ]
            ref_stats, ref_grad = reference(ref, micro, splits, solo)
            grad_rel = float((grads - ref_grad).abs().max() / ref_grad.abs().max())
            one = MixtureSampler(domains.sizes, B, [0.55, 0.3, 0.15], seed=7).next_arrays()  # world_size=1
            same = torch.equal(torch.cat([mb["input_ids"] for mb in micro]), domains.gather(*one)["input_ids"])
            results[name] = {
                "fsdp": mine,
                "reference": ref_stats,
                "grad_max_rel_diff": grad_rel,
                "global_batch_is_one_process_batch": bool(same) if accumulation == 1 else None,
            }
        dist.barrier()
    if rank == 0:
        Path(f"{out}.json").write_text(json.dumps(results))
    dist.barrier()  # see ddp_worker.py: destroy the group, then leave without the interpreter's finalisation
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
