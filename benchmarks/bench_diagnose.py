"""Does ``gradmix diagnose`` give the right verdict where the answer is known? (issue 24, item 4)

    python benchmarks/bench_diagnose.py [--json benchmarks/results/diagnose.json] [--pike-seeds 4] [--skip-gpt]

Three families, every measurement by the real probe (``make_probe(model, gram=True)``, the micro-batch probe
``gradmix diagnose`` uses) on a real model, on a uniform mix:

- linear regression (``gradmix_kit.diagnose_known.linear_settings`` and two more): domains built to conflict
  (opposite targets; targets at cosine -0.5 / -0.2) and to agree (the same targets split in two; cosine +0.5;
  orthogonal). The population gradient theta - w_k is known at every iterate, so the true cosines of the visited
  iterates are exact. Each at 5 steps (too few) and at a budget where the answer can be reached.
- PiKE's toy problem (``pike_toy.suite()``, the Mixer-path model of ``run_mixer``), probed at theta_0 (where every
  task is at its starting loss: true cosine 0, or +0.2 / +0.3): with the setting's own batch (what PiKE measures
  with) and with 1024 examples per step; plus PiKE's default through the Mixer against uniform (final expected loss
  ratio, mean of ``--pike-seeds`` seeds) and how far it moved the weights: what PiKE then does.
- the tiny GPT on two letter-sequence corpora (tests/test_diagnose.py): "shift 7" (the same contexts with other
  continuations: conflict once the shared token frequencies are learned) and "shift 1" (one distribution in two
  files: agree), through ``run_diagnosis`` (= ``gradmix diagnose``) at 5 and 30 steps: the issue's case.

Writes a markdown table to stdout and the numbers to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from gradmix.diagnostics import Diagnosis
from gradmix_kit.diagnose_known import KnownRun, LinearSetting, linear_settings, measure_linear, measure_toy
from gradmix_kit.pike_toy import ToyProblem, run_mixer, suite


def _fmt(value: float | None, bounds: list[float] | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} [{bounds[0]:.2f}, {bounds[1]:.2f}]" if bounds else f"{value:.2f}"


def _row(setting: str, truth: str, run: KnownRun | None, d: Diagnosis, batch: int, note: str = "") -> dict[str, Any]:
    return {
        "setting": setting,
        "true_cosine": truth,
        "true_c": None if run is None else run.true_c,
        "true_c_bar": None if run is None else run.true_c_bar,
        "batch": batch,
        "steps": d.num_measurements,
        "usable_steps": d.usable_measurements,
        "c": d.c,
        "c_interval": d.c_interval,
        "c_bar": d.c_bar,
        "c_bar_interval": d.c_bar_interval,
        "verdict": d.verdict,
        "point_verdict": d.point_verdict,
        "clipped_step_cosines": d.step_cosines_clipped,
        "note": note,
    }


def _truth_text(run: KnownRun) -> str:
    off = run.true_cosine[:, ~np.eye(len(run.domains), dtype=bool)]
    lo, hi = float(np.nanmin(off)), float(np.nanmax(off))
    return f"{lo:+.2f}" if abs(hi - lo) < 0.005 else f"{lo:+.2f} to {hi:+.2f}"


def linear_rows() -> list[dict[str, Any]]:
    settings = [
        *linear_settings(),
        LinearSetting("cosine -0.2 (theta = 0)", cosine=-0.2, train=False, batch_size=64),
        LinearSetting("orthogonal (theta = 0)", cosine=0.0, train=False),
    ]
    budget = {"cosine -0.5 (theta = 0)": 100, "cosine -0.2 (theta = 0)": 200, "orthogonal (theta = 0)": 100}
    rows = []
    for setting in settings:
        steps = budget.get(setting.name, 30)
        run = measure_linear(setting, steps, seed=0)
        for count in (5, steps):
            head = run.head(count)
            rows.append(_row(f"linear: {setting.name}", _truth_text(head), head, head.diagnose(), setting.batch_size))
    return rows


def toy_rows(pike_seeds: int) -> list[dict[str, Any]]:
    rows = []
    for setting in suite():
        truth = f"{setting.cosine:+.1f}" if setting.cosine else "0 (orthogonal)"
        note = ""
        if pike_seeds:
            problem = ToyProblem(setting)
            ratios, moved = [], []
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for seed in range(pike_seeds):
                    pike = run_mixer(problem, "pike", seed=seed)
                    uniform = run_mixer(problem, "uniform", seed=seed)
                    ratios.append(pike.expected[-1] / uniform.expected[-1])
                    moved.append(float(np.abs(pike.weights - 1.0 / setting.num_tasks).max()))
            note = f"PiKE/uniform {np.mean(ratios):.2f}, max weight move {np.max(moved):.2f}"
        for batch in (setting.batch_size, 1024):
            run = measure_toy(setting, 200, seed=0, batch_size=batch)
            rows.append(_row(f"toy: {setting.name}", truth, run, run.diagnose(), batch, note))
    return rows


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _letters_config(folder: Path, shift_b: int) -> Path:
    """The corpus and config of tests/test_diagnose.py: domain a shifts each next letter by 1, domain b by
    ``shift_b`` (10% random letters)."""
    rng = random.Random(0)
    corpus = folder / f"corpus-{shift_b}"
    corpus.mkdir(parents=True)

    def doc(shift: int) -> str:
        i, out = rng.randrange(26), []
        for _ in range(80):
            out.append(LETTERS[i])
            i = rng.randrange(26) if rng.random() < 0.1 else (i + shift) % 26
        return "".join(out)

    (corpus / "a.txt").write_text("\n\n".join(doc(1) for _ in range(60)))
    (corpus / "b.txt").write_text("\n\n".join(doc(shift_b) for _ in range(60)))
    path = folder / f"letters-{shift_b}.toml"
    path.write_text(
        f'name = "letters-{shift_b}"\nseed = 0\nthreads = 2\n[data]\ncorpus = "{corpus}"\n'
        f'data_dir = "{folder / "cache"}"\nwindow = 32\nvocab_size = 260\n[model]\nd_model = 16\nn_layers = 1\n'
        "n_heads = 1\n[train]\nbatch_size = 32\nlr = 0.03\nwarmup_steps = 2\n"
    )
    return path


def gpt_rows() -> list[dict[str, Any]]:
    from gradmix_kit.experiment.config import load_config
    from gradmix_kit.experiment.runner import run_diagnosis

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shift, label in ((7, "conflict (shift 7)"), (1, "agree (shift 1)")):
            cfg = load_config(_letters_config(Path(tmp), shift))
            for steps in (5, 30):
                record = run_diagnosis(cfg, Path(tmp) / f"out-{shift}-{steps}", steps=steps, progress=False)
                rows.append(
                    {
                        "setting": f"GPT letters: {label}",
                        "true_cosine": "-" if shift == 7 else "+1 (one distribution)",
                        "batch": 32,
                        "steps": record["num_measurements"],
                        "usable_steps": record["usable_measurements"],
                        "c": record["c"],
                        "c_interval": record["c_interval"],
                        "c_bar": record["c_bar"],
                        "c_bar_interval": record["c_bar_interval"],
                        "verdict": record["verdict"],
                        "point_verdict": record["point_verdict"],
                        "clipped_step_cosines": record["step_cosines_clipped"],
                        "note": "gradmix diagnose",
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--pike-seeds", type=int, default=4, help="seeds of PiKE vs uniform per toy setting (0: skip)")
    parser.add_argument("--skip-gpt", action="store_true", help="leave out the GPT corpora (about 1 minute)")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = linear_rows() + toy_rows(args.pike_seeds) + ([] if args.skip_gpt else gpt_rows())
    header = ["setting", "true cosine", "batch", "steps (usable)", "c [90% interval]", "c_bar [90% interval]"]
    print("| " + " | ".join([*header, "verdict", "note"]) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        verdict = r["verdict"] + (f" (point: {r['point_verdict']})" if r["point_verdict"] != r["verdict"] else "")
        print(
            f"| {r['setting']} | {r['true_cosine']} | {r['batch']} | {r['steps']} ({r['usable_steps']}) | "
            f"{_fmt(r['c'], r['c_interval'])} | {_fmt(r['c_bar'], r['c_bar_interval'])} | {verdict} | {r['note']} |"
        )
    print(f"\n{time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
