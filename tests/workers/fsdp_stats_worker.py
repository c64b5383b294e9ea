"""Launched by torchrun (gloo): ShardedGradientProbe on a fully_shard-ed tiny GPT vs a one-process computation.

    worker.py OUT [MESH [SCENARIOS]]    MESH: "W" (default: a 1-D mesh of all W ranks, FSDP) or "RxS" (HSDP: R
                                        replicas of S shards, R * S ranks); SCENARIOS: comma-separated (default all)

Rank 0 writes OUT.json with, per scenario, the FSDP measurement, the plain GradientProbe's measurement in one process
(float64, full parameters) over the same global batch (example i of rank r at position i * world + r) and the same
global target batch, and the largest relative difference between the FSDP training gradient (gathered here, for the
test only) and the one-process one. Every rank writes OUT.{scenario}.rank{R}.json with its measurement and the
weights of one DGA update from it (identical on all ranks). The target scenarios measure DGA's target alignment;
"target_adam" also preconditions it with AdamW's second moments (state made by a step with lr=0, so the parameters
stay; the reference's optimizer gets the same state, gathered), over two accumulated micro-batches, with a
``backward_fn`` that scales the loss (the probe divides it out).
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from _tiny_gpt import TinyGPT, byte_domains, per_example_loss

from gradmix import make_method
from gradmix.probe import GradientProbe, ShardedGradientProbe
from gradmix.sampler import MixtureSampler
from gradmix.stats import Measurement

B = 16  # global batch
TB = 8  # global target batch
TARGET_DOMAIN = 2  # the target batch: windows of this domain, drawn by their own sampler
SCALE = 8.0  # "target_adam": the backward_fn multiplies every loss by this
# name -> (global parts per domain, micro-batches per step, target batch, Adam preconditioning + scaling backward)
SCENARIOS = {
    "single": (2, 1, False, False),
    "per_sample": (8, 1, False, False),
    "accumulated": (3, 2, False, False),
    "target": (2, 1, True, False),
    "target_adam": (3, 2, True, True),
}


def _grad(p: torch.nn.Parameter) -> torch.Tensor:
    assert p.grad is not None
    return p.grad


def _full_grad(p: torch.nn.Parameter) -> torch.Tensor:
    grad = p.grad
    assert isinstance(grad, DTensor)  # a fully_shard-ed parameter's gradient is sharded
    return grad.full_tensor()


def as_dict(m: Measurement) -> dict:
    """The statistics compared (and, with a target batch, the alignment and the target loss)."""
    assert m.grad_sq_norm is not None and m.grad_var is not None and m.gram is not None
    out = {
        "grad_sq_norm": m.grad_sq_norm.tolist(),
        "grad_var": m.grad_var.tolist(),
        "gram": m.gram.tolist(),
        "examples": m.examples.tolist(),
        "loss_sums": m.loss_sums()[0].tolist(),
    }
    if m.target_alignment is not None:
        out["target_alignment"] = m.target_alignment.tolist()
        out["target_loss"] = m.target_loss
    return out


def dga_weights(m: Measurement) -> list[float]:
    """One DGA update (default settings) from the measurement."""
    return make_method("dga", 3).update(m.to_stats(step=1, batch_size=B)).tolist()


def reference(
    ref: torch.nn.Module, micro: list[dict], target: dict | None, optimizer, splits: int, solo
) -> tuple[dict, torch.Tensor]:
    """The plain GradientProbe in this one process over the global micro-batches (and the global target batch);
    ``solo`` is a process group holding only this rank, so its collectives stay local."""
    probe = GradientProbe(ref, num_splits=splits, gram=True, preconditioner=optimizer, process_group=solo)
    m = None
    for j, mb in enumerate(micro):
        m = probe.backward(
            mb,
            mb["domain"],
            3,
            per_example_loss,
            measure=True,
            target_batch=target if j == 0 else None,
            global_batch_size=B,
            final=j == len(micro) - 1,
        )
    grad = torch.cat([_grad(p).reshape(-1) for p in ref.parameters()])
    assert m is not None
    return {**as_dict(m), "dga_weights": dga_weights(m) if target is not None else None}, grad


def adam_state(model: torch.nn.Module, batch: dict) -> torch.optim.Optimizer:
    """AdamW with second moments from one step on ``batch`` at lr=0 (the parameters do not move); .grad zeroed."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    per_example_loss(model, batch).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def same_state(ref: torch.nn.Module, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> torch.optim.Optimizer:
    """An AdamW over ``ref`` (float64) holding the FSDP optimizer's state, gathered (collective: every rank calls)."""
    full = []
    for p in model.parameters():
        state = optimizer.state[p]
        full.append((state["step"].clone(), state["exp_avg_sq"].full_tensor().double()))
    ref_optimizer = torch.optim.AdamW(ref.parameters(), lr=0.0)
    for p, (step, second) in zip(ref.parameters(), full):
        ref_optimizer.state[p] = {"step": step, "exp_avg": torch.zeros_like(p), "exp_avg_sq": second}
    return ref_optimizer


