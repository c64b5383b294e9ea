"""Take a learned mix out of a run:
``gradmix export RUN_DIR --format F [--weights final|average|schedule] [--out FILE]``.

Engines that fix their blend before training (Megatron-LM / NeMo ``--data-path`` blends, OLMo-core source mixtures,
torchtitan's multi-source dataset, HF ``datasets.interleave_datasets(probabilities=...)``) cannot run a live mixer.
The workflow "learn a mix on a small run, then train the big model with it" needs the mix as a file: this module
reads a run folder (``metrics.jsonl``, and ``config.json`` / ``summary.json`` when ``gradmix run`` wrote them) and
writes the final or averaged weights, or the whole per-step schedule, in each engine's form, with provenance.

Which weights:

* ``final``: the method's mix at the end of the run (the last row's ``requested_weights``: what step L + 1 would
  have drawn, the last update included; the last row's ``weights`` when it has none).
* ``average``: the token-weighted average of the per-step weights over steps 1..L: each step's mix counts with the
  tokens the step trained on (from the rows' cumulative ``tokens``; every step counts the same when the run did not
  log tokens, and with a fixed batch of fixed windows it is the plain mean over steps).
* the schedule (``--format schedule``, or ``--format gradmix --weights schedule``): the per-step weights as step
  ranges of constant weights, replayable exactly by the ``schedule`` method.

How the per-step weights are rebuilt: a row of step s gives the mix step s drew (``weights``) and the mix step
s + 1 was asked to draw (``requested_weights``). Between logged rows the weights can only change right after an
update step (multiples of ``update_every``, from ``config.json`` or ``--update-every``; every step for an
``every_step`` method), which places each change exactly when rows are logged at least once per update interval
(``log_every`` dividing ``update_every`` is enough). Where it cannot be placed, the export says so (``exact: false``
in the provenance and a warning) and takes the later row's weights for the unknown steps.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FORMATS", "WEIGHT_CHOICES", "ExportError", "RunMix", "check_options", "export_run", "read_run", "render"]

FORMATS = ("recipe", "schedule", "hf", "megatron", "olmo", "torchtitan", "gradmix")
WEIGHT_CHOICES = ("final", "average", "schedule")
PLACEHOLDER_DIR = "DATA_DIR"


class ExportError(ValueError):
    """A run folder that cannot be exported (one line naming the file and the field), or a bad format/option."""


# ---------------------------------------------------------------------------------------------------------------
# reading a run
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class RunMix:
    """What a run's rows say about its mix: per-step weights for steps 1..``steps``, final weights, provenance."""

    run_dir: Path
    names: list[str]
    per_step: np.ndarray  # (steps, K): the mix step s drew is per_step[s - 1]
    step_tokens: np.ndarray  # (steps,): the weight of each step in the average
    final: np.ndarray
    final_source: str
    exact: bool
    unplaced: list[int]  # steps whose weights could not be told from the rows
    note: str
    provenance: dict[str, Any] = field(default_factory=dict)
    realised_tokens: dict[str, int] | None = None

    @property
    def steps(self) -> int:
        return int(self.per_step.shape[0])

    def average(self) -> np.ndarray:
        """Token-weighted average of the per-step weights over steps 1..steps."""
        tokens = self.step_tokens
        avg = (self.per_step * tokens[:, None]).sum(axis=0) / tokens.sum()
        return avg / avg.sum()

    def ranges(self) -> list[tuple[int, int | None, np.ndarray]]:
        """The schedule: (start, end, weights) with constant weights on steps start..end (1-based); the last
        entry's end is None (it holds from there on). After the run's last step, the final weights when they
        differ from the last step's (what the run would have drawn next)."""
        out: list[tuple[int, int | None, np.ndarray]] = []
        start = 1
        for s in range(2, self.steps + 2):
            if s == self.steps + 1 or not np.array_equal(self.per_step[s - 1], self.per_step[start - 1]):
                out.append((start, s - 1, self.per_step[start - 1]))
                start = s
        if not np.array_equal(self.final, out[-1][2]):
            out.append((self.steps + 1, None, self.final))
        else:
            out[-1] = (out[-1][0], None, out[-1][2])
        return out


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _vector(row: Mapping[str, Any], key: str, names: list[str] | None, where: str) -> tuple[list[str], np.ndarray]:
    value = row[key]
    if not isinstance(value, Mapping) or not value:
        raise ExportError(f"{where}: field {key!r} must be a {{domain: weight}} object, got {value!r}")
    keys = [str(k) for k in value]
    if names is not None and sorted(keys) != sorted(names):
        raise ExportError(f"{where}: field {key!r} names the domains {keys}, earlier rows name {names}")
    order = names if names is not None else keys
    out = np.empty(len(order))
    for i, name in enumerate(order):
        v = value[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ExportError(f"{where}: field {key!r} has {v!r} for domain {name!r}; weights are numbers >= 0")
        out[i] = float(v)
    if not out.sum() > 0:
        raise ExportError(f"{where}: field {key!r} is all zeros")
    return order, out


def _canonical_sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _every_step(method: Any) -> bool | None:
    if not isinstance(method, str):
        return None
    from gradmix.methods import method_class

    try:
        return bool(method_class(method).every_step)
    except ValueError:  # a user's method not registered in this process: its update rhythm is unknown
        return None


def read_run(run_dir: str | Path, *, update_every: int | None = None) -> RunMix:
    """Read a run folder's per-step mix. ``update_every`` (the run's update interval) places weight changes between
    logged rows when the folder has no ``config.json`` (a ``Mixer``'s run_dir); ``config.json`` wins otherwise."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir}: no such run folder" if not run_dir.exists() else f"{run_dir}: not a folder")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        inside = sorted(p.parent.name for p in run_dir.glob("*/metrics.jsonl"))
        hint = (
            f"; it holds run folders ({', '.join(inside[:3])}{', ...' if len(inside) > 3 else ''}): export one"
            if inside
            else ""
        )
        raise ExportError(
            f"{path}: no such file; a run folder written by `gradmix run` or a Mixer has one (per-step weights rows)"
            + hint
        )
    config = _read_json(run_dir / "config.json")
    summary = _read_json(run_dir / "summary.json")

    lines = path.read_text(encoding="utf-8").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    names: list[str] | None = None
    drawn: dict[int, np.ndarray] = {}  # step -> the mix the step drew (its row's weights)
    asked: dict[int, np.ndarray] = {}  # step -> the mix it was asked to draw (the previous row's requested_weights)
    tokens: dict[int, np.ndarray] = {}  # step -> cumulative tokens per domain after it
    final_row: tuple[int, Mapping[str, Any], str] | None = None
    rows = 0
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        where = f"{path} line {i + 1}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == last:  # a run killed while writing its last line: the rows before it stand
                continue
            raise ExportError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or "weights" not in row:
            continue  # a record of the user's own (Mixer.log) without a mix
        step = row.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ExportError(f"{where}: field 'step' must be an integer >= 0, got {step!r}")
        names, weights = _vector(row, "weights", names, where)
        rows += 1
        if step == 0:  # `gradmix run`'s row before training: the mix step 1 is asked to draw
            asked[1] = weights
            continue
        drawn[step] = weights
        if row.get("requested_weights") is not None:
            asked[step + 1] = _vector(row, "requested_weights", names, where)[1]
        if isinstance(row.get("tokens"), Mapping):
            try:
                tokens[step] = np.asarray([float(row["tokens"][n]) for n in names])
            except (KeyError, TypeError, ValueError):
                raise ExportError(f"{where}: field 'tokens' must give a number for every domain {names}") from None
        if final_row is None or step >= final_row[0]:
            final_row = (step, row, where)
    if names is None or final_row is None:
        raise ExportError(
            f"{path}: no row with per-step 'weights' (step >= 1): nothing to export (did the run train a step?)"
        )
    steps = final_row[0]

    # does the rows' requested_weights say what the next step drew? (not under a prefetching DataLoader, nor where
    # the sampler moved an exhausted domain's mass): when a step's drawn and asked mixes differ, asked is not used
    trusted = all(np.array_equal(asked[s], drawn[s]) for s in asked.keys() & drawn.keys())
    known = dict(drawn)
    if trusted:
        for s, w in asked.items():
            if 1 <= s <= steps:
                known.setdefault(s, w)

    cfg: dict[str, Any] = config or {}
    mixing: Mapping[str, Any] = cfg["mixing"] if isinstance(cfg.get("mixing"), Mapping) else {}
    method = cfg.get("method") or (summary or {}).get("method")
    every = _every_step(method)
    from_config = "update_every" in mixing
    interval = mixing["update_every"] if from_config else update_every
    if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 1):
        source = f"{run_dir / 'config.json'}: field 'mixing.update_every'" if from_config else "--update-every"
        raise ExportError(f"{source} must be a positive integer, got {interval!r}")

    def changes(a: int, b: int) -> list[int] | None:
        """Steps c in (a, b] at which the weights may differ from step c - 1 (None: unknown)."""
        if every:
            return list(range(a + 1, b + 1))
        if interval is None:
            return None
        return [c for c in range(a + 1, b + 1) if c > 1 and (c - 1) % interval == 0]

    per_step = np.empty((steps, len(names)))
    unplaced: list[int] = []
    known_steps = sorted(known)
    for s in known_steps:
        per_step[s - 1] = known[s]
    prev = 0  # the known step before the gap (0: none, the gap starts at step 1)
    for b in known_steps:
        gap = range(prev + 1, b)
        if len(gap):
            cps = changes(max(prev, 1), b)  # where the weights may change inside (prev, b]
            if not prev:  # leading steps: they drew b's mix unless a change may come before b
                unsure = list(gap) if cps is None else [s for s in gap if cps and s < cps[-1]]
                early: list[int] = []
            elif not cps:  # none in between, or no update rhythm known: the same mix on both sides holds between
                unsure = [] if np.array_equal(known[prev], known[b]) else list(gap)
                early = list(gap) if not unsure else []
            else:  # before the first possible change: prev's mix; from the last one on: b's; in between: unknown
                early = [s for s in gap if s < cps[0]]
                unsure = [s for s in gap if cps[0] <= s < cps[-1]]
            unplaced.extend(unsure)
            for s in gap:
                per_step[s - 1] = known[prev] if s in early else known[b]
        prev = b

    step, row, where = final_row
    if row.get("requested_weights") is not None and trusted:
        final = _vector(row, "requested_weights", names, where)[1]
        final_source = f"requested_weights of the row of step {step}: the method's mix after its last update"
    else:
        final = per_step[-1].copy()
        final_source = f"weights of the row of step {step}: the mix the last step drew"

    # tokens per step (for the average): spread each span's new tokens evenly over its steps
    step_tokens = np.ones(steps)
    realised: dict[str, int] | None = None
    if tokens:
        before, total_before = 0, 0.0
        for s in sorted(tokens):
            total = float(tokens[s].sum())
            if s > before and total > total_before:
                step_tokens[before:s] = (total - total_before) / (s - before)
            before, total_before = s, total
        if before < steps:
            step_tokens[before:] = step_tokens[before - 1] if before else 1.0
        realised = {n: int(v) for n, v in zip(names, tokens[max(tokens)])}

    if unplaced:
        spans = _spans(unplaced)
        note = (
            f"rows are logged every few steps and the weights changed between two rows at a step the rows cannot "
            f"tell (steps {spans}): those steps take the later row's weights"
        )
        if interval is None and not every:
            note += "; --update-every N (the run's update interval) places the changes exactly"
    else:
        note = "every step's weights follow from the rows" + (
            f" and the update interval {interval}" if interval is not None and len(known) < steps else ""
        )
    if not trusted:
        note += (
            "; the rows' requested_weights differ from what the next step drew (a prefetching DataLoader, or an "
            "exhausted domain), so only the drawn weights were used"
        )

    record = cfg["data_info"].get("corpus_record") if isinstance(cfg.get("data_info"), Mapping) else None
    software = record.get("software", {}) if isinstance(record, Mapping) else {}
    import gradmix

    provenance: dict[str, Any] = {
        "source_run": str(run_dir.resolve()),
        "method": method,
        "method_params": cfg.get("method_params"),
        "label": cfg.get("label"),
        "seed": cfg.get("seed", (summary or {}).get("seed")),
        "steps": steps,
        "batch_size": cfg.get("batch_size"),
        "sampler_mode": mixing.get("mode"),
        "update_every": interval,
        "corpus": cfg.get("corpus"),
        "corpus_sha256": _canonical_sha256(record) if isinstance(record, Mapping) else None,
        "config_sha256": _canonical_sha256(config) if config is not None else None,
        "gradmix_version": gradmix.__version__,
        "run_gradmix_version": software.get("gradmix") if isinstance(software, Mapping) else None,
        "rows": rows,
        "exact": not unplaced,
        "reconstruction": note,
    }
    return RunMix(
        run_dir=run_dir,
        names=names,
        per_step=per_step,
        step_tokens=step_tokens,
        final=final,
        final_source=final_source,
        exact=not unplaced,
        unplaced=unplaced,
        note=note,
        provenance=provenance,
        realised_tokens=realised,
    )


def _spans(steps: list[int]) -> str:
    out: list[str] = []
    start = prev = steps[0]
    for s in [*steps[1:], None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        out.append(f"{start}-{prev}" if prev > start else f"{start}")
        if s is not None:
            start = prev = s
    return ", ".join(out[:6]) + (f" and {len(out) - 6} more" if len(out) > 6 else "")


# ---------------------------------------------------------------------------------------------------------------
# writing it
# ---------------------------------------------------------------------------------------------------------------
def _num(x: float) -> str:
    """A float as the shortest text that reads back to the same double (JSON, TOML and Python all take it)."""
    return repr(float(x))


def _yaml_num(x: float) -> str:
    """As ``_num``, with a '.' in the mantissa (PyYAML reads ``1e-05`` as a string, ``1.0e-05`` as a float)."""
    text = _num(x)
    mantissa, e, exponent = text.partition("e")
    if e and "." not in mantissa:
        text = f"{mantissa}.0e{exponent}"
    return text


def _quote(text: str) -> str:
    """A double-quoted string that JSON, TOML, YAML and Python all read back as ``text``."""
    return json.dumps(text, ensure_ascii=False)


def _placeholders(names: list[str]) -> list[str]:
    """File-system-safe stand-ins for the domains' data paths (one per domain, unique)."""
    out: list[str] = []
    for name in names:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "domain"
        candidate, n = stem, 2
        while candidate in out:
            candidate, n = f"{stem}_{n}", n + 1
        out.append(candidate)
    return out


def _describe(mix: RunMix, kind: str) -> str:
    p = mix.provenance
    what = {
        "final": f"final weights ({mix.final_source})",
        "average": f"token-weighted average of the per-step weights over steps 1-{mix.steps} (each step counts "
        "with the tokens it trained on)",
        "schedule": f"per-step schedule of steps 1-{mix.steps}",
    }[kind]
    run = f"method {p['method'] or '?'}, seed {p['seed'] if p['seed'] is not None else '?'}, {mix.steps} steps"
    return f"{what}; run {p['source_run']} ({run})"


def _header(mix: RunMix, kind: str, fmt: str, comment: str = "#") -> list[str]:
    lines = [
        f"{comment} gradmix export --format {fmt}: {_describe(mix, kind)}",
        f"{comment} domains, in order: {', '.join(mix.names)}",
    ]
    if not mix.exact:
        lines.append(f"{comment} NOT EXACT: {mix.note}")
    return lines


def _nonzero(names: list[str], weights: np.ndarray) -> tuple[list[int], list[str]]:
    keep = [i for i, w in enumerate(weights) if w > 0]
    dropped = [names[i] for i, w in enumerate(weights) if not w > 0]
    return keep, dropped


def _recipe(mix: RunMix, kind: str, weights: np.ndarray) -> str:
    out: dict[str, Any] = {
        "format": "gradmix.recipe/1",
        "domains": mix.names,
        "weights": {n: float(w) for n, w in zip(mix.names, weights)},
        "weights_kind": kind,
        "weights_note": _describe(mix, kind).split("; run ")[0],
    }
    if mix.realised_tokens is not None:
        total = sum(mix.realised_tokens.values())
        out["realised_tokens"] = mix.realised_tokens
        if total > 0:
            out["realised_token_share"] = {n: v / total for n, v in mix.realised_tokens.items()}
    out["provenance"] = mix.provenance
    return json.dumps(out, indent=2) + "\n"


def _schedule_json(mix: RunMix) -> str:
    entries = [
        {"start": start, "end": end, "weights": {n: float(w) for n, w in zip(mix.names, weights)}}
        for start, end, weights in mix.ranges()
    ]
    out = {
        "format": "gradmix.schedule/1",
        "domains": mix.names,
        "steps": mix.steps,
        "schedule": entries,
        "schedule_note": (
            "weights of optimizer steps start..end (1-based, as `step` in metrics.jsonl); end null: from start on. "
            f"An entry starting at {mix.steps + 1} is the method's final mix (what the run would have drawn next). "
            "Replay with `gradmix export --format gradmix --weights schedule` (the `schedule` method)."
        ),
        "provenance": mix.provenance,
    }
    return json.dumps(out, indent=2) + "\n"


def _hf(mix: RunMix, kind: str, weights: np.ndarray) -> str:
    seed = mix.provenance.get("seed")
    lines = _header(mix, kind, "hf")
    lines += [
        "# probabilities[i] belongs to DOMAINS[i]: pass the datasets in this order, e.g. interleave({name: dataset}).",
        "# Equivalent: interleave_datasets([ds_" + ", ds_".join(_placeholders(mix.names)) + "], "
        "probabilities=PROBABILITIES, seed=SEED)",
        "from datasets import interleave_datasets",
        "",
        f"DOMAINS = [{', '.join(_quote(n) for n in mix.names)}]",
        f"PROBABILITIES = [{', '.join(_num(w) for w in weights)}]",
        f"SEED = {int(seed) if isinstance(seed, int) else 0}",
        "",
        "",
        "def interleave(datasets_by_domain, **kwargs):",
        '    """datasets.interleave_datasets over {domain: dataset} with the exported mix (kwargs: seed, '
        'stopping_strategy, ...)."""',
        '    kwargs.setdefault("seed", SEED)',
        "    return interleave_datasets(",
        "        [datasets_by_domain[name] for name in DOMAINS], probabilities=PROBABILITIES, **kwargs",
        "    )",
    ]
    return "\n".join(lines) + "\n"


def _megatron(mix: RunMix, kind: str, weights: np.ndarray) -> str:
    keep, dropped = _nonzero(mix.names, weights)
    paths = [f"{PLACEHOLDER_DIR}/{p}_text_document" for p in _placeholders(mix.names)]
    blend = " ".join(f"{_num(weights[i])} {paths[i]}" for i in keep)
    lines = _header(mix, kind, "megatron")
    lines += [
        "# Megatron-LM: pass the last line to pretrain_gpt.py (it normalises the weights); replace each",
        f"# {PLACEHOLDER_DIR}/<domain>_text_document by the prefix of that domain's preprocessed .bin/.idx files.",
        "# NeMo takes the same list: model.data.data_prefix=["
        + ",".join(f"{_num(weights[i])},{paths[i]}" for i in keep)
        + "]",
    ]
    if dropped:
        lines.append(f"# weight 0, left out: {', '.join(dropped)}")
    lines.append(f"--data-path {blend}")
    return "\n".join(lines) + "\n"


def _olmo(mix: RunMix, kind: str, weights: np.ndarray) -> str:
    keep, dropped = _nonzero(mix.names, weights)
    placeholders = _placeholders(mix.names)
    lines = _header(mix, kind, "olmo")
    lines += [
        "# OLMo-core: SourceMixtureDatasetConfig(source_configs=[SourceMixtureConfig(source_name, target_ratio,",
        "# paths), ...], requested_tokens=..., global_batch_size=...); target_ratio sums to 1. Replace the placeholder",
        f"# paths ({PLACEHOLDER_DIR}/<domain>/*.npy) by each domain's tokenized .npy files.",
    ]
    if dropped:
        lines.append(f"# weight 0, left out: {', '.join(dropped)}")
    total = float(sum(weights[i] for i in keep))
    lines.append("source_configs:")
    for i in keep:
        lines += [
            f"  - source_name: {_quote(mix.names[i])}",
            f"    target_ratio: {_yaml_num(weights[i] / total)}",
            f"    paths: [{_quote(f'{PLACEHOLDER_DIR}/{placeholders[i]}/*.npy')}]",
        ]
    return "\n".join(lines) + "\n"


def _torchtitan(mix: RunMix, kind: str, weights: np.ndarray) -> str:
    keep, dropped = _nonzero(mix.names, weights)
    placeholders = _placeholders(mix.names)
    spec = ",".join(f"{PLACEHOLDER_DIR}/{placeholders[i]}:{_num(weights[i])}" for i in keep)
    lines = _header(mix, kind, "torchtitan")
    lines += [
        '# torchtitan multi-source dataset: training.dataset = "path:weight,..." (the loader normalises the',
        f"# weights); replace {PLACEHOLDER_DIR}/<domain> by each domain's data folder.",
    ]
    if dropped:
        lines.append(f"# weight 0, left out: {', '.join(dropped)}")
    lines += ["[training]", f"dataset = {_quote(spec)}"]
    return "\n".join(lines) + "\n"


def _gradmix_fixed(mix: RunMix, kind: str, weights: np.ndarray) -> str:
    lines = _header(mix, kind, "gradmix")
    lines += [
        "# a `gradmix run` config fragment: the `fixed` method keeps these weights for the whole run",
        "[mixing]",
        'method = "fixed"',
        "",
        "[mixing.params]",
        "weights = { " + ", ".join(f"{_quote(n)} = {_num(w)}" for n, w in zip(mix.names, weights)) + " }",
    ]
    return "\n".join(lines) + "\n"


def _gradmix_schedule(mix: RunMix) -> str:
    p = mix.provenance
    lines = _header(mix, "schedule", "gradmix")
    same = [
        f"batch_size = {p['batch_size']}" if p.get("batch_size") is not None else None,
        f"seed = {p['seed']}" if p.get("seed") is not None else None,
        f'mixing.mode = "{p["sampler_mode"]}"' if p.get("sampler_mode") else None,
    ]
    lines += [
        "# a `gradmix run` config fragment: the `schedule` method replays the run's mix step for step. With the same",
        "# domains (in this order)"
        + "".join(f", {s}" for s in same if s)
        + " it draws exactly the batches the run drew.",
        "# Each weights list follows the domain order above.",
        "[mixing]",
        'method = "schedule"',
        "",
        "[mixing.params]",
        "schedule = [",
    ]
    for start, end, weights in mix.ranges():
        if end is None:
            steps = f"steps {start} on"
        else:
            steps = f"steps {start}-{end}" if end > start else f"step {start}"
        lines.append(f"  {{ start = {start}, weights = [{', '.join(_num(w) for w in weights)}] }},  # {steps}")
    lines.append("]")
    return "\n".join(lines) + "\n"


def check_options(fmt: str, weights: str) -> None:
    """``ExportError`` (one line) for an unknown format or weights kind, or a pair that does not go together."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; formats: {', '.join(FORMATS)}")
    if weights not in WEIGHT_CHOICES:
        raise ExportError(f"unknown --weights {weights!r}; choose final, average or schedule (--format gradmix)")
    if weights == "schedule" and fmt not in ("gradmix", "schedule"):
        raise ExportError(
            f"--weights schedule is for --format gradmix (the schedule method); --format {fmt} takes final or "
            "average (--format schedule writes the schedule as JSON)"
        )


def render(mix: RunMix, fmt: str, weights: str = "final") -> str:
    """The text of one export format (see ``FORMATS``) for the ``weights`` kind (``WEIGHT_CHOICES``)."""
    check_options(fmt, weights)
    if fmt == "schedule":
        return _schedule_json(mix)
    if weights == "schedule":
        return _gradmix_schedule(mix)
    vector = mix.final if weights == "final" else mix.average()
    writer = {
        "recipe": _recipe,
        "hf": _hf,
        "megatron": _megatron,
        "olmo": _olmo,
        "torchtitan": _torchtitan,
        "gradmix": _gradmix_fixed,
    }[fmt]
    return writer(mix, weights, vector)


def export_run(run_dir: str | Path, fmt: str, weights: str = "final", *, update_every: int | None = None) -> str:
    """``gradmix export``: read ``run_dir`` and return the text of format ``fmt``."""
    check_options(fmt, weights)  # before reading anything: a typo is said first
    return render(read_run(run_dir, update_every=update_every), fmt, weights)
