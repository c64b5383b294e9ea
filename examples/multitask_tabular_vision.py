"""A small digit classifier trained on four sources of non-text examples, with gradmix choosing the mix.

    python examples/multitask_tabular_vision.py [--method both|pike|uniform] [--steps 300] [--seed 0] [--out DIR]

The data is scikit-learn's bundled 8x8 digits (``sklearn.datasets.load_digits``: 1797 images, shipped with the
package, nothing is downloaded; needs ``scikit-learn``, e.g. the ``cluster`` extra). A fifth is held out as a clean
test set; the rest is cut into four sources of differing quality, each split 80/20 into training and held-out
examples (the held-out ones corrupted like their source):

- ``clean``: images and labels as they are;
- ``pixel_noise``: Gaussian noise (sd 0.5 of the pixel range) added to every pixel, labels correct;
- ``label_noise``: clean images, 30% of the labels replaced by a different random class;
- ``digits_0_4``: clean, but only the classes 0-4.

Examples are ``{"x": 64 floats, "y": class}`` dicts in a plain list; ``DomainSet.from_datasets`` turns each list into
a domain and the default collate stacks them into ``{"x": (B, 64), "y": (B,), "domain": (B,)}``. The model is an MLP
and the loss the per-example cross-entropy. Each arm (PiKE, the default, and uniform) trains from the same
initialisation and prints its accuracy on the clean test set and on each source's held-out examples, the realised
mix (examples drawn per source) and its final weights. Then the gradient-conflict diagnosis (PiKE's assumption,
``gradmix.diagnostics``) is run on the sources: a short uniform-mix training run whose every step measures the
Gramian of the sources' gradients. Metrics go to ``OUT/<arm>/metrics.jsonl`` and a summary to ``OUT/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from gradmix import Mixer
from gradmix.diagnostics import diagnose
from gradmix.probe import make_probe
from gradmix.sampler import MixtureSampler
from gradmix.sources import DomainSet

BATCH_SIZE = 32
DIAGNOSE_BATCH_SIZE = 128  # 32 examples per source per step: a less noisy Gramian per step than 8
NUM_CLASSES = 10


Split = dict[str, list[dict[str, Any]]]


def build_sources(seed: int) -> tuple[Split, Split, list[dict[str, Any]]]:
    """The four sources, each cut 80/20 into training and held-out examples (lists of ``{"x", "y"}`` dicts, the
    held-out ones corrupted like their source), and the clean test set."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # pixels in [0, 1]
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_test = len(y) // 5
    test, parts = order[:n_test], np.array_split(order[n_test:], 4)

    noisy_x = np.clip(x + rng.normal(0.0, 0.5, x.shape), 0.0, 1.0).astype(np.float32)
    flipped_y = y.copy()
    flip = rng.random(len(y)) < 0.3
    flipped_y[flip] = (y[flip] + rng.integers(1, NUM_CLASSES, flip.sum())) % NUM_CLASSES  # always another class
    subset = parts[3][y[parts[3]] < 5]
    chosen = {
        "clean": (parts[0], x, y),
        "pixel_noise": (parts[1], noisy_x, y),
        "label_noise": (parts[2], x, flipped_y),
        "digits_0_4": (subset, x, y),
    }

    def examples(idx: np.ndarray, images: np.ndarray, labels: np.ndarray) -> list[dict[str, Any]]:
        return [{"x": torch.from_numpy(images[i]), "y": int(labels[i])} for i in idx]

    train, held_out = {}, {}
    for name, (idx, images, labels) in chosen.items():
        cut = len(idx) * 4 // 5
        train[name], held_out[name] = examples(idx[:cut], images, labels), examples(idx[cut:], images, labels)
    return train, held_out, examples(test, x, y)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, NUM_CLASSES))


