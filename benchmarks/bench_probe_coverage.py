"""Which probe ``make_probe`` picks, and how much of a model the fused probe's hooks cover, for common architectures:
HF GPT-2 (``Conv1D``), Llama and Qwen2 (``*RMSNorm``, found by behaviour), BERT, T5 (``T5LayerNorm``, relative
position buckets), torch ``TransformerEncoder`` (``MultiheadAttention``, batch-first and sequence-first), a timm-style
ViT written here (patch-embedding ``Conv2d``, ``MultiheadAttention`` blocks, a LayerNorm subclass that overrides
``forward``, a class token and position embedding as bare parameters), a small CNN with ``GroupNorm`` and one with
``BatchNorm``. Every model is a tiny random-init config (transformers is only needed for the HF rows; nothing is
downloaded).

    python benchmarks/bench_probe_coverage.py            # ~2 min on one core
    python benchmarks/bench_probe_coverage.py --no-timing  # coverage only, ~1 min

Per model: ``make_probe(model)`` (the probe a Mixer builds) and what it said; the fused hooks' static coverage
(``fused_coverage``); then one measuring step, after which the probe's ``coverage_report`` gives the scalars the
statistics are computed over (``measured_fraction``: run-time checks can drop parameters, e.g. a position embedding
called on positions shared by the batch) and the uncovered parameters grouped by reason. "cost" is the process CPU
time of a measuring step over a plain step of the same probe (median of 7 interleaved pairs, forward + backward
only; tiny models on a CPU, where fixed per-layer overheads dominate: an indication, not a benchmark - see
bench_probe_cost.py for costs at real sizes); "micro-batch cost" the same for ``GradientProbe`` (two parts per group:
8 micro-passes at K = 4).
Results: benchmarks/results/probe_coverage.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gradmix.probe import GradientProbe, fused_coverage, make_probe

N = 8  # examples per batch
GROUPS = torch.arange(N) % 4
VOCAB = 256

Batch = dict[str, torch.Tensor]


def ids(n: int = N, length: int = 16, seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, VOCAB, (n, length + 1), generator=gen)}


def causal_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    x = batch["input_ids"]
    out = model(input_ids=x[:, :-1], use_cache=False) if hasattr(model, "config") else model(x[:, :-1])
    logits = getattr(out, "logits", out)
    return F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").mean(dim=1)


def masked_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    x = batch["input_ids"][:, :-1]
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.transpose(1, 2), x, reduction="none").mean(dim=1)


def seq2seq_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    x = batch["input_ids"]
    source, target = x[:, :-1], x[:, 1:].flip(1)
    logits = model(input_ids=source, decoder_input_ids=target[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.transpose(1, 2), target[:, 1:], reduction="none").mean(dim=1)


def images(n: int = N, seed: int = 0, size: int = 32, classes: int = 10) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 3, size, size, generator=gen), "y": torch.randint(0, classes, (n,), generator=gen)}


def class_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


# -- models -------------------------------------------------------------------------------------------------------


def hf_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64))


def hf_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def hf_qwen2() -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(config)


def hf_bert() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    return BertForMaskedLM(config)


def hf_t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
    return T5ForConditionalGeneration(config)


class TorchEncoder(nn.Module):
    def __init__(self, batch_first: bool = True, dim: int = 64) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(VOCAB, dim)
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.1, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(dim), enable_nested_tensor=False)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        if self.batch_first:
            return self.head(self.encoder(h, mask=mask, is_causal=True))
        return self.head(self.encoder(h.transpose(0, 1), mask=mask, is_causal=True).transpose(0, 1))


class TimmLayerNorm(nn.LayerNorm):
    """timm's LayerNorm: a subclass that overrides ``forward``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = TimmLayerNorm(dim, eps=1e-6)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True)
        self.norm2 = TimmLayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """timm-style ViT: patch embedding Conv2d, class token and position embedding (bare parameters), pre-norm
    MultiheadAttention blocks, final norm, head on the class token."""

    def __init__(self, size: int = 32, patch: int = 4, dim: int = 64, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        tokens = (size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads) for _ in range(depth)])
        self.norm = TimmLayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


