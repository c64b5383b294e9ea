"""Shared by examples/lightning_ddp.py and examples/torchrun_fsdp.py: three byte-level domains and a tiny GPT.

The domains are the text files of src/gradmix_kit/data/tiny read directly (bytes are the token ids, vocab 256), cut
into windows; nothing is downloaded and nothing from the experiment kit is imported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from gradmix.sources import DomainSet

DATA_DIR = Path(__file__).resolve().parents[1] / "src" / "gradmix_kit" / "data" / "tiny"
DEFAULT_DOMAINS = ("code", "docs", "legal")
WINDOW = 32  # tokens predicted per example (windows hold WINDOW + 1 bytes)


def byte_domains(
    names: Sequence[str] = DEFAULT_DOMAINS, data_dir: str | Path = DATA_DIR, window: int = WINDOW
) -> DomainSet:
    """One domain per ``data_dir/NAME.txt``: its bytes cut into non-overlapping windows of ``window + 1`` ids."""
    arrays = {}
    for name in names:
        path = Path(data_dir) / f"{name}.txt"
        if not path.is_file():
            raise SystemExit(f"no domain file {path} (pass --data-dir or other --domains)")
        data = np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.int64)
        n = (len(data) - 1) // window
        arrays[name] = np.lib.stride_tricks.sliding_window_view(data, window + 1)[: n * window : window].copy()
    return DomainSet.from_arrays(arrays)


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A 2-layer byte-level GPT (~45k parameters), no dropout: a resumed run computes what the first one would."""

    def __init__(self, vocab: int = 256, context: int = WINDOW, d: int = 32, layers: int = 2, heads: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def per_example_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-byte cross-entropy of each example: shape (n,), what gradmix's probe needs."""
    ids = batch["input_ids"]
    logits = model(ids[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return loss.view(ids.shape[0], -1).mean(1)
