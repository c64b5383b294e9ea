"""A plain PyTorch training loop over three domains, with gradmix changing the mix while it trains.

    python examples/plain_loop.py [--method pike] [--steps 150] [--accumulation 2] [--out DIR] [--resume | --overwrite]

Uses the tiny built-in corpus (real text: Python docs, Python code, license texts), a byte-level BPE tokenizer
and the small GPT from gradmix_kit.experiment. Any model works: the Mixer only needs a function that returns
per-example losses. A second run on a used --out is refused unless --resume or --overwrite says what to do with it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from gradmix import Mixer
from gradmix.sources import DomainSet
from gradmix_kit.corpora import load_tiny_corpus
from gradmix_kit.experiment.model import GPT, GPTConfig, per_example_loss
from gradmix_kit.experiment.tokenizer import train_bpe_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="pike")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--out", default="runs/plain_loop", help="metrics.jsonl and checkpoint.pt go here")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--overwrite", action="store_true", help="start over, deleting the run already in OUT")
    args = parser.parse_args()
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    torch.manual_seed(0)

    texts = load_tiny_corpus()  # {domain: [documents]}
    names = sorted(texts)[:3]
    texts = {name: texts[name] for name in names}
    tokenizer = train_bpe_tokenizer([doc for docs in texts.values() for doc in docs], vocab_size=512)
    domains = DomainSet.from_texts(texts, tokenizer, window=32)
    print("domains:", dict(zip(domains.names, domains.sizes)), "windows")

    model = GPT(GPTConfig(vocab_size=tokenizer.get_vocab_size(), context_length=32, d_model=64, n_layers=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    params = {"min_weight": 0.05} if args.method in ("pike", "fair_pike") else {}
    # the Mixer locks OUT; a used OUT needs resume=True (records kept, cut back by mixer.resume) or overwrite=True
    mixer = Mixer(
        domains,
        args.method,
        batch_size=16,
        method_params=params,
        model=model,
        update_every=10,
        accumulation_steps=args.accumulation,
        run_dir=args.out,
        resume=args.resume,
        overwrite=args.overwrite,
    )
    checkpoint = Path(args.out) / "checkpoint.pt"
    if args.overwrite:
        checkpoint.unlink(missing_ok=True)  # the checkpoint is ours to delete (the Mixer deleted its records)
    if args.resume and checkpoint.exists():
        mixer.resume(checkpoint, model=model, optimizer=optimizer)  # load everything, drop rows logged after it
        print(f"resumed at step {mixer.step_count}")

    def backward(loss: torch.Tensor) -> None:  # your loop's backward: a GradScaler, accelerator.backward, ...
        loss.backward()

    remaining = max(args.steps - mixer.step_count, 0)
    for i, micro in enumerate(mixer.batches(remaining)):
        mixer.backward(model, micro, per_example_loss, backward_fn=backward)  # (+ gradient statistics when due)
        if (i + 1) % args.accumulation:
            continue  # more micro-batches of this optimizer step to come
        optimizer.step()
        optimizer.zero_grad()
        weights = mixer.step()  # updates the mix on schedule
        if mixer.step_count % 25 == 0:
            last = mixer.history[-1]["train_loss"] if mixer.history else {}
            print(
                f"step {mixer.step_count:4d} weights {np.round(weights, 3).tolist()} train loss "
                + ", ".join(f"{k}={v:.2f}" for k, v in last.items() if v is not None)
            )
        if mixer.step_count % 50 == 0:
            mixer.save_checkpoint(checkpoint, model=model, optimizer=optimizer)
    mixer.save_checkpoint(checkpoint, model=model, optimizer=optimizer)
    mixer.close()  # flushes the writers and releases the run folder's lock
    print(f"checkpoint written to {checkpoint} (--resume continues from it exactly)")


if __name__ == "__main__":
    main()