class CNN(nn.Module):
    def __init__(self, norm: str = "group") -> None:
        super().__init__()

        def norm_layer(c: int) -> nn.Module:
            return nn.GroupNorm(4, c) if norm == "group" else nn.BatchNorm2d(c)

        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            norm_layer(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            norm_layer(32),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=32),  # depthwise
            nn.Conv2d(32, 64, 1),
            norm_layer(64),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[..., torch.Tensor], Callable[..., Batch]]] = {
    "HF GPT-2 (Conv1D)": (hf_gpt2, causal_lm_loss, ids),
    "HF Llama (LlamaRMSNorm)": (hf_llama, causal_lm_loss, ids),
    "HF Qwen2 (Qwen2RMSNorm)": (hf_qwen2, causal_lm_loss, ids),
    "HF BERT (masked LM)": (hf_bert, masked_lm_loss, ids),
    "HF T5 (T5LayerNorm)": (hf_t5, seq2seq_loss, ids),
    "torch TransformerEncoder, batch_first": (lambda: TorchEncoder(True), causal_lm_loss, ids),
    "torch TransformerEncoder, sequence-first": (lambda: TorchEncoder(False), causal_lm_loss, ids),
    "timm-style ViT (inline)": (ViT, class_loss, images),
    "CNN + GroupNorm": (CNN, class_loss, images),
    "CNN + BatchNorm": (lambda: CNN("batch"), class_loss, images),
}


def short(reason_groups: list[dict[str, Any]]) -> str:
    parts = []
    for entry in reason_groups:
        names = ", ".join(entry["parameters"]) + (", ..." if entry["tensors"] > len(entry["parameters"]) else "")
        parts.append(f"{names}: {entry['reason']}")
    return "; ".join(parts) or "-"


def timed_ratio(probe: Any, batch: Batch, loss_fn: Callable[..., torch.Tensor], pairs: int = 7) -> float:
    """Median over interleaved pairs of (measuring step / plain step) process CPU time, forward + backward."""

    def step(measure: bool) -> float:
        started = time.process_time()
        probe.backward(batch, GROUPS, 4, loss_fn, measure=measure)
        probe.model.zero_grad(set_to_none=True)
        return time.process_time() - started

    step(False), step(True)  # warm-up
    ratios = []
    for i in range(pairs):
        if i % 2:
            measured, plain = step(True), step(False)
        else:
            plain, measured = step(False), step(True)
        ratios.append(measured / plain)
    return statistics.median(ratios)


def run(name: str, timing: bool) -> dict[str, Any]:
    build, loss_fn, make_batch = MODELS[name]
    torch.manual_seed(0)
    model = build()
    model.train()
    batch = make_batch()
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    reasons = fused_coverage(model)[1]
    sizes = dict(model.named_parameters())
    static = 1.0 - sum(sizes[n].numel() for n in reasons) / total
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        probe = make_probe(model)
        result = probe.backward(batch, GROUPS, 4, loss_fn, measure=True)
        model.zero_grad(set_to_none=True)
    assert result is not None and result.grad_sq_norm is not None
    report = dict(probe.coverage_report)  # type: ignore[attr-defined]
    row = {
        "model": name,
        "parameters": total,
        "probe": type(probe).__name__,
        "mode": report["mode"],
        "static_hook_coverage": round(static, 4),
        "measured_fraction": report["measured_fraction"],
        "uncovered": report["uncovered"],
        "notes": report["notes"],
        "said": [str(w.message)[:300] for w in said if issubclass(w.category, UserWarning)],
        "finite_statistics": bool(torch.isfinite(torch.as_tensor(result.grad_sq_norm)).all()),
    }
    if timing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # said above
            row["cost_measuring_over_plain"] = round(timed_ratio(probe, batch, loss_fn), 2)
            row["micro_cost_measuring_over_plain"] = round(timed_ratio(GradientProbe(model), batch, loss_fn), 2)
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | parameters | probe (make_probe) | hooks cover (static) | statistics over | cost | micro-batch cost "
        "| not covered |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cost = f"{r['cost_measuring_over_plain']:.2f}x" if "cost_measuring_over_plain" in r else "-"
        micro = f"{r['micro_cost_measuring_over_plain']:.2f}x" if "micro_cost_measuring_over_plain" in r else "-"
        extra = " (BatchNorm: biased, said once)" if r["notes"] else ""
        lines.append(
            f"| {r['model']} | {r['parameters']:,} | {r['probe']} | {100 * r['static_hook_coverage']:.1f}% | "
            f"{100 * r['measured_fraction']:.1f}% | {cost} | {micro} | {short(r['uncovered'])}{extra} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-timing", action="store_true", help="skip the measuring/plain step time ratio")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU times are not thread waits)")
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "probe_coverage.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    rows = []
    for name in MODELS:
        rows.append(run(name, timing=not args.no_timing))
        print(f"{name}: {rows[-1]['probe']} {100 * rows[-1]['measured_fraction']:.1f}%", file=sys.stderr)
    table = markdown(rows)
    meta = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": args.threads,
        "batch": N,
        "groups": 4,
        "command": "python benchmarks/bench_probe_coverage.py",
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows, "markdown": table}, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
