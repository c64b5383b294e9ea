"""Does PiKE steer away from a low-value domain, and does that pay off on the others? (issue #14, item 3)

    python benchmarks/noisy_domain.py [--config configs/bench_noisy.toml] [--seeds 0,1,2] [--out runs/noisy]

1. Writes ``runs/noisy_corpus/``: three clean languages of dasher-data (de, es, fr; the multilingual corpus built with
   those languages) and ``noise.jsonl``: word salad - as many documents as the clean languages have on average, each
   as long as a random clean document, made of words drawn uniformly at random from the clean documents' words.
   Same vocabulary and tokenizer, no structure: a step on it teaches the model almost nothing about the others.
2. Runs ``gradmix compare`` on it (uniform, the oracle static mix ``clean_only`` that never samples the noise,
   PiKE, conceptual PiKE, Fair-PiKE; config ``configs/bench_noisy.toml``).
3. Summarises what matters here: the validation loss averaged over the *clean* languages (the noise's own loss is
   not a goal), paired by seed against uniform and against ``clean_only``, and the share of the batch each method
   gave the noise (final weight, and the realised share of all training tokens from ``metrics.jsonl``).
Writes ``benchmarks/results/noisy_domain.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats as scipy_stats

ROOT = Path(__file__).resolve().parents[1]
CLEAN = ["de", "es", "fr"]


def write_corpus(folder: Path, seed: int = 0) -> dict[str, int]:
    from gradmix_kit.corpora import build_corpus, load_corpus

    build_corpus("multilingual", languages=CLEAN)
    docs = load_corpus("multilingual", languages=CLEAN)
    rng = np.random.default_rng(seed)
    words = [w for lang in CLEAN for doc in docs[lang] for w in doc.split()]
    lengths = [len(doc.split()) for lang in CLEAN for doc in docs[lang]]
    count = int(np.mean([len(docs[lang]) for lang in CLEAN]))
    noise = []
    for _ in range(count):
        n = max(8, int(rng.choice(lengths)))
        noise.append(" ".join(words[i] for i in rng.integers(0, len(words), size=n)))
    folder.mkdir(parents=True, exist_ok=True)
    for name, texts in [*((lang, docs[lang]) for lang in CLEAN), ("noise", noise)]:
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for text in texts:
                fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return {**{lang: len(docs[lang]) for lang in CLEAN}, "noise": len(noise)}


def _half_width(values: np.ndarray) -> float:
    if len(values) < 2:
        return float("nan")
    return float(scipy_stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values)))


def realised_share(metrics: Path, domain: str) -> float:
    """The share of all training tokens that came from ``domain``: what the sampler delivered, read from the last
    record's cumulative per-domain ``tokens`` (not the weights the method asked for)."""
    tokens = None
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if isinstance(record.get("tokens"), dict):
            tokens = record["tokens"]
    if not tokens:
        raise ValueError(f"{metrics}: no record with per-domain 'tokens'")
    return float(tokens.get(domain, 0)) / float(sum(tokens.values()))


def summarise(out: Path, labels: list[str], seeds: list[int]) -> dict:
    rows: dict[str, dict] = {}
    for label in labels:
        clean, noise_w, noise_share, noise_loss = [], [], [], []
        for seed in seeds:
            run = out / f"{label}-seed{seed}"
            summary = json.loads((run / "summary.json").read_text())
            val = summary["final_val_loss"]
            clean.append(float(np.mean([val[d] for d in CLEAN])))
            noise_loss.append(float(val["noise"]))
            noise_w.append(float(summary["final_weights"]["noise"]))
            noise_share.append(realised_share(run / "metrics.jsonl", "noise"))
        rows[label] = {
            "clean_val_loss": clean,
            "noise_val_loss": noise_loss,
            "final_noise_weight": noise_w,
            "realised_noise_share": noise_share,
        }
    for base in ("uniform", "clean_only"):
        for label in labels:
            if base in rows:
                delta = 100 * (np.array(rows[label]["clean_val_loss"]) / np.array(rows[base]["clean_val_loss"]) - 1)
                rows[label][f"delta_vs_{base}_pct"] = [float(np.mean(delta)), _half_width(delta)]
    return rows


def markdown(rows: dict, seeds: list[int]) -> str:
    lines = [
        "| method | clean-language val loss | Δ vs uniform | Δ vs clean_only (oracle) | noise share of "
        "training tokens (realised) | final noise weight | noise val loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, row in rows.items():
        clean = np.array(row["clean_val_loss"])
        du = row.get("delta_vs_uniform_pct", [np.nan, np.nan])
        do = row.get("delta_vs_clean_only_pct", [np.nan, np.nan])
        lines.append(
            f"| {label} | {clean.mean():.4f} ± {_half_width(clean):.4f} | {du[0]:+.2f}% ± {du[1]:.2f}% | "
            f"{do[0]:+.2f}% ± {do[1]:.2f}% | {np.mean(row['realised_noise_share']):.3f} | "
            f"{np.mean(row['final_noise_weight']):.3f} | {np.mean(row['noise_val_loss']):.3f} |"
        )
    lines.append(
        f"\nMean ± 95% half-width over seeds {seeds} (Student t); Δ paired by seed; clean = mean of {', '.join(CLEAN)}."
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "bench_noisy.toml"))
    parser.add_argument("--seeds", default=None, help="comma-separated (default: the config's)")
    parser.add_argument("--methods", default=None, help="comma-separated labels (default: the config's)")
    parser.add_argument("--out", default="runs/noisy")
    parser.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (as gradmix --set)")
    parser.add_argument("--summarise-only", action="store_true", help="only re-read an existing --out")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "noisy_domain.json"))
    args = parser.parse_args()

    from gradmix_kit.experiment.config import load_config, parse_overrides
    from gradmix_kit.experiment.runner import run_comparison

    cfg = load_config(args.config, parse_overrides(args.set))
    labels = args.methods.split(",") if args.methods else list(cfg["compare"]["methods"])
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(cfg["compare"]["seeds"])
    out = Path(args.out)
    if not args.summarise_only:
        sizes = write_corpus(Path(cfg["data"]["corpus"]))
        print(f"corpus {cfg['data']['corpus']}: documents {sizes}", flush=True)
        run_comparison(cfg, labels, seeds, out, method_overrides=cfg["compare"]["overrides"], progress=False)
    rows = summarise(out, labels, seeds)
    table = markdown(rows, seeds)
    print(table)
    Path(args.json).write_text(
        json.dumps({"seeds": seeds, "config": args.config, "overrides": args.set, "rows": rows}, indent=2) + "\n"
    )
    Path(args.json).with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
