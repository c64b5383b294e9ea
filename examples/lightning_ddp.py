"""gradmix inside a Lightning Trainer: PiKE mixes three byte-level domains, 2 CPU processes under DDP (gloo).

    python examples/lightning_ddp.py --out runs/lit --steps 30
    python examples/lightning_ddp.py --out runs/lit --steps 30 --resume

Run it as a script: ``strategy="ddp"`` launches the other rank by running this script again in a subprocess (no
spawn, so nothing needs pickling; ``"ddp_spawn"`` would work too but re-imports everything in spawned children).
The ``MixingCallback`` owns the Mixer: the module's ``train_dataloader`` is its live sampler (each rank its share),
``mixing_backward`` runs the probe with ``manual_backward``, the callback steps the mix once per optimizer step, logs
weights and KPIs to the Trainer's loggers (``OUT/logs``) and the Mixer's records to ``OUT/metrics.jsonl``, and keeps
its state in Lightning's checkpoints (``OUT/checkpoints/step-NNNNNN.ckpt``, every 10 steps). ``--resume`` continues
from the newest one; ``--stop-at M`` leaves right after the checkpoint of step M as if killed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from pathlib import Path

import lightning.pytorch as L
import torch
from _tiny_gpt import DATA_DIR, DEFAULT_DOMAINS, TinyGPT, byte_domains, per_example_loss
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy

from gradmix.distributed import default_timeout
from gradmix.integrations.lightning import MixingCallback, MixingModuleMixin
from gradmix.methods.pike import PiKE

CHECKPOINT_EVERY = 10


class LitGPT(MixingModuleMixin, L.LightningModule):
    def __init__(self, trace: Path | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False  # PiKE measures gradients: the probe runs the backward passes
        self.net = TinyGPT()
        self.trace = trace

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net(ids)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        assert not isinstance(opt, list)  # one optimizer
        measured = self.mixing_backward(batch, per_example_loss)  # forward/backward (+ statistics when due)
        assert measured is not None  # accumulation_steps=1: every batch is a whole step
        opt.step()
        opt.zero_grad()
        self.log("train_loss", measured.mean_loss, on_step=True, batch_size=len(batch["domain"]))

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.trace is not None:  # --trace (tests): what each rank sees, after the callback stepped the mix
            checksum = float(sum(p.detach().double().sum() for p in self.parameters()))
            with open(self.trace.with_name(f"{self.trace.name}.rank{self.global_rank}.jsonl"), "a") as fh:
                fh.write(
                    json.dumps(
                        {
                            "step": self.global_step,
                            "weights": self.mixer.weights.tolist(),
                            "params": checksum,
                            "batch": batch["index"].tolist(),
                        }
                    )
                    + "\n"
                )

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


class CheckpointEvery(ModelCheckpoint):
    """Lightning's ModelCheckpoint every N steps; with ``stop_at``, every rank leaves right after that step's
    checkpoint (written and past Lightning's barrier) without any cleanup, as a killed run would."""

    def __init__(self, stop_at: int | None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.stop_at = stop_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.stop_at is not None and trainer.global_step == self.stop_at:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


def newest_checkpoint(folder: Path) -> Path | None:
    found = [(int(m.group(1)), p) for p in folder.glob("step-*.ckpt") if (m := re.match(r"step-(\d+)\.ckpt$", p.name))]
    return max(found)[1] if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--stop-at", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--domains", default=",".join(DEFAULT_DOMAINS))
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    parser.add_argument("--batch-size", type=int, default=12, help="global examples per step")
    parser.add_argument("--trace", action="store_true", help="each rank writes OUT/trace.rank{R}.jsonl (tests)")
    parser.add_argument(
        "--pike-variant",
        default="gradmix",
        choices=PiKE.variants,
        help="PiKE's variant (the tests use gradmix_v1, whose weights move within a few steps here)",
    )
    args = parser.parse_args()
    out = Path(args.out)
    for noise in (
        "does not have many workers",
        "resuming from a checkpoint that ended before the epoch ended",
        "no pre-optimization state",
        "LeafSpec",
    ):  # expected here: one in-process loader, manual steps
        warnings.filterwarnings("ignore", message=f".*{noise}")

    torch.manual_seed(0)
    ckpt_path = newest_checkpoint(out / "checkpoints") if args.resume else None
    # a used --out without --resume is refused (on every rank) by the callback; --resume before the first
    # checkpoint starts over
    mixing = MixingCallback(
        byte_domains(args.domains.split(","), args.data_dir),
        "pike",
        args.batch_size,
        method_params={"variant": args.pike_variant, "min_weight": 0.05},
        update_every=5,
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
    # gradmix's process-group timeout (10 min, $GRADMIX_DIST_TIMEOUT): a hung rank does not block the other for 30
    strategy = DDPStrategy(timeout=default_timeout()) if args.devices > 1 else "auto"
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_steps=args.steps,
        callbacks=[mixing, checkpoints],
        logger=CSVLogger(out, name="logs"),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(LitGPT(out / "trace" if args.trace else None), ckpt_path=ckpt_path)
    if trainer.global_rank == 0:
        mixer = mixing.mixer
        assert mixer is not None  # set up by the callback during fit
        print(f"done: {mixer.step_count} steps, weights {dict(zip(mixer.names, mixer.weights.round(4).tolist()))}")


if __name__ == "__main__":
    main()
