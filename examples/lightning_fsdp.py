"""gradmix inside a Lightning Trainer with FSDP2: ``ModelParallelStrategy`` + ``fully_shard``, 2 CPU processes (gloo).

    torchrun --standalone --nproc_per_node 2 examples/lightning_fsdp.py --out runs/litfsdp --steps 30
    torchrun --standalone --nproc_per_node 2 examples/lightning_fsdp.py --out runs/litfsdp --steps 30 --resume
    torchrun --standalone --nproc_per_node 2 examples/lightning_fsdp.py --out runs/dga --method dga --target changelog

(``python examples/lightning_fsdp.py ...`` works too: Lightning then starts the second rank itself.)

Lightning's FSDP2 strategy is ``ModelParallelStrategy``: the module's ``configure_model`` applies ``fully_shard`` on
the strategy's data-parallel mesh, so every parameter is a sharded ``DTensor``. The ``MixingCallback`` builds its
Mixer once the model is sharded (``on_fit_start``), so its probe is the ``ShardedGradientProbe``: on measuring steps
it reads per-domain statistics from the local gradient shards and all-reduces a few scalars; every rank computes
the same weights. ``--method dga`` steers the mix toward ``--target`` (default the changelog file, which is none of
the trained domains). Checkpoints are Lightning's sharded ones (``OUT/checkpoints/step-NNNNNN.ckpt/``, a folder of
torch.distributed.checkpoint shards plus ``meta.pt``, which carries the Mixer's state), every 10 steps, with a
``COMPLETE`` marker written after the whole folder is on disk; ``--resume`` continues from the newest complete one.
``--stop-at M`` leaves right after the checkpoint of step M as if killed. Metrics: ``OUT/metrics.jsonl`` (rank 0).

Lightning's ``FSDPStrategy`` is FSDP1 (flat parameters, CUDA only): loss-only methods run under it, gradient methods
are refused with a one-line error pointing here. Tensor parallelism (``tensor_parallel_size > 1``) is refused too:
every rank draws its own share of the batch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import warnings
from pathlib import Path

import lightning.pytorch as L
import torch
from _tiny_gpt import DATA_DIR, DEFAULT_DOMAINS, TinyGPT, byte_domains, per_example_loss
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

from gradmix.distributed import default_timeout, exit_rank
from gradmix.integrations.lightning import MixingCallback, MixingModuleMixin
from gradmix.methods.pike import PiKE

CHECKPOINT_EVERY = 10
MARKER = "COMPLETE"


class LitGPT(MixingModuleMixin, L.LightningModule):
    def __init__(self, trace: Path | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False  # PiKE / DGA measure gradients: the probe runs the backward passes
        torch.manual_seed(0)  # every rank builds the same full model; configure_model keeps each rank's shards
        self.net = TinyGPT()
        self.trace = trace
        self.measured: dict | None = None

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]  # type: ignore[index]
        for block in self.net.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net(ids)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        assert not isinstance(opt, list)  # one optimizer
        measured = self.mixing_backward(batch, per_example_loss)  # forward/backward (+ statistics when due)
        assert measured is not None  # accumulation_steps=1: every batch is a whole step
        opt.step()
        opt.zero_grad()
        self.measured = None
        if measured.grad_sq_norm is not None and measured.grad_var is not None:
            self.measured = {"grad_sq_norm": measured.grad_sq_norm.tolist(), "grad_var": measured.grad_var.tolist()}
            if measured.target_alignment is not None:
                self.measured["target_alignment"] = measured.target_alignment.tolist()
        self.log("train_loss", measured.mean_loss, on_step=True, batch_size=len(batch["domain"]))

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.trace is not None:  # --trace (tests): what each rank sees, after the callback stepped the mix
            with open(self.trace.with_name(f"{self.trace.name}.rank{self.global_rank}.jsonl"), "a") as fh:
                record = {
                    "step": self.global_step,
                    "weights": self.mixer.weights.tolist(),
                    "stats": self.measured,
                    "batch": list(zip(batch["domain"].tolist(), batch["index"].tolist())),
                    "sharded": all(type(p).__name__ == "DTensor" for p in self.parameters()),
                    "probe": type(self.mixer.probe).__name__,
                }
                fh.write(json.dumps(record) + "\n")

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


class CheckpointEvery(ModelCheckpoint):
    """Lightning's ModelCheckpoint every N steps (a sharded checkpoint folder), then a ``COMPLETE`` marker once every
    rank has written its part; with ``stop_at``, every rank leaves right after that step's checkpoint without any
    cleanup, as a killed run would."""

    def __init__(self, stop_at: int | None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.stop_at = stop_at

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        trainer.strategy.barrier()  # every rank's shards and rank 0's meta.pt are on disk
        if trainer.is_global_zero:
            (Path(filepath) / MARKER).write_text(json.dumps({"step": trainer.global_step}))
        trainer.strategy.barrier()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.stop_at is not None and trainer.global_step == self.stop_at:
            exit_rank(0, wait_for_peers=False)  # as if killed right after the checkpoint


def newest_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint folder with its ``COMPLETE`` marker (a folder a kill left half-written is passed over)."""
    found = [
        (int(m.group(1)), p)
        for p in folder.glob("step-*.ckpt")
        if (m := re.match(r"step-(\d+)\.ckpt$", p.name)) and (p / MARKER).is_file()
    ]
    return max(found)[1] if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="run folder: checkpoints/, logs/ and metrics.jsonl")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--stop-at", type=int, default=None, help="exit right after the checkpoint of this step")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--devices", type=int, default=None, help="processes (default: torchrun's, else 2)")
    parser.add_argument("--domains", default=",".join(DEFAULT_DOMAINS))
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    parser.add_argument("--batch-size", type=int, default=12, help="global examples per step")
    parser.add_argument("--num-splits", type=int, default=2, help="global parts per domain on measuring steps")
    parser.add_argument("--update-every", type=int, default=5, help="steps between weight updates (and measurements)")
    parser.add_argument("--method", default="pike", choices=["pike", "dga"], help="the mixing method")
    parser.add_argument("--target", default="changelog", help="--method dga: the target domain (a file in --data-dir)")
    parser.add_argument("--trace", action="store_true", help="each rank writes OUT/trace.rank{R}.jsonl (tests)")
    parser.add_argument(
        "--pike-variant",
        default="gradmix",
        choices=PiKE.variants,
        help="PiKE's variant (the tests use gradmix_v1, whose weights move within a few steps here)",
    )
    args = parser.parse_args()
    out = Path(args.out)
    devices = args.devices or int(os.environ.get("WORLD_SIZE", "2"))
    for noise in (
        "does not have many workers",
        "resuming from a checkpoint that ended before the epoch ended",
        "no pre-optimization state",
        "LeafSpec",
        "returned a view tensor",
        "`weights_only` was not set",
    ):  # expected here: one in-process loader, manual steps, our loss makes no in-place change
        warnings.filterwarnings("ignore", message=f".*{noise}")

    ckpt_path = newest_checkpoint(out / "checkpoints") if args.resume else None
    domains = byte_domains(args.domains.split(","), args.data_dir)
    if args.method == "dga":
        method_params: dict = {"min_weight": 0.05}
        target = byte_domains([args.target], args.data_dir).domains[0]
    else:
        method_params, target = {"variant": args.pike_variant, "min_weight": 0.05}, None
    # a used --out without --resume is refused (on every rank) by the callback; --resume before the first
    # checkpoint starts over
    mixing = MixingCallback(
        domains,
        args.method,
        args.batch_size,
        method_params=method_params,
        probe_params={"num_splits": args.num_splits},  # a ShardedGradientProbe: the parameters are DTensors
        target=target,
        update_every=args.update_every,
        log_every=1,
        seed=0,
        run_dir=out,
        overwrite=args.resume and ckpt_path is None,
    )
    checkpoints = CheckpointEvery(
        args.stop_at,
        dirpath=out / "checkpoints",
        filename="step-{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=CHECKPOINT_EVERY,
        save_top_k=-1,
        save_last=False,
    )
    # FSDP2 data parallelism over every process, no tensor parallelism; gradmix's process-group timeout (10 min,
    # $GRADMIX_DIST_TIMEOUT): a hung rank does not block the other for 30
    strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1, timeout=default_timeout())
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=args.steps,
        callbacks=[mixing, checkpoints],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(LitGPT(out / "trace" if args.trace else None), ckpt_path=ckpt_path)
    if trainer.global_rank == 0:
        mixer = mixing.mixer
        assert mixer is not None  # set up by the callback during fit
        where = f"resumed from {ckpt_path.name}; " if ckpt_path is not None else ""
        print(
            f"done: {where}{mixer.step_count} steps on {devices} ranks, "
            f"weights {dict(zip(mixer.names, mixer.weights.round(4).tolist()))}",
            flush=True,
        )


if __name__ == "__main__":
    main()
    exit_rank()
