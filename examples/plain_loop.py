"""A plain PyTorch training loop over three domains, with gradmix changing the mix while it trains.

    python examples/plain_loop.py [--method pike] [--steps 150]

Uses the tiny built-in corpus (real text: Python docs, Python code, license texts), a byte-level BPE tokenizer
and the small GPT from gradmix_kit.experiment. Any model works: the Mixer only needs a function that returns
per-example losses.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from gradmix import Mixer
from gradmix_kit.corpora import load_tiny_corpus
from gradmix_kit.experiment.model import GPT, GPTConfig, per_example_loss
from gradmix_kit.experiment.tokenizer import train_bpe_tokenizer
from gradmix.sources import DomainSet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="pike")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--run-dir", default=None, help="write metrics.jsonl here")
    args = parser.parse_args()
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
    mixer = Mixer(domains, args.method, batch_size=16, method_params=params, model=model, update_every=10,
                  run_dir=args.run_dir)

    for batch in mixer.batches(args.steps):
        mixer.backward(model, batch, per_example_loss)  # forward + backward (+ gradient statistics when due)
        optimizer.step()
        optimizer.zero_grad()
        weights = mixer.step()  # updates the mix on schedule
        if mixer.step_count % 25 == 0:
            last = mixer.history[-1]["train_loss"] if mixer.history else {}
            print(f"step {mixer.step_count:4d} weights {np.round(weights, 3).tolist()} train loss "
                  + ", ".join(f"{k}={v:.2f}" for k, v in last.items() if v is not None))
    mixer.save_checkpoint("mixer_checkpoint.pt", model=model, optimizer=optimizer)
    print("checkpoint written to mixer_checkpoint.pt (Mixer.load_checkpoint restores model, optimizer and mix)")


if __name__ == "__main__":
    main()
