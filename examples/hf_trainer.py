"""A Hugging Face Trainer whose data mix changes while it trains: a random-init GPT-2 on three domains, PiKE.

    python examples/hf_trainer.py --out runs/hf --steps 30                 # a run, checkpoint every 10 steps
    python examples/hf_trainer.py --out runs/hf --steps 30 --stop-at 20    # ... "killed" right after checkpoint 20
    python examples/hf_trainer.py --out runs/hf --steps 30 --resume        # continues from the newest checkpoint
    python examples/hf_trainer.py --out runs/hf --steps 30 --overwrite     # starts over, deleting the old run

The domains are HF ``datasets`` Datasets of byte-level windows cut from the repo's tiny built-in corpus (code, docs,
legal; read directly, no tokenizer); the model is a tiny ``GPT2LMHeadModel`` built from a config (no download), with
GPT-2's default dropout 0.1 (``--dropout``). Everything is deterministic (seeds, CPU, no dataloader workers; the
Trainer restores the RNG that dropout draws from), so the weights and loss rows in ``OUT/metrics.jsonl`` of a
stopped-and-resumed run equal an uninterrupted run's exactly. A second run on a used ``--out`` is refused unless
``--resume`` or ``--overwrite`` says what to do with it.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from _trainer_callbacks import SlowDown, StopAt
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from gradmix.distributed import default_timeout
from gradmix.integrations.hf import MixingTrainer, hf_domains, last_checkpoint, windows_dataset
from gradmix.methods.pike import PiKE

TINY = Path(__file__).resolve().parents[1] / "src" / "gradmix_kit" / "data" / "tiny"
WINDOW = 32  # predicted tokens per example (rows hold WINDOW + 1 byte ids)


def load_domains(names: list[str]):
    """One HF Dataset of byte windows per tiny-corpus file (documents joined; the separator lines dropped)."""
    datasets = {}
    for name in names:
        text = (TINY / f"{name}.txt").read_text(encoding="utf-8")
        text = "\n".join(line for line in text.splitlines() if line.strip() != "<|doc|>")
        datasets[name] = windows_dataset(np.frombuffer(text.encode("utf-8"), dtype=np.uint8), WINDOW)
    return hf_domains(datasets)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output dir: Trainer checkpoints and metrics.jsonl")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps")
    parser.add_argument("--stop-at", type=int, default=None, help="exit right after the checkpoint at this step")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    parser.add_argument("--overwrite", action="store_true", help="start over, deleting the run already in --out")
    parser.add_argument("--dropout", type=float, default=0.1, help="GPT-2's dropout probabilities (default 0.1)")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient_accumulation_steps")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per optimizer step (all processes)")
    parser.add_argument("--method", default="pike")
    parser.add_argument(
        "--pike-variant",
        default="gradmix",
        choices=PiKE.variants,
        help="PiKE's variant (the resume tests use gradmix_v1, whose weights move within a few steps here; the default "
        "keeps the even split until its statistics tell the domains apart)",
    )
    parser.add_argument("--domains", default="code,docs,legal", help="comma-separated tiny-corpus files")
    parser.add_argument("--update-every", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for this tiny model)")
    parser.add_argument("--step-delay", type=float, default=0.0, help="sleep this long after every step (tests)")
    args = parser.parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun: one process per rank
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    if args.batch_size % (args.grad_accum * world_size):
        parser.error("--batch-size must be divisible by --grad-accum x the number of processes")
    warnings.filterwarnings("ignore", category=UserWarning, module="gradmix")  # keep the demo's output short

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    domains = load_domains(args.domains.split(","))
    config = GPT2Config(
        vocab_size=256,
        n_positions=WINDOW,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=args.dropout,
        embd_pdrop=args.dropout,
        attn_pdrop=args.dropout,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = GPT2LMHeadModel(config)

    per_device = args.batch_size // (args.grad_accum * world_size)
    training_args = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=3e-3,
        warmup_steps=0,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        save_strategy="steps",
        save_steps=10,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        log_level="error",
        ddp_timeout=int(default_timeout().total_seconds()),  # under torchrun: a hung rank fails its peer in 10 min
    )
    resume = last_checkpoint(args.out) if args.resume else None
    if args.resume and resume is None:
        print(f"no complete checkpoint in {args.out}: starting over", flush=True)  # killed before checkpoint 10
    method_params: dict[str, object] = {"min_weight": 0.05} if args.method in ("pike", "fair_pike") else {}
    if args.method == "pike":
        method_params["variant"] = args.pike_variant
    trainer = MixingTrainer(
        model=model,
        args=training_args,
        domains=domains,
        method=args.method,
        method_params=method_params,
        mixer_options={"update_every": args.update_every},
        overwrite=args.overwrite or (args.resume and resume is None),
    )
    if args.stop_at is not None:
        trainer.add_callback(StopAt(args.stop_at))
    if args.step_delay > 0:
        trainer.add_callback(SlowDown(args.step_delay))

    print(
        f"domains {dict(zip(domains.names, domains.sizes))} windows; method {args.method}; "
        f"resume from {resume or 'scratch'}",
        flush=True,
    )
    trainer.train(resume_from_checkpoint=resume)
    print("final weights", dict(zip(domains.names, np.round(trainer.mixer.weights, 4).tolist())), flush=True)


if __name__ == "__main__":
    main()
