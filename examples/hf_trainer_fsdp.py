"""A Hugging Face Trainer with FSDP2 (accelerate's FSDP plugin) whose data mix changes while it trains - GPUs only.

    torchrun --standalone --nproc_per_node 2 examples/hf_trainer_fsdp.py --out runs/hf_fsdp --steps 30
    torchrun --standalone --nproc_per_node 2 examples/hf_trainer_fsdp.py --out runs/hf_fsdp --steps 30 --resume
    torchrun --standalone --nproc_per_node 2 examples/hf_trainer_fsdp.py --out runs/dga --method dga --target changelog

Why GPUs: the Trainer hands FSDP to accelerate, and accelerate builds its FSDP plugin only for accelerator devices.
On CPU (``use_cpu=True`` under torchrun) it drops the plugin without a word and wraps the model in DDP; without
``use_cpu`` on a machine with no GPU, transformers refuses ("Using fsdp only works in distributed training"). So on
CPU this script stops at once with gradmix's one-line error (``MixingTrainer: TrainingArguments(fsdp=...) but
accelerate did not enable FSDP ...``; tested in tests/test_integration_hf_fsdp.py) instead of training unsharded.
On CPU, FSDP2 with gradmix runs in Lightning (examples/lightning_fsdp.py) or a torchrun loop
(examples/torchrun_fsdp.py).

What it does on GPUs (one process per GPU): ``TrainingArguments(fsdp="full_shard", fsdp_config={"version": 2, ...})``
makes accelerate apply ``fully_shard`` to every ``GPT2Block`` and the root when ``train()`` starts, so every
parameter becomes a sharded DTensor; ``MixingTrainer`` then rebuilds its probe as a ``ShardedGradientProbe`` (the
same settings), which measures PiKE's statistics (or DGA's alignments with ``--target``) from the local gradient
shards and all-reduces a few scalars: every rank computes the same weights. The Trainer writes sharded checkpoints
every 10 steps (``OUT/checkpoint-N/pytorch_model_fsdp_0/``, ``optimizer_0/`` through torch.distributed.checkpoint)
and the MixingTrainer adds the Mixer's state (``gradmix_state.pt``, written last); ``--resume`` continues from the
newest complete one, exactly: ``OUT/metrics.jsonl`` of a run stopped with ``--stop-at 20`` and resumed equals an
uninterrupted run's (compare the two files' ``weights`` rows).

``--deepspeed 2`` / ``--deepspeed 3`` shards with DeepSpeed ZeRO-2/3 instead (``pip install deepspeed``; this one runs
on CPU too, with gloo). Gradient methods are refused under DeepSpeed in one line (its engine reduces and partitions the
gradients inside backward and steps on every backward call, so the probe's per-domain passes cannot be measured);
loss-only methods (``--method odm``) run and resume exactly (tested in tests/test_integration_hf_fsdp.py where
deepspeed is installed).

The domains and the tiny GPT-2 are examples/hf_trainer.py's (byte windows of the built-in tiny corpus, no download);
dropout defaults to 0 here (``--dropout``).
"""

from __future__ import annotations

import argparse
import os
import warnings

import numpy as np
import torch
from _trainer_callbacks import StopAt
from hf_trainer import WINDOW, load_domains
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from gradmix.distributed import default_timeout, exit_rank
from gradmix.integrations.hf import MixingTrainer, last_checkpoint

CHECKPOINT_EVERY = 10
FSDP_CONFIG = {
    "version": 2,  # FSDP2: fully_shard, DTensor parameters (what gradmix's sharded probe measures)
    "transformer_layer_cls_to_wrap": ["GPT2Block"],
    "state_dict_type": "SHARDED_STATE_DICT",  # each rank writes its shards (torch.distributed.checkpoint)
    "reshard_after_forward": True,
}


def tiny_gpt2(dropout: float) -> GPT2LMHeadModel:
    """The tiny random-init GPT-2 of examples/hf_trainer.py (byte vocabulary, 2 layers, width 32)."""
    config = GPT2Config(
        vocab_size=256,
        n_positions=WINDOW,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=None,
    )
    return GPT2LMHeadModel(config)


