"""gradmix inside a torchrun FSDP2 loop (``fully_shard``, gloo on CPU): PiKE (or DGA) mixes three byte-level domains.

    torchrun --standalone --nproc_per_node 2 examples/torchrun_fsdp.py --out runs/fsdp --steps 30
    torchrun --standalone --nproc_per_node 2 examples/torchrun_fsdp.py --out runs/fsdp --steps 30 --resume
    torchrun --standalone --nproc_per_node 2 examples/torchrun_fsdp.py --out runs/dga --method dga --target changelog

Every rank draws its share of the same global batch from the Mixer's sampler; on measuring steps the
``ShardedGradientProbe`` (the probe a Mixer builds for an FSDP2 model) reads per-domain statistics from the local
gradient shards and all-reduces a few scalars, so every rank computes the same weights. ``--method dga`` steers the
mix toward a target domain (``--target``, default the changelog file, which is none of the trained domains): each rank
backwards its share of a target batch, and the alignments <g_k, g_target> (Adam-preconditioned with the optimizer's
sharded second moments) are reduced as scalars too; nothing full-size is gathered. Every 10 steps a checkpoint
folder ``OUT/checkpoints/step-NNNNNN`` holds the model and optimizer shards (torch.distributed.checkpoint) and the
Mixer state; ``--resume`` continues from the newest complete one (it may be written by another number of ranks: DCP
re-shards, the sampler keeps the global batches). ``--stop-at M`` leaves right after the checkpoint of step M as if
killed. Metrics: ``OUT/metrics.jsonl`` (rank 0). A used ``--out`` without ``--resume`` is refused on every rank, and
so are ranks that disagree (domains, batch size, method, seed: the Mixer checks at construction). The process group
has gradmix's timeout (``gradmix.distributed.init_process_group``: 10 minutes, or ``$GRADMIX_DIST_TIMEOUT``
seconds), so a hung rank fails its peer instead of blocking it for torch's 30 minutes.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from _tiny_gpt import DATA_DIR, DEFAULT_DOMAINS, TinyGPT, byte_domains, per_example_loss
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from gradmix import Mixer
from gradmix.distributed import exit_rank, init_process_group
from gradmix.integrations.fsdp import (
    latest_checkpoint,
    load_sharded_checkpoint,
    save_sharded_checkpoint,
)
from gradmix.methods.pike import PiKE

CHECKPOINT_EVERY = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="run folder: checkpoints/ and metrics.jsonl")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--stop-at", type=int, default=None, help="exit right after the checkpoint of this step")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--domains", default=",".join(DEFAULT_DOMAINS))
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    parser.add_argument("--batch-size", type=int, default=12, help="global examples per step")
    parser.add_argument("--num-splits", type=int, default=2, help="global parts per domain on measuring steps")
    parser.add_argument("--trace", action="store_true", help="each rank writes OUT/trace.rank{R}.jsonl (tests)")
    parser.add_argument("--method", default="pike", choices=["pike", "dga"], help="the mixing method")
    parser.add_argument("--target", default="changelog", help="--method dga: the target domain (a file in --data-dir)")
    parser.add_argument(
        "--pike-variant",
        default="gradmix",
        choices=PiKE.variants,
        help="PiKE's variant (the tests use gradmix_v1, whose weights move within a few steps here)",
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    init_process_group("gloo")  # torch's, with gradmix's timeout
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # every rank builds the same full model, then keeps its shards
    model = TinyGPT()
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    warnings.filterwarnings("ignore", message=".*returned a view tensor")  # our loss makes no in-place change
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    domains = byte_domains(args.domains.split(","), args.data_dir)
    probe_params: dict = {"num_splits": args.num_splits}  # FSDP2: a ShardedGradientProbe
    if args.method == "dga":
        method_params: dict = {"min_weight": 0.05}
        target = byte_domains([args.target], args.data_dir).domains[0]
        probe_params["preconditioner"] = optimizer  # Adam-preconditioned alignment, from the local state shards
    else:
        method_params, target = {"variant": args.pike_variant, "min_weight": 0.05}, None
    try:  # a used --out without --resume, or ranks that disagree: the same one-line error on every rank
        mixer = Mixer(
            domains,
            args.method,
            batch_size=args.batch_size,
            method_params=method_params,
            model=model,
            probe_params=probe_params,
            target=target,
            update_every=5,
            log_every=1,
            seed=0,
            run_dir=out,
            resume=args.resume,
        )
    except ValueError as exc:
        exit_rank(2, wait_for_peers=False, message=f"rank {rank}: cannot start: {exc}")
    if args.resume:
        folder = latest_checkpoint(out)
        if folder is not None:
            try:
                load_sharded_checkpoint(folder, mixer, model, optimizer)
            except ValueError as exc:
                exit_rank(2, wait_for_peers=False, message=f"rank {rank}: cannot resume: {exc}")
            if rank == 0:
                print(f"resumed from {folder} at step {mixer.step_count} ({world} ranks)")
        else:
            mixer.truncate_metrics()

    trace = open(out / f"trace.rank{rank}.jsonl", "a") if args.trace else None  # noqa: SIM115 (closed by exit)
    for batch in mixer.batches(max(args.steps - mixer.step_count, 0)):
        measured = mixer.backward(model, batch, per_example_loss)  # forward/backward (+ statistics when due)
        optimizer.step()
        optimizer.zero_grad()
        weights = mixer.step()
        step = mixer.step_count
        if trace is not None:
            stats = None
            if measured is not None and measured.grad_sq_norm is not None and measured.grad_var is not None:
                stats = {"grad_sq_norm": measured.grad_sq_norm.tolist(), "grad_var": measured.grad_var.tolist()}
                if measured.target_alignment is not None:
                    stats["target_alignment"] = measured.target_alignment.tolist()
                    stats["target_loss"] = measured.target_loss
            trace.write(
                json.dumps(
                    {
                        "step": step,
                        "weights": weights.tolist(),
                        "stats": stats,
                        "batch": list(zip(batch["domain"].tolist(), batch["index"].tolist())),
                    }
                )
                + "\n"
            )
            trace.flush()
        if step % CHECKPOINT_EVERY == 0:
            save_sharded_checkpoint(out, mixer, model, optimizer)
        if args.stop_at is not None and step == args.stop_at:
            exit_rank(0, wait_for_peers=False)  # as if killed right after the checkpoint
    mixer.close()  # flushes the writers and releases the run folder's lock
    if rank == 0:
        print(f"done: {mixer.step_count} steps, weights {dict(zip(mixer.names, mixer.weights.round(4).tolist()))}")
    exit_rank()


if __name__ == "__main__":
    main()
