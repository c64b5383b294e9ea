"""Experiment configs for ``gradmix run`` / ``gradmix compare``: TOML or JSON, validated, with defaults filled in.

Unknown keys are errors (a typo must not silently fall back to a default), and so are values of the wrong type or
range: every field has a rule in ``FIELD_RULES`` and the message names the field (``train.lr must be a finite
number > 0, got inf``). Booleans are not numbers here: ``steps = true`` is rejected, not read as 1.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["DEFAULTS", "FIELD_RULES", "ConfigError", "load_config", "parse_overrides", "resolve_config"]


class ConfigError(ValueError):
    """A config names an unknown key or holds a value of the wrong kind."""


DEFAULTS: dict[str, Any] = {
    "name": "experiment",
    "seed": 0,
    "steps": 200,
    "threads": "auto",  # torch threads: "auto" (physical cores not busy, at least 1), a count, or 0 (torch's default)
    "device": "cpu",  # where the model trains: "cpu", "cuda", "cuda:1", "mps"
    "data": {
        "corpus": "tiny",  # tiny | multilingual | domains | ... (gradmix_kit.corpora) | a folder of <domain>.jsonl/.txt
        "data_dir": None,  # where corpora are built/cached (default: $GRADMIX_DATA or ~/.cache/gradmix)
        "domains": None,  # subset of domains, in this order
        "languages": None,  # languages of a multilingual corpus (corpora.available_languages); None = defaults
        "expected_corpus": None,  # a corpus_record.json stored beside a results table: warn when this run's data differ
        "target": None,  # target set for DGA-style methods: a target name of the corpus, or a path
        "target_train_fraction": 0.5,  # target documents used for target gradients; the rest validates
        "max_docs_per_domain": None,
        "max_train_windows_per_domain": None,  # cap windows per domain (keeps sizes uneven but bounded)
        "holdout_fraction": 0.1,  # documents per domain held out for validation and the continuation task
        "window": 64,
        "vocab_size": 2048,
        "tokenizer_docs_per_domain": 400,
        "split_seed": 1234,  # fixed across methods and seeds so every run sees the same split
    },
    "model": {"d_model": 96, "n_layers": 2, "n_heads": 4, "dropout": 0.0},
    "train": {
        "batch_size": 16,
        "lr": 3e-3,
        "min_lr_ratio": 0.1,
        "warmup_steps": 10,
        "weight_decay": 0.01,
        "grad_clip": 1.0,
        "eval_every": 50,
        "eval_windows_per_domain": 64,
        "checkpoint_every": 50,  # steps between checkpoints (0 = only at the end); SIGTERM/SIGINT also checkpoint
    },
    "mixing": {
        "method": "uniform",
        "label": None,  # name in reports (a variant of a method; gradmix compare sets it from compare.overrides)
        "params": {},
        "update_every": 20,
        "warmup_steps": 0,
        "probe_every": None,
        "probe": {},
        "plugins": [],  # modules imported before the run; they may register methods (gradmix.register_method)
        "mode": "quota",
        "max_repeats": None,
        "target_batch_size": 16,
        "log_every": 10,
    },
    # sized so that the defaults run on the default (tiny) corpus; real corpora set their own (configs/main.toml)
    # metrics: your own evaluation metrics, "module:function" called as function(model, context) at every evaluation
    # (see gradmix_kit.experiment.runner.MetricContext); lower_is_better: their names where lower is better
    "eval": {
        "continuation_items": 16,
        "context_tokens": 16,
        "continuation_tokens": 8,
        "num_choices": 4,
        "metrics": [],
        "lower_is_better": [],
    },
    # writers: where metrics go besides metrics.jsonl (always written: reports read it): csv, tensorboard, wandb;
    # alerts: gradmix.alerts.AlertConfig fields; wandb / tensorboard: keyword arguments of those writers
    "logging": {"writers": ["jsonl"], "alerts": {}, "wandb": {}, "tensorboard": {}},
    # `gradmix compare`: which methods and seeds, and per-method config overrides ({method: {section: {...}}})
    "compare": {"methods": None, "seeds": [0], "overrides": {}},
}


# tables whose keys are not config keys (passed on as keyword arguments; checked where they are used)
_OPAQUE_TABLES = ("params", "probe", "overrides", "alerts", "wandb", "tensorboard")


def _merge(base: dict[str, Any], override: dict[str, Any], path: str = "") -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        where = f"{path}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key {where!r}; known here: {sorted(base)}")
        if isinstance(base[key], dict) and key not in _OPAQUE_TABLES:
            if not isinstance(value, dict):
                raise ConfigError(f"config key {where!r} must be a table/object, got {value!r}")
            out[key] = _merge(base[key], value, where + ".")
        elif isinstance(value, dict) and not isinstance(base[key], dict):
            raise ConfigError(f"config key {where!r} is a single value, not a table/object; got {value!r}")
        else:
            out[key] = copy.deepcopy(value)
    return out


# -- value rules ------------------------------------------------------------------------------------------------
Rule = Callable[[Any], "str | None"]  # value -> None if fine, else what was expected


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(low: int | None = None, *, optional: bool = False) -> Rule:
    def rule(value: Any) -> str | None:
        if optional and value is None:
            return None
        if _is_int(value) and (low is None or value >= low):
            return None
        what = "an integer" if low is None else ("a positive integer" if low == 1 else f"an integer >= {low}")
        return what + (" (or unset)" if optional else "")

    return rule


def _number(
    low: float = 0.0,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> Rule:
    def rule(value: Any) -> str | None:
        if optional and value is None:
            return None
        if _is_number(value):
            above = value > low if low_open else value >= low
            below = True if high is None else (value < high if high_open else value <= high)
            if above and below:
                return None
        if high is None:
            bound = f"> {low:g}" if low_open else f">= {low:g}"
        else:
            bound = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        return f"a finite number {bound}" + (" (or unset)" if optional else "")

    return rule


def _string(*, optional: bool = False, choices: tuple[str, ...] | None = None) -> Rule:
    def rule(value: Any) -> str | None:
        if optional and value is None:
            return None
        if isinstance(value, str) and value and (choices is None or value in choices):
            return None
        what = f"one of {', '.join(repr(c) for c in choices)}" if choices else "a non-empty string"
        return what + (" (or unset)" if optional else "")

    return rule


def _list_of(item: Rule, what: str, *, optional: bool = False) -> Rule:
    def rule(value: Any) -> str | None:
        if optional and value is None:
            return None
        if isinstance(value, list) and all(item(v) is None for v in value):
            return None
        return f"a list of {what}" + (" (or unset)" if optional else "")

    return rule


def _threads(value: Any) -> str | None:
    if value == "auto" or (_is_int(value) and value >= 0):
        return None
    return '"auto" or an integer >= 0 (0: torch\'s default)'


def _table(value: Any) -> str | None:
    return None if isinstance(value, dict) else "a table / object"


def _metric_spec(value: Any) -> str | None:
    if isinstance(value, str) and value.count(":") == 1 and all(part.strip() for part in value.split(":")):
        return None
    return '"module:function"'


def _alerts_table(value: Any) -> str | None:
    if not isinstance(value, dict):
        return "a table / object"
    from gradmix.alerts import AlertConfig

    try:
        AlertConfig.from_mapping(value)
    except (TypeError, ValueError) as exc:
        return f"a table of alert thresholds ({exc})"
    return None


# dotted field -> rule; every leaf of DEFAULTS has one (checked by a test)
FIELD_RULES: dict[str, Rule] = {
    "name": _string(),
    "seed": _int(0),
    "steps": _int(1),
    "threads": _threads,
    "device": _string(),
    "data.corpus": _string(),
    "data.data_dir": _string(optional=True),
    "data.domains": _list_of(_string(), "domain names", optional=True),
    "data.languages": _list_of(_string(), "language codes", optional=True),
    "data.expected_corpus": _string(optional=True),
    "data.target": _string(optional=True),
    "data.target_train_fraction": _number(0.0, 1.0, low_open=True, high_open=True),
    "data.max_docs_per_domain": _int(1, optional=True),
    "data.max_train_windows_per_domain": _int(1, optional=True),
    "data.holdout_fraction": _number(0.0, 1.0, low_open=True, high_open=True),
    "data.window": _int(4),
    "data.vocab_size": _int(1),
    "data.tokenizer_docs_per_domain": _int(1),
    "data.split_seed": _int(0),
    "model.d_model": _int(1),
    "model.n_layers": _int(1),
    "model.n_heads": _int(1),
    "model.dropout": _number(0.0, 1.0, high_open=True),
    "train.batch_size": _int(1),
    "train.lr": _number(0.0, low_open=True),
    "train.min_lr_ratio": _number(0.0, 1.0),
    "train.warmup_steps": _int(0),
    "train.weight_decay": _number(0.0),
    "train.grad_clip": _number(0.0, optional=True),
    "train.eval_every": _int(1),
    "train.eval_windows_per_domain": _int(1),
    "train.checkpoint_every": _int(0),
    "mixing.method": _string(),
    "mixing.params": _table,
    "mixing.update_every": _int(1),
    "mixing.warmup_steps": _int(0),
    "mixing.probe_every": _int(1, optional=True),
    "mixing.label": _string(optional=True),
    "mixing.probe": _table,
    "mixing.plugins": _list_of(_string(), "module names"),
    "mixing.mode": _string(choices=("quota", "multinomial")),
    "mixing.max_repeats": _int(1, optional=True),
    "mixing.target_batch_size": _int(1),
    "mixing.log_every": _int(1),
    "eval.continuation_items": _int(0),
    "eval.context_tokens": _int(1),
    "eval.continuation_tokens": _int(1),
    "eval.num_choices": _int(2),
    "eval.metrics": _list_of(_metric_spec, '"module:function" names'),
    "eval.lower_is_better": _list_of(_string(), "metric names"),
    "logging.writers": _list_of(
        _string(choices=("jsonl", "csv", "tensorboard", "wandb")), "writer names (jsonl, csv, tensorboard, wandb)"
    ),
    "logging.alerts": _alerts_table,
    "logging.wandb": _table,
    "logging.tensorboard": _table,
    "compare.methods": _list_of(_string(), "method names", optional=True),
    "compare.seeds": _list_of(_int(0), "integers >= 0"),
    "compare.overrides": _table,
}


def _leaves(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path in FIELD_RULES:
            out[path] = value
        elif isinstance(value, dict):
            out.update(_leaves(value, path + "."))
        else:
            out[path] = value
    return out


def resolve_config(raw: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults and check every value: a wrong type or range is a ``ConfigError`` naming the field."""
    cfg = _merge(DEFAULTS, raw)
    for path, value in _leaves(cfg).items():
        rule = FIELD_RULES.get(path)
        problem = rule(value) if rule is not None else None
        if problem is not None:
            raise ConfigError(f"{path} must be {problem}, got {value!r}")
    return cfg