def mesh_for(spec: str, world: int):
    """A 1-D mesh of all ranks ("W"), or an HSDP mesh "RxS" (replicate, shard)."""
    if "x" not in spec:
        assert int(spec) == world
        return init_device_mesh("cpu", (world,))
    replicas, shards = (int(v) for v in spec.split("x"))
    assert replicas * shards == world
    return init_device_mesh("cpu", (replicas, shards), mesh_dim_names=("replicate", "shard"))


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = sys.argv[2] if len(sys.argv) > 2 else str(world)
    names = sys.argv[3].split(",") if len(sys.argv) > 3 else list(SCENARIOS)
    domains = byte_domains()
    solo = dist.new_group([0])  # collective: every rank creates it; rank 0's one-process reference uses it
    results = {}
    for name in names:
        splits, accumulation, with_target, adam = SCENARIOS[name]
        torch.manual_seed(0)
        model = TinyGPT()
        ref = copy.deepcopy(model).double()
        mesh = mesh_for(spec, world)
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        sampler = MixtureSampler(domains.sizes, B, [0.55, 0.3, 0.15], seed=7, rank=rank, world_size=world)
        optimizer = ref_optimizer = None
        if adam:  # second moments from a first batch, then measure on the next one
            optimizer = adam_state(model, domains.gather(*sampler.next_arrays()))
            ref_optimizer = same_state(ref, optimizer, model)  # full_tensor() is a collective: every rank
        probe = ShardedGradientProbe(model, num_splits=splits, gram=True, preconditioner=optimizer)
        d, e = sampler.next_arrays()
        batch = domains.gather(d, e)
        target = None
        if with_target:  # this rank's share of a target batch from the target domain
            target_sampler = MixtureSampler(
                [domains.sizes[TARGET_DOMAIN]], TB, [1.0], seed=8, rank=rank, world_size=world
            )
            _, t = target_sampler.next_arrays()
            target = {"input_ids": domains.gather(np.full(len(t), TARGET_DOMAIN), t)["input_ids"]}
        backward_fn = (lambda loss: (loss * SCALE).backward()) if adam else None
        micro_local = [{key: value[j::accumulation] for key, value in batch.items()} for j in range(accumulation)]
        if with_target:  # an evaluation first: it leaves the root's unsharded parameters in module.parameters()
            with torch.no_grad():
                per_example_loss(model, batch)
        measurement = None
        for j, mb in enumerate(micro_local):
            measurement = probe.backward(
                mb,
                mb["domain"],
                3,
                per_example_loss,
                measure=True,
                target_batch=target if j == 0 else None,
                global_batch_size=B,
                backward_fn=backward_fn,
                final=j == accumulation - 1,
            )
        assert measurement is not None
        mine = {**as_dict(measurement), "dga_weights": dga_weights(measurement) if with_target else None}
        grads = torch.cat([_full_grad(p).reshape(-1) for p in model.parameters()]).double()
        if adam:
            grads /= SCALE  # the training gradient of the scaled loss
        gathered: list = [None] * world
        dist.all_gather_object(gathered, [{"input_ids": mb["input_ids"], "domain": mb["domain"]} for mb in micro_local])
        targets: list = [None] * world
        dist.all_gather_object(targets, target)
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
            global_target = None if target is None else {"input_ids": torch.cat([t["input_ids"] for t in targets])}
            ref_stats, ref_grad = reference(ref, micro, global_target, ref_optimizer, splits, solo)
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
