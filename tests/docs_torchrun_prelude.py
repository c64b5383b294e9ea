"""What the docs' torchrun blocks (first line ``# docs-test: torchrun``) take from the reader's earlier code.

tests/test_docs_blocks.py runs such a block as ``train.py`` in a fresh temporary folder (also the working directory:
a block's ``runs/ddp`` lands there) with ``torchrun --standalone --nproc_per_node 2``, gloo on the CPU, ``examples/``
on ``PYTHONPATH``. This file is copied next to it, and ``train.py`` imports from it the names below that the block
uses but neither defines nor imports, then runs the block in its own module globals (torch, gradmix and the rest the
block imports itself, as a reader copying it must); a block that uses none of them runs without this prelude.

- ``make_model()``: examples/_tiny_gpt.py's 2-layer byte-level GPT, built from the same seed on every rank (what
  FSDP2 needs before ``fully_shard``; DDP broadcasts rank 0's weights anyway); its layers are ``model.blocks``.
- ``domains``: three byte-level domains of the repo's tiny corpus (code, docs, legal), 33-byte windows.
- ``per_example_loss(model, batch)``: next-byte cross-entropy per example, shape (n,).
- ``num_steps``: 50, so the Mixer's default ``update_every=50`` gives one measured PiKE update.
"""

from __future__ import annotations

import warnings

import torch
from _tiny_gpt import TinyGPT, byte_domains, per_example_loss

warnings.filterwarnings("ignore", message=".*returned a view tensor")  # FSDP2 on this loss: no in-place change


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)  # every rank builds the same full model
    return TinyGPT()


domains = byte_domains()
num_steps = 50
__all__ = ["domains", "make_model", "num_steps", "per_example_loss"]