def per_example_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One cross-entropy per example (the Mixer needs per-example losses to measure per-source statistics)."""
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(dim=1) == y).float().mean())


def accuracy_on(model: nn.Module, examples: list[dict[str, Any]]) -> float:
    return accuracy(model, torch.stack([e["x"] for e in examples]), torch.tensor([e["y"] for e in examples]))


def train_arm(
    method: str, domains: DomainSet, held_out: Split, test: list[dict[str, Any]], args: Any
) -> dict[str, Any]:
    torch.manual_seed(args.seed)  # the same initialisation in both arms
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    params = {"min_weight": 0.05} if method == "pike" else {}
    mixer = Mixer(
        domains,
        method,
        batch_size=BATCH_SIZE,
        method_params=params,
        model=model,
        update_every=10,
        seed=args.seed,
        run_dir=Path(args.out) / method,
        overwrite=True,  # an example: re-running on the same --out replaces the run
    )
    drawn = np.zeros(len(domains.names), dtype=np.int64)
    for batch in mixer.batches(args.steps):
        drawn += np.bincount(batch["domain"].numpy(), minlength=len(drawn))
        mixer.backward(model, batch, per_example_loss)
        optimizer.step()
        optimizer.zero_grad()
        mixer.step()
    weights = mixer.weights
    mixer.close()
    model.eval()
    return {
        "method": method,
        "test_accuracy": accuracy_on(model, test),
        "held_out_accuracy_per_source": {name: accuracy_on(model, held_out[name]) for name in domains.names},
        "examples_drawn": dict(zip(domains.names, drawn.tolist())),
        "final_weights": dict(zip(domains.names, np.round(weights, 4).tolist())),
    }


def run_diagnosis(domains: DomainSet, args: Any) -> dict[str, Any]:
    """A uniform-mix training run of a fresh model whose every step measures the sources' Gramian, then
    ``gradmix.diagnostics.diagnose`` (what ``gradmix diagnose`` does for a config's GPT; the CLI takes a config,
    so a model and sources defined in Python call the library function directly)."""
    torch.manual_seed(args.seed)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    probe = make_probe(model, gram=True)
    k = len(domains.names)
    sampler = MixtureSampler(
        domains.sizes, DIAGNOSE_BATCH_SIZE, np.full(k, 1.0 / k), seed=args.seed, domain_names=domains.names
    )
    grams, steps = [], []
    for step in range(args.diagnose_steps):
        ids, examples = sampler.next_arrays()
        batch = domains.gather(ids, examples)
        result = probe.backward(batch, batch["domain"].long(), k, per_example_loss, measure=True)
        optimizer.step()
        optimizer.zero_grad()
        if result is not None and result.gram is not None:
            grams.append(result)
            steps.append(step + 1)
    return diagnose(grams, domains.names, steps=steps).to_dict()


def show(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="both", choices=["pike", "uniform", "both"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--diagnose-steps", type=int, default=80, help="measuring steps of the diagnosis (0: skip)")
    parser.add_argument("--out", default="runs/multitask_tabular_vision", help="<arm>/metrics.jsonl, summary.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()

    # tiny sources, many passes over each: say it once here instead of a warning per pass
    warnings.filterwarnings("ignore", message=".*its data is being repeated")
    train, held_out, test = build_sources(args.seed)
    domains = DomainSet.from_datasets(train)  # any map-style datasets; the default collate stacks x and y
    print("training examples per source:", dict(zip(domains.names, domains.sizes)), f"; clean test set: {len(test)}")

    methods = ["pike", "uniform"] if args.method == "both" else [args.method]
    arms = []
    for method in methods:
        arm = train_arm(method, domains, held_out, test, args)
        arms.append(arm)
        print(f"\n[{method}] clean test accuracy {arm['test_accuracy']:.3f}")
        per_source = {name: round(value, 3) for name, value in arm["held_out_accuracy_per_source"].items()}
        print("  held-out accuracy per source (its own corruption and labels):", per_source)
        print(f"  realised mix (examples drawn, {args.steps} steps x {BATCH_SIZE}):", arm["examples_drawn"])
        print("  final weights:", arm["final_weights"])

    summary: dict[str, Any] = {"steps": args.steps, "batch_size": BATCH_SIZE, "seed": args.seed, "arms": arms}
    if args.diagnose_steps > 0:
        d = run_diagnosis(domains, args)
        summary["diagnosis"] = {
            key: d[key]
            for key in ("verdict", "c", "c_interval", "c_bar", "conflict_fraction", "cosine", "recommendation")
        }
        print(
            f"\ngradient conflict diagnosis ({args.diagnose_steps} measured steps of {DIAGNOSE_BATCH_SIZE}, "
            f"uniform mix): {d['verdict']}"
        )
        c_low, c_high = d["c_interval"] or (None, None)
        print(f"  c = {show(d['c'])} (interval {show(c_low)}..{show(c_high)}), c_bar = {show(d['c_bar'])}")
        for i, a in enumerate(d["domains"]):
            row = ", ".join(f"{b}={show(d['cosine'][i][j])}" for j, b in enumerate(d["domains"]) if j > i)
            if row:
                print(f"  cosine {a} vs {row}")
        print(f"  {d['recommendation']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwrote {out}/summary.json and <arm>/metrics.jsonl ({time.perf_counter() - started:.1f}s)")


if __name__ == "__main__":
    main()
