"""A small GPT (decoder-only transformer) in plain PyTorch, and its per-example loss.

Small enough to train on 2 CPU cores in minutes, big enough that data mixing changes its validation loss: the
experiments compare mixing methods on this model, and the gradient probe differentiates ``per_example_loss``.
Layout as GPT-2: learned token + position embeddings, pre-LayerNorm blocks (causal self-attention, 4x GELU MLP),
final LayerNorm, output head tied to the token embedding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT", "GPTConfig", "per_example_loss"]


@dataclass
class GPTConfig:
    """Size of the model. The defaults give ~0.94M parameters at vocab 4096 (over half of them the tied embedding).

    ``context_length`` is the longest input the model accepts (training windows of T+1 tokens feed T inputs).
    """

    vocab_size: int
    context_length: int = 128
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"GPTConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.out = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        # (n, t, d) -> (n, heads, t, d / heads)
        q, k, v = (z.view(n, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(n, t, d))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.d_model, 4 * config.d_model)
        self.down = nn.Linear(4 * config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-LN residual block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_mlp = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_attn(x)))
        return x + self.drop(self.mlp(self.ln_mlp(x)))


class GPT(nn.Module):
    """Decoder-only transformer: ``forward(input_ids (n, T)) -> logits (n, T, vocab_size)``, T <= context_length."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.context_length, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_final = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight  # weight tying: one matrix reads and writes tokens
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2 initialisation: N(0, 0.02), and the projections that write into the residual stream scaled by
        # 1/sqrt(2 * n_layers) so the residual variance does not grow with depth.
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith(("attn.out", "mlp.down")) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, tokens), got {tuple(input_ids.shape)}")
        length = input_ids.shape[1]
        if length > self.config.context_length:
            raise ValueError(
                f"input of {length} tokens is longer than the model's context_length={self.config.context_length}"
            )
        positions = torch.arange(length, device=input_ids.device)
        x = self.drop(self.token_embedding(input_ids) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_final(x))

    def num_parameters(self, *, include_position_embedding: bool = True) -> int:
        """Number of trainable scalars (the tied embedding/head matrix counted once)."""
        total = sum(p.numel() for p in self.parameters())
        if not include_position_embedding:
            total -= self.position_embedding.weight.numel()
        return total


def per_example_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy of each example: the ``LossFn`` the gradient probe differentiates.

    ``batch["input_ids"]``: LongTensor (n, T+1), windows with one extra token; the model reads ``[:, :-1]`` and is
    scored on ``[:, 1:]``. Optional ``batch["loss_mask"]`` selects the target tokens that count: shape (n, T)
    (aligned with the targets) or (n, T+1) (aligned with ``input_ids``; its first column is dropped). Returns a
    tensor (n,) so callers can average over any subset of examples (per-domain losses, probe micro-batches).
    Other keys of ``batch`` are ignored.
    """
    if "input_ids" not in batch:
        raise KeyError("per_example_loss: batch has no 'input_ids'")
    input_ids = batch["input_ids"]
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"batch['input_ids'] must have shape (n, T+1) with T >= 1, got {tuple(input_ids.shape)}")
    inputs, targets = input_ids[:, :-1], input_ids[:, 1:]
    logits = model(inputs)
    n, t = targets.shape
    token_loss = F.cross_entropy(logits.reshape(n * t, -1).float(), targets.reshape(n * t), reduction="none").view(n, t)
    mask = batch.get("loss_mask")
    if mask is None:
        return token_loss.mean(dim=1)
    if mask.shape == input_ids.shape:
        mask = mask[:, 1:]
    if mask.shape != targets.shape:
        raise ValueError(
            f"batch['loss_mask'] has shape {tuple(mask.shape)}; expected {tuple(targets.shape)} (targets) "
            f"or {tuple(input_ids.shape)} (input_ids)"
        )
    mask = mask.to(token_loss.dtype)
    counts = mask.sum(dim=1)
    empty = torch.nonzero(counts <= 0)
    if empty.numel():
        raise ValueError(
            f"batch['loss_mask'] selects no target token for example {int(empty[0, 0])}: its loss is undefined"
        )
    return (token_loss * mask).sum(dim=1) / counts
