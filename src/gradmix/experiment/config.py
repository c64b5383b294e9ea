"""Experiment configs for ``gradmix run`` / ``gradmix compare``: TOML or JSON, validated, with defaults filled in.

Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

__all__ = ["DEFAULTS", "load_config", "resolve_config", "ConfigError"]


class ConfigError(ValueError):
    """A config names an unknown key or holds a value of the wrong kind."""


DEFAULTS: dict[str, Any] = {
    "name": "experiment",
    "seed": 0,
    "steps": 200,
    "threads": 0,  # torch threads; 0 = torch's default
    "data": {
        "corpus": "tiny",  # tiny | multilingual | domains | ... (gradmix.corpora) | a folder of <domain>.jsonl/.txt
        "data_dir": None,  # where corpora are built/cached (default: $GRADMIX_DATA or ~/.cache/gradmix)
        "domains": None,  # subset of domains, in this order
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
        "checkpoint_every": 0,  # 0 = only at the end
    },
    "mixing": {
        "method": "uniform",
        "params": {},
        "update_every": 20,
        "warmup_steps": 0,
        "probe_every": None,
        "probe": {},
        "mode": "quota",
        "max_repeats": None,
        "target_batch_size": 16,
        "log_every": 10,
    },
    "eval": {"continuation_items": 40, "context_tokens": 32, "continuation_tokens": 12, "num_choices": 4},
    # `gradmix compare`: which methods and seeds, and per-method config overrides ({method: {section: {...}}})
    "compare": {"methods": None, "seeds": [0], "overrides": {}},
}


def _merge(base: dict[str, Any], override: dict[str, Any], path: str = "") -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        where = f"{path}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key {where!r}; known here: {sorted(base)}")
        if isinstance(base[key], dict) and key not in ("params", "probe", "overrides"):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {where!r} must be a table/object, got {value!r}")
            out[key] = _merge(base[key], value, where + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_config(raw: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults and check the values a run depends on."""
    cfg = _merge(DEFAULTS, raw)
    for key in ("steps",):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"{key} must be a positive integer, got {cfg[key]!r}")
    train = cfg["train"]
    for key in ("batch_size", "eval_every", "eval_windows_per_domain"):
        if not isinstance(train[key], int) or train[key] < 1:
            raise ConfigError(f"train.{key} must be a positive integer, got {train[key]!r}")
    if not (isinstance(train["lr"], (int, float)) and train["lr"] > 0):
        raise ConfigError(f"train.lr must be a positive number, got {train['lr']!r}")
    data = cfg["data"]
    if not 0 < data["holdout_fraction"] < 1:
        raise ConfigError(f"data.holdout_fraction must be in (0, 1), got {data['holdout_fraction']!r}")
    if not isinstance(data["window"], int) or data["window"] < 4:
        raise ConfigError(f"data.window must be an integer >= 4, got {data['window']!r}")
    if not isinstance(cfg["mixing"]["method"], str):
        raise ConfigError(f"mixing.method must be a method name, got {cfg['mixing']['method']!r}")
    return cfg


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a .toml or .json config, apply ``overrides`` (nested dict), resolve defaults."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config {str(path)!r} does not exist")
    if path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ModuleNotFoundError as exc:
                raise ConfigError("reading TOML on Python 3.10 needs `pip install tomli` (or use a .json config)") from exc
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
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("params", "probe", "overrides"):
            out[key] = _merge_raw(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