def parse_overrides(pairs: Any) -> dict[str, Any]:
    """``["train.lr=0.001", "mixing.method=pike"]`` -> nested dict; values are JSON when they parse as JSON, else
    strings. A key that is both a value and a table (``train.lr=0.1`` and ``train.lr.x=1``) is a ``ConfigError``, and
    so is a value that starts like JSON (``[``, ``{``, ``"``) but does not parse (``weights=[1,2``): it was meant
    as a list, and taking it as a string would fail later, or not at all, far from the typo."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        key, text = pair.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {pair!r}: {key!r} is not a dotted config key like train.lr")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            if text.strip()[:1] in ("[", "{", '"'):  # meant as a JSON list / table / string: a typo, not a string
                raise ConfigError(
                    f"--set {key.strip()}: {text!r} is not valid JSON (character {exc.pos}: "
                    f'{exc.msg}); a value starting with [, {{ or " must be JSON'
                ) from None
            value = text
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(
                    f"--set {key}: {where} was already set to the value {child!r}, so it cannot also hold keys"
                )
            node = child
        if isinstance(node.get(parts[-1]), dict) and node[parts[-1]]:
            raise ConfigError(
                f"--set {key}: {key} was already given keys ({', '.join(node[parts[-1]])}), so it "
                "cannot also be a value"
            )
        node[parts[-1]] = value
    return out


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a .toml or .json config, apply ``overrides`` (nested dict), resolve defaults."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config {str(path)!r} is a folder; give a .toml or .json file")
    if not path.is_file():
        raise FileNotFoundError(f"config {str(path)!r} does not exist")
    if path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            try:
                import tomli as tomllib
            except ModuleNotFoundError as exc:
                raise ConfigError(
                    "reading TOML on Python 3.10 needs `pip install tomli` (or use a .json config)"
                ) from exc
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    elif path.suffix == ".json":
        raw = json.loads(path.read_text(encoding="utf-8"))
    else:
        raise ConfigError(f"config {str(path)!r}: use a .toml or .json file")
    raw = _merge_raw(raw, overrides or {})
    raw.setdefault("name", path.stem)
    return resolve_config(raw)


def _merge_raw(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in _OPAQUE_TABLES:
            out[key] = _merge_raw(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