def sharding(zero_stage: int) -> dict:
    """The TrainingArguments that shard: FSDP2 (0), or DeepSpeed ZeRO-``zero_stage`` (2 or 3)."""
    if not zero_stage:
        return {"fsdp": "full_shard", "fsdp_config": dict(FSDP_CONFIG)}
    config = {
        "zero_optimization": {"stage": zero_stage},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
    }
    return {"deepspeed": config}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output dir: Trainer checkpoints and metrics.jsonl")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps")
    parser.add_argument("--stop-at", type=int, default=None, help="exit right after the checkpoint at this step")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    parser.add_argument("--overwrite", action="store_true", help="start over, deleting the run already in --out")
    parser.add_argument(
        "--method", default="pike", choices=["pike", "dga", "odm"], help="the mixing method (odm: loss-only)"
    )
    parser.add_argument(
        "--deepspeed",
        type=int,
        default=0,
        choices=[0, 2, 3],
        help="DeepSpeed ZeRO stage instead of FSDP2 (loss-only methods; runs on CPU too)",
    )
    parser.add_argument("--target", default="changelog", help="--method dga: the target domain (a tiny-corpus file)")
    parser.add_argument("--domains", default="code,docs,legal", help="comma-separated tiny-corpus files")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per optimizer step (all processes)")
    parser.add_argument("--update-every", type=int, default=5)
    parser.add_argument("--dropout", type=float, default=0.0)
    args = parser.parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    if args.batch_size % world_size:
        parser.error("--batch-size must be divisible by the number of processes")
    warnings.filterwarnings("ignore", category=UserWarning, module="gradmix")  # keep the demo's output short
    warnings.filterwarnings("ignore", message=".*fsdp.* as a string is deprecated")

    torch.manual_seed(0)
    domains = load_domains(args.domains.split(","))
    model = tiny_gpt2(args.dropout)
    training_args = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size // world_size,
        learning_rate=3e-3,
        warmup_steps=0,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        save_strategy="steps",
        save_steps=CHECKPOINT_EVERY,
        logging_steps=1,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),  # FSDP on CPU: gradmix's one-line error (see the docstring)
        **sharding(args.deepspeed),
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        log_level="error",
        ddp_timeout=int(default_timeout().total_seconds()),  # a hung rank fails its peer in 10 min, not 30
    )
    resume = last_checkpoint(args.out) if args.resume else None
    if args.resume and resume is None and rank == 0:
        print(f"no complete checkpoint in {args.out}: starting over", flush=True)
    options: dict = {"update_every": args.update_every}
    method_params = {"min_weight": 0.05} if args.method in ("pike", "dga") else {}
    if args.method == "dga":
        options["target"] = load_domains([args.target]).domains[0]  # a domain the run does not train on
    try:  # on CPU, or with ranks that disagree: the same one-line error on every rank
        trainer = MixingTrainer(
            model=model,
            args=training_args,
            domains=domains,
            method=args.method,
            method_params=method_params,
            mixer_options=options,
            overwrite=args.overwrite or (args.resume and resume is None),
        )
    except ValueError as exc:
        # no process-group teardown: the other rank may not be there any more
        exit_rank(2, wait_for_peers=False, message=f"rank {rank}: cannot start: {exc}")
    if args.stop_at is not None:
        trainer.add_callback(StopAt(args.stop_at))
    if rank == 0:
        how = f"DeepSpeed ZeRO-{args.deepspeed}" if args.deepspeed else "FSDP2"
        print(f"{world_size} ranks, {how}; method {args.method}; resume from {resume or 'scratch'}", flush=True)
    trainer.train(resume_from_checkpoint=resume)
    if rank == 0:
        print("final weights", dict(zip(domains.names, np.round(trainer.mixer.weights, 4).tolist())), flush=True)


if __name__ == "__main__":
    main()
    exit_rank()
