"""``gradmix run`` and ``gradmix compare``: a real mixing experiment from a config, ending in a run folder.

Pipeline: corpus -> per-domain train/validation split of documents (fixed split seed, shared by every method and
seed) -> byte-level BPE tokenizer (cached) -> token windows -> small GPT trained with a Mixer -> validation loss per
domain during training, continuation accuracy at the end -> ``config.json``, ``metrics.jsonl``, ``summary.json``,
plots and ``report.html``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradmix.checkpoint import write_json_atomic
from gradmix.controller import Mixer, MixingWarning
from gradmix.methods import check_method_params, method_class, resolve_weight_params
from gradmix.runlock import RUN_MARKERS, RunLock, check_run_dir
from gradmix.sources import Domain, DomainSet, pack_tokens, read_documents, text_files
from gradmix.writers import json_safe
from gradmix_kit.corpora.store import resolve_data_dir
from gradmix_kit.experiment.config import ConfigError
from gradmix_kit.experiment.provenance import corpus_record, record_differences
from gradmix_kit.experiment.threads import ThreadChoice, choose_threads
from gradmix_kit.progress import progress_bar
from gradmix_kit.signals import StopSignals

RUN_FOLDER_MARKERS = (*RUN_MARKERS, "checkpoint.pt", "summary.json")
"""A run folder holding any of these (non-empty) holds a started or finished run."""
RUN_FOLDER_OUTPUTS = (
    "config.json",
    "report.html",
    "*.png",
    "comparison.md",
    "comparison_stats.json",
    "*.tmp",
    ".*.tmp",
)
"""Also deleted when ``--overwrite`` replaces a run."""

__all__ = [
    "RUN_FOLDER_MARKERS",
    "MetricContext",
    "PreparedData",
    "load_eval_metrics",
    "prepare_data",
    "run_comparison",
    "run_diagnosis",
    "run_experiment",
]


@dataclass
class PreparedData:
    """Everything a run needs from the corpus, built once and shared by all runs of a comparison."""

    train: DomainSet
    val_windows: dict[str, torch.Tensor]
    val_docs: dict[str, list[list[int]]]
    tokenizer: Any
    vocab_size: int
    target_train: Domain | None = None
    target_val: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)
    _task_cache: dict[tuple, Any] = field(default_factory=dict)


def _import_plugins(cfg: dict[str, Any]) -> None:
    """Import the modules named in ``mixing.plugins``: they register their methods with ``gradmix.register_method``."""
    import importlib

    for module in cfg["mixing"].get("plugins") or []:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"mixing.plugins: cannot import {module!r} ({exc})") from exc


@dataclass
class MetricContext:
    """What a config's own metric (``[eval] metrics = ["module:function"]``) is called with, besides the model:
    ``function(model, context)`` returns a number or a {domain: number} mapping. The model is in eval mode and
    gradients are off while it runs."""

    step: int
    domains: list[str]
    tokenizer: Any
    val_windows: dict[str, torch.Tensor]
    val_docs: dict[str, list[list[int]]]
    target_val: torch.Tensor | None
    config: dict[str, Any]


def load_eval_metrics(cfg: dict[str, Any]) -> dict[str, Callable[..., Any]]:
    """``eval.metrics`` ("module:function") -> {function name: function}; a clear ``ConfigError`` when one cannot
    be imported."""
    import importlib

    out: dict[str, Callable[..., Any]] = {}
    for spec in cfg["eval"].get("metrics") or []:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name.strip())
        except ImportError as exc:
            raise ConfigError(f"eval.metrics: cannot import {module_name!r} ({exc})") from exc
        fn = getattr(module, attr.strip(), None)
        if not callable(fn):
            raise ConfigError(f"eval.metrics: {spec!r}: module {module_name!r} has no function {attr!r}")
        name = attr.strip()
        if name in out:
            raise ConfigError(f"eval.metrics: two metrics are named {name!r}")
        out[name] = fn
    unknown = sorted(set(cfg["eval"].get("lower_is_better") or []) - set(out))
    if unknown:
        raise ConfigError(f"eval.lower_is_better names {unknown}, which are not in eval.metrics")
    return out


def _scalar(value: Any) -> float | None:
    """A metric value as one number: itself, or the mean over domains of a {domain: value} mapping."""
    if isinstance(value, dict):
        numbers = [v for v in value.values() if isinstance(v, (int, float)) and math.isfinite(v)]
        return float(np.mean(numbers)) if numbers and len(numbers) == len(value) else None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _load_corpus_texts(
    data_cfg: dict[str, Any], progress: bool | None = True
) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """domain -> documents: the built-in tiny corpus, a folder of ``<domain>.jsonl`` / ``<domain>.txt`` files (each
    read by ``gradmix.sources.read_documents``), or a named corpus built from registry packages."""
    from gradmix_kit import corpora

    corpus = data_cfg["corpus"]
    data_dir = resolve_data_dir(data_cfg.get("data_dir"))
    if data_cfg.get("languages") is not None and corpus not in corpora.available_corpora():
        raise ConfigError(
            f"data.languages is set, but data.corpus {corpus!r} is not a multilingual corpus built by "
            "gradmix (choose a custom folder's domains with data.domains)"
        )
    if corpus == "tiny":
        return corpora.load_tiny_corpus(), {"corpus": "tiny (built in)"}
    path = Path(str(corpus)).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"data.corpus {corpus!r} is a file; give a folder holding one <domain>.jsonl/.txt each")
        files = text_files(path, path.iterdir())  # a dangling symlink is an error naming it, not skipped
        if not files:
            raise ValueError(f"corpus folder {str(path)!r} holds no <domain>.jsonl or <domain>.txt files")
        by_domain: dict[str, Path] = {}
        for file in files:  # docs.txt and docs.jsonl: one domain from two files, neither may be dropped
            if file.stem in by_domain:
                raise ValueError(
                    f"corpus folder {str(path)!r} has two files for domain {file.stem!r}: "
                    f"{by_domain[file.stem].name} and {file.name}; keep one (or rename one)"
                )
            by_domain[file.stem] = file
        return {p.stem: read_documents(p) for p in files}, {"corpus": str(path)}
    known = ["tiny", *corpora.available_corpora()]
    if corpus not in known:
        raise ConfigError(
            f"data.corpus {corpus!r} is neither a known corpus nor an existing folder; known corpora: "
            f"{', '.join(known)}"
        )
    build: dict[str, Any] = {
        "max_docs_per_domain": data_cfg.get("max_docs_per_domain"),
        "languages": data_cfg.get("languages"),
    }
    if build["languages"] is not None and not corpora.available_languages(corpus):
        raise ConfigError(
            f"data.languages is set, but corpus {corpus!r} has no languages to choose (the multilingual corpora have)"
        )
    try:
        manifest = corpora.build_corpus(corpus, data_dir, progress=progress, **build)
    except corpora.CorpusError as exc:
        raise ConfigError(f"data.corpus {corpus!r}: {exc}") from exc
    texts = corpora.load_corpus(corpus, data_dir, **build)
    return texts, {
        "corpus": corpus,
        "data_dir": str(data_dir),
        "folder": str(corpora.corpus_folder(corpus, data_dir, **build)),
        "manifest": _jsonable(manifest),
    }


def _device(cfg: dict[str, Any]) -> torch.device:
    """The config's ``device``, checked before any training: a clear error when it is not there."""
    try:
        device = torch.device(str(cfg.get("device") or "cpu"))
    except RuntimeError as exc:
        raise ConfigError(f"device {cfg.get('device')!r} is not a torch device ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f'device {str(device)!r}: CUDA is not available on this machine (use device = "cpu")')
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {str(device)!r}: MPS is not available on this machine")
    return device


def _load_target_texts(data_cfg: dict[str, Any], progress: bool | None = True) -> list[str]:
    target = data_cfg["target"]
    path = Path(str(target)).expanduser()
    if path.exists():
        return read_documents(path)
    from gradmix_kit import corpora

    if target not in corpora.available_targets():
        raise ConfigError(
            f"data.target {target!r} is neither a known target set nor an existing file or folder; "
            f"known target sets: {', '.join(corpora.available_targets())}"
        )
    return list(corpora.build_target(target, resolve_data_dir(data_cfg.get("data_dir")), progress=progress))


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(obj)
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        return str(obj)


def _split_docs(docs: list[str], fraction: float, seed: int, name: str) -> tuple[list[str], list[str]]:
    if len(docs) < 2:
        raise ValueError(f"domain {name!r} has {len(docs)} document(s); a train/validation split needs >= 2")
    order = np.random.default_rng([seed, int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)]).permutation(len(docs))
    n_val = min(len(docs) - 1, max(1, round(fraction * len(docs))))
    val = [docs[i] for i in order[:n_val]]
    train = [docs[i] for i in order[n_val:]]
    return train, val


def _top_up_validation(
    name: str, train_texts: dict[str, list[str]], val_texts: dict[str, list[str]], tokenizer: Any, window: int
) -> None:
    """Every domain needs one validation window: when its held-out documents are shorter than that (small clusters
    of short documents), move training documents to validation, last of the split first, until they fill one; a
    domain too small for one training and one validation window stays an error (raised by ``pack_tokens``)."""
    from gradmix_kit.experiment.tokenizer import encode_documents

    def tokens(docs: list[str]) -> int:
        return sum(len(ids) for ids in encode_documents(tokenizer, docs))

    moved = 0
    while tokens(val_texts[name]) < window + 1 and len(train_texts[name]) > 1:
        val_texts[name] = [train_texts[name].pop(), *val_texts[name]]
        moved += 1
    if moved:
        warnings.warn(
            f"domain {name!r}: {moved} training document(s) moved to validation so that it holds one "
            f"validation window of {window + 1} tokens",
            stacklevel=2,
        )


def _tokenizer_for(train_texts: dict[str, list[str]], data_cfg: dict[str, Any], cache_root: Path) -> Any:
    from gradmix_kit.experiment.tokenizer import load_tokenizer, save_tokenizer, train_bpe_tokenizer

    per_domain = int(data_cfg["tokenizer_docs_per_domain"])
    sample = [doc for name in sorted(train_texts) for doc in train_texts[name][:per_domain]]
    digest = hashlib.sha256()
    digest.update(str(data_cfg["vocab_size"]).encode())
    for doc in sample:
        digest.update(hashlib.sha256(doc.encode()).digest())
    path = cache_root / "tokenizers" / f"bpe-{data_cfg['vocab_size']}-{digest.hexdigest()[:16]}.json"
    if path.is_file():
        return load_tokenizer(path)
    tokenizer = train_bpe_tokenizer(sample, vocab_size=int(data_cfg["vocab_size"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer, path)
    return tokenizer


def prepare_data(cfg: dict[str, Any], progress: bool | None = True) -> PreparedData:
    """Corpus -> split -> tokenizer -> windows (train domains, validation windows, target sets). ``progress``: a bar
    while a corpus is built (on a terminal only, ``gradmix_kit.progress``)."""
    from gradmix_kit.experiment.tokenizer import encode_documents

    data_cfg = cfg["data"]
    texts, info = _load_corpus_texts(data_cfg, progress)
    if data_cfg.get("domains"):
        missing = [d for d in data_cfg["domains"] if d not in texts]
        if missing:
            raise ValueError(f"data.domains names {missing}, not in the corpus; it has {sorted(texts)}")
        texts = {d: texts[d] for d in data_cfg["domains"]}
    if data_cfg.get("max_docs_per_domain"):
        texts = {d: docs[: int(data_cfg["max_docs_per_domain"])] for d, docs in texts.items()}
    split_seed = int(data_cfg["split_seed"])
    train_texts, val_texts = {}, {}
    for name, docs in texts.items():
        train_texts[name], val_texts[name] = _split_docs(docs, float(data_cfg["holdout_fraction"]), split_seed, name)

    target_docs: list[str] | None = None
    if data_cfg.get("target"):
        target_docs = _load_target_texts(data_cfg, progress)
        if len(target_docs) < 2:
            raise ValueError(f"target set {data_cfg['target']!r} has {len(target_docs)} document(s); need >= 2")

    cache_root = resolve_data_dir(data_cfg.get("data_dir"))
    tokenizer = _tokenizer_for(train_texts, data_cfg, cache_root)
    window = int(data_cfg["window"])

    domains = []
    val_windows: dict[str, torch.Tensor] = {}
    val_docs: dict[str, list[list[int]]] = {}
    cap = data_cfg.get("max_train_windows_per_domain")
    for name in texts:
        _top_up_validation(name, train_texts, val_texts, tokenizer, window)
        ids = encode_documents(tokenizer, train_texts[name])
        windows = pack_tokens(ids, window, name=name)
        if cap:
            windows = windows[: int(cap)]
        domains.append(Domain(name, windows, len(train_texts[name])))
        v_ids = encode_documents(tokenizer, val_texts[name])
        val_docs[name] = v_ids
        val_windows[name] = pack_tokens(v_ids, window, name=f"{name} (validation)")[
            : cfg["train"]["eval_windows_per_domain"]
        ]
    train = DomainSet(domains)

    target_train = target_val = None
    if target_docs is not None:
        t_train, t_val = _split_docs(target_docs, 1.0 - float(data_cfg["target_train_fraction"]), split_seed, "target")
        target_train = Domain(
            "target", pack_tokens(encode_documents(tokenizer, t_train), window, name="target (train)")
        )
        target_val = pack_tokens(encode_documents(tokenizer, t_val), window, name="target (validation)")[
            : cfg["train"]["eval_windows_per_domain"]
        ]
    info["corpus_record"] = corpus_record(
        train_texts,
        val_texts,
        corpus=str(data_cfg["corpus"]),
        manifest=info.get("manifest"),
        target=target_docs,
        target_name=None if data_cfg.get("target") is None else str(data_cfg["target"]),
        threads=None if cfg.get("threads") == "auto" else cfg.get("threads"),  # None: torch's count now in use
    )
    info.update(
        {
            "domains": train.names,
            "train_windows": dict(zip(train.names, train.sizes)),
            "train_tokens": dict(zip(train.names, train.num_tokens)),
            "val_windows": {k: int(v.shape[0]) for k, v in val_windows.items()},
            "target_train_windows": None if target_train is None else target_train.size,
            "target_val_windows": None if target_val is None else int(target_val.shape[0]),
            "vocab_size": tokenizer.get_vocab_size(),
        }
    )
    return PreparedData(
        train, val_windows, val_docs, tokenizer, tokenizer.get_vocab_size(), target_train, target_val, info
    )


def _continuation_task(data: PreparedData, eval_cfg: dict[str, Any]) -> Any:
    from gradmix_kit.experiment.evaluation import build_continuation_task

    fields = ("continuation_items", "context_tokens", "continuation_tokens", "num_choices")
    key = tuple((name, eval_cfg[name]) for name in fields)
    if key not in data._task_cache:
        data._task_cache[key] = build_continuation_task(
            data.val_docs,
            num_items=int(eval_cfg["continuation_items"]),
            context_tokens=int(eval_cfg["context_tokens"]),
            continuation_tokens=int(eval_cfg["continuation_tokens"]),
            num_choices=int(eval_cfg["num_choices"]),
            seed=0,
            tokenizer=data.tokenizer,
        )
    return data._task_cache[key]


def _method_params(mix_cfg: dict[str, Any], data_cfg: dict[str, Any], data: PreparedData) -> dict[str, Any]:
    """The method's parameters; a method that ``needs_target_counts`` (``importance``) without ``target_counts``
    takes them from the ``clusters.json`` that ``gradmix cluster --target`` wrote next to the corpus folder (the
    target's cluster histogram). Weights given by domain name (``weights = {code = 0.5, web = 0.5}``) become
    positional here, so an unknown or missing name is an error naming ``mixing.params.<key>``."""
    params = resolve_weight_params(mix_cfg.get("params"), data.train.names, label="mixing.params.{key}")
    method = mix_cfg["method"]
    if method_class(method).needs_target_counts and "target_counts" not in params:
        corpus = Path(str(data_cfg["corpus"])).expanduser()
        candidates = [corpus / "clusters.json", corpus.parent / "clusters.json"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ValueError(
                f"method {method!r} needs target_counts: set mixing.params.target_counts, or use a "
                "corpus written by `gradmix cluster --target ...` (its clusters.json holds them)"
            )
        info = json.loads(found.read_text())
        counts = info.get("target_counts")
        if counts is None:
            raise ValueError(f"{found} has no target_counts: rerun `gradmix cluster` with --target")
        names = info.get("domains") or [f"c{i:04d}" for i in range(len(counts))]
        by_name = dict(zip(names, counts))
        missing = [d for d in data.train.names if d not in by_name]
        if missing:
            raise ValueError(f"{found} has no target count for domains {missing}")
        params["target_counts"] = [by_name[d] for d in data.train.names]
    reference_run = params.pop("reference_run", None)
    if method == "doremi" and "reference_loss" not in params:
        if reference_run is None:
            raise ValueError(
                "method 'doremi' needs reference losses: set mixing.params.reference_loss = [...] (one "
                "per domain) or mixing.params.reference_run = a finished run folder (its final "
                "validation losses; gradmix compare uses its uniform run of the same seed)"
            )
        summary_path = Path(str(reference_run)) / "summary.json"
        if not summary_path.is_file():
            raise ValueError(f"mixing.params.reference_run {str(reference_run)!r} has no summary.json (not finished?)")
        reference = json.loads(summary_path.read_text()).get("final_val_loss") or {}
        missing = [d for d in data.train.names if not isinstance(reference.get(d), (int, float))]
        if missing:
            raise ValueError(f"reference run {str(reference_run)!r} has no validation loss for domains {missing}")
        params["reference_loss"] = [float(reference[d]) for d in data.train.names]
    return params


def _check_resume_steps(ckpt_path: Path, steps: int) -> None:
    """Refuse a resume whose ``steps`` is below the steps its checkpoint already trained (a finished 60-step run
    resumed with ``steps = 20`` would otherwise write a summary claiming 20 steps)."""
    from gradmix.checkpoint import load_checkpoint_file

    state = load_checkpoint_file(ckpt_path)
    try:
        done = int(state["gradmix"]["core"]["step"])
    except (KeyError, TypeError, ValueError):
        return  # not a gradmix run checkpoint: Mixer.resume names the problem
    if done > steps:
        raise ConfigError(
            f"--resume: {ckpt_path} has already trained {done} steps, more than steps = {steps}; "
            f"set steps >= {done} to continue it (or start a new run folder)"
        )


def _lr_at(step: int, total: int, base: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up then cosine decay to ``min_ratio * base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def run_experiment(
    cfg: dict[str, Any],
    run_dir: str | Path,
    *,
    data: PreparedData | None = None,
    progress: bool = True,
    resume: bool = False,
    write_plots: bool = True,
    stop: StopSignals | None = None,
    overwrite: bool = False,
    threads: ThreadChoice | None = None,
) -> dict[str, Any]:
    """Train one model with one mixing method; write the run folder; return the summary.

    The folder is locked for the run (``gradmix.runlock``: a second run on it is refused while this one lives). A
    folder that holds a started or finished run (``RUN_FOLDER_MARKERS``) needs ``resume`` (continue from its
    ``checkpoint.pt``; without one, start over) or ``overwrite`` (delete the old run's files, start over).

    ``stop`` (a ``StopSignals`` the caller entered): a SIGTERM / SIGINT during training ends the run at the next
    step boundary with a checkpoint and raises ``RunInterrupted``; ``--resume`` continues from there.

    ``threads``: the thread count chosen by the caller (``gradmix compare`` chooses one for all its runs); default:
    from the config's ``threads`` (``gradmix_kit.experiment.threads.choose_threads``; a resumed ``"auto"`` run keeps
    the count recorded in its ``config.json``)."""
    run_dir = Path(run_dir)
    _import_plugins(cfg)
    cls = method_class(cfg["mixing"]["method"])  # an unknown name fails here, before the data is prepared
    given = {k: v for k, v in (cfg["mixing"].get("params") or {}).items() if k != "reference_run"}
    try:
        check_method_params(cls, given, cfg["mixing"]["method"])  # ... and so does an unknown parameter
    except ValueError as exc:
        raise ConfigError(f"mixing.params: {exc}") from None
    if cls.needs_target and not cfg["data"].get("target") and (data is None or data.target_train is None):
        raise ValueError(f"method {cfg['mixing']['method']!r} needs a target set: set data.target in the config")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir).acquire()  # one owner; released when the run ends, however it ends
    try:
        check_run_dir(
            run_dir,
            resume=resume,
            overwrite=overwrite,
            markers=RUN_FOLDER_MARKERS,
            also_remove=RUN_FOLDER_OUTPUTS,
            flags=("--resume", "--overwrite"),
        )
        return _train_locked(
            cfg,
            run_dir,
            data=data,
            progress=progress,
            resume=resume,
            write_plots=write_plots,
            stop=stop,
            threads=threads,
        )
    finally:
        lock.release()


def _train_locked(
    cfg: dict[str, Any],
    run_dir: Path,
    *,
    data: PreparedData | None,
    progress: bool,
    resume: bool,
    write_plots: bool,
    stop: StopSignals | None,
    threads: ThreadChoice | None = None,
) -> dict[str, Any]:
    """The body of ``run_experiment``, run while the folder's lock is held."""
    from gradmix_kit.experiment.evaluation import evaluate_continuation, evaluate_loss
    from gradmix_kit.experiment.model import GPT, GPTConfig, per_example_loss

    if threads is None:
        previous = _recorded_threads(run_dir) if resume and (run_dir / "checkpoint.pt").exists() else None
        threads = choose_threads(cfg.get("threads", "auto"), previous=previous)
    threads.apply()
    data = data or prepare_data(cfg, progress=progress)
    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    train_cfg, mix_cfg = cfg["train"], cfg["mixing"]
    window = data.train.window_tokens

    device = _device(cfg)
    model = GPT(GPTConfig(vocab_size=data.vocab_size, context_length=window, **cfg["model"])).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=train_cfg["lr"], weight_decay=train_cfg["weight_decay"], betas=(0.9, 0.95)
    )
    method_params = _method_params(mix_cfg, cfg["data"], data)
    probe_params = dict(mix_cfg.get("probe") or {})
    if probe_params.pop("precondition_with_adam", False):
        probe_params["preconditioner"] = optimizer
    metrics_path = run_dir / "metrics.jsonl"
    ckpt_path = run_dir / "checkpoint.pt"
    if resume and ckpt_path.exists():  # before anything in the folder changes (config.json, metrics rows)
        _check_resume_steps(ckpt_path, int(cfg["steps"]))
    log_cfg = cfg.get("logging") or {"writers": ["jsonl"], "alerts": {}, "wandb": {}, "tensorboard": {}}
    writer_names = ["jsonl"] + [w for w in log_cfg["writers"] if w != "jsonl"]  # reports read metrics.jsonl
    fresh = not (resume and ckpt_path.exists())
    if fresh:  # a fresh start (also a resume killed before its first checkpoint): no old rows
        import shutil

        for old in (metrics_path, run_dir / "metrics.csv", run_dir / "summary.json"):
            if old.exists():
                old.unlink()
        if (run_dir / "tensorboard").is_dir():
            shutil.rmtree(run_dir / "tensorboard")
    eval_metrics = load_eval_metrics(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MixingWarning)  # alerts at the start are recorded in metrics.jsonl instead
        mixer = Mixer(
            data.train,
            mix_cfg["method"],
            train_cfg["batch_size"],
            method_params=method_params,
            model=model,
            probe_params=probe_params,
            target=data.target_train,
            run_dir=run_dir,
            resume=True,
            lock=False,  # the folder is checked and locked above
            writers=[w for w in writer_names if w in ("jsonl", "csv")],
            eval_metrics=eval_metrics,
            alerts=log_cfg.get("alerts") or None,
            update_every=mix_cfg["update_every"],
            warmup_steps=mix_cfg["warmup_steps"],
            probe_every=mix_cfg["probe_every"],
            seed=seed,
            mode=mix_cfg["mode"],
            max_repeats=mix_cfg["max_repeats"],
            target_batch_size=mix_cfg["target_batch_size"],
            log_every=mix_cfg["log_every"],
        )
    resolved = dict(cfg)
    resolved["method"] = mix_cfg["method"]
    resolved["label"] = mix_cfg.get("label") or mix_cfg["method"]
    resolved["method_params"] = mix_cfg.get("params") or {}
    resolved["domains"] = data.train.names
    resolved["batch_size"] = train_cfg["batch_size"]
    resolved["corpus"] = cfg["data"]["corpus"]
    resolved["target"] = cfg["data"].get("target")
    resolved["data_info"] = data.info
    resolved["model_parameters"] = sum(p.numel() for p in model.parameters())
    resolved["threads"] = threads.threads  # the count in use (the numbers depend on it)
    resolved["threads_requested"] = threads.requested
    resolved["threads_note"] = threads.note
    write_json_atomic(run_dir / "config.json", resolved)

    start = 0
    if resume and ckpt_path.exists():
        mixer.resume(ckpt_path, model=model, optimizer=optimizer)  # load, then drop rows logged after it
        start = mixer.step_count
    # writers that cannot truncate files are built after the resume: TensorBoard purges the steps after it
    from gradmix.writers import make_writers

    options: dict[str, dict[str, Any]] = {
        "tensorboard": dict(log_cfg.get("tensorboard") or {}),
        "wandb": {
            "config": json_safe(resolved),
            "name": f"{cfg['name']}-{mix_cfg['method']}-s{seed}",
            **dict(log_cfg.get("wandb") or {}),
        },
    }
    if start:
        options["tensorboard"].setdefault("purge_step", start + 1)
    mixer.writers.extend(make_writers([w for w in writer_names if w in ("tensorboard", "wandb")], run_dir, options))

    steps = int(cfg["steps"])
    eval_every = int(train_cfg["eval_every"])
    iterator = range(start, steps)
    bar = progress_bar(steps, f"{cfg['name']}:{mix_cfg['method']}:s{seed}", progress=progress, initial=start)

    def evaluate(step: int) -> dict[str, Any]:
        out: dict[str, Any] = {"val_loss": evaluate_loss(model, data.val_windows)}
        if data.target_val is not None:
            out["target_val_loss"] = evaluate_loss(model, {"target": data.target_val})["target"]
        if step == steps and cfg["eval"]["continuation_items"]:
            out["val_accuracy"] = evaluate_continuation(model, _continuation_task(data, cfg["eval"]))
        if eval_metrics:
            context = MetricContext(
                step, list(data.train.names), data.tokenizer, data.val_windows, data.val_docs, data.target_val, cfg
            )
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    out["eval_metrics"] = mixer.compute_eval_metrics(model, context)
            finally:
                model.train(was_training)
        return out

    step_times: list[float] = []
    stopped_early: str | None = None
    diverged: str | None = None
    started = time.perf_counter()
    batches = mixer.batches()
    last_eval: dict[str, Any] = {}
    if stop is not None:
        stop.deferring = True  # from here a signal is honoured at the next step boundary, with a checkpoint
        stop.where = "while training"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MixingWarning)  # recorded as events in metrics.jsonl instead
        if start == 0:
            last_eval = evaluate(0)
            mixer.log(
                {
                    "step": 0,
                    "weights": dict(zip(data.train.names, map(float, mixer.weights))),
                    "train_loss": {name: None for name in data.train.names},
                    **last_eval,
                }
            )
        for step in iterator:
            t0 = time.perf_counter()
            lr = _lr_at(step, steps, train_cfg["lr"], train_cfg["warmup_steps"], train_cfg["min_lr_ratio"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = next(batches, None)
            if batch is None:  # every domain used its max_repeats passes: stop here, keep what was trained
                stopped_early = mixer.exhausted_message
                log_stop = f"{cfg['name']}:{mix_cfg['method']}:s{seed}: {stopped_early}"
                warnings.warn(log_stop, RuntimeWarning, stacklevel=1)
                break
            if device.type != "cpu":
                batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
            measured = mixer.backward(model, batch, per_example_loss)
            if measured is not None and not math.isfinite(measured.mean_loss):
                stopped_early = diverged = f"step {step + 1}: the run diverged (training loss {measured.mean_loss})"
            if train_cfg.get("grad_clip"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg["grad_clip"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if done % eval_every == 0 or done == steps:
                step_times.append(time.perf_counter() - t0)
                last_eval = evaluate(done)
                mixer.add_metrics(last_eval)
                if not all(math.isfinite(v) for v in last_eval["val_loss"].values()):
                    stopped_early = diverged = f"step {done}: the run diverged (validation loss is not finite)"
            else:
                step_times.append(time.perf_counter() - t0)
            mixer.step()
            if diverged is not None:  # recorded (non-finite values as null); stop instead of training on garbage
                warnings.warn(f"{cfg['name']}:{mix_cfg['method']}:s{seed}: {diverged}", RuntimeWarning, stacklevel=1)
                break
            if stop is not None and stop.received is not None:
                break  # SIGTERM / SIGINT: the checkpoint below is this step boundary's
            ckpt_every = int(train_cfg.get("checkpoint_every") or 0)
            if ckpt_every and done % ckpt_every == 0 and done < steps:
                mixer.save_checkpoint(ckpt_path, model=model, optimizer=optimizer)
            if bar is not None:
                bar.update(1)
                val = last_eval.get("val_loss")
                if val:
                    bar.set_postfix(avg_val=f"{np.mean(list(val.values())):.3f}")
    if bar is not None:
        bar.close()
    mixer.save_checkpoint(ckpt_path, model=model, optimizer=optimizer)
    mixer.close()
    if stop is not None:
        stop.deferring = False
        if stop.received is not None:
            raise stop.interrupted(mixer.step_count, steps, ckpt_path)
        stop.where = (
            f"after step {mixer.step_count}, before the summary was written; the final checkpoint is "
            f"saved to {ckpt_path} (--resume writes the summary)"
        )

    if (
        stopped_early is not None and mixer.step_count not in (0, start) and mixer.step_count % eval_every != 0
    ):  # evaluate the model as the data left it
        last_eval = evaluate(mixer.step_count)
    if "val_loss" not in last_eval:  # resumed from a checkpoint at (or after the last evaluation before) the end
        last_eval = evaluate(mixer.step_count)  # found by scripts/crash_sweep.py: a kill before summary.json
    if "val_accuracy" not in last_eval and cfg["eval"]["continuation_items"]:  # resumed after the last step
        last_eval["val_accuracy"] = evaluate_continuation(model, _continuation_task(data, cfg["eval"]))
    accuracy = last_eval.get("val_accuracy", {})
    val = last_eval["val_loss"]
    summary: dict[str, Any] = {
        "method": mix_cfg["method"],
        "seed": seed,
        "steps": steps,
        "final_val_loss": val,
        "avg_val_loss": float(np.mean(list(val.values()))),
        "worst_val_loss": float(np.max(list(val.values()))),
        "worst_domain": max(val, key=val.get),
        "final_weights": dict(zip(data.train.names, map(float, mixer.weights))),
        "wall_time_s": time.perf_counter() - started,
        "step_time_s": float(np.median(step_times)) if step_times else None,
        "events": len([r for r in mixer.history if r.get("events")]),
        "steps_done": mixer.step_count,
        "threads": threads.threads,
    }
    alerts = [a for r in _read_records(metrics_path) for a in (r.get("alerts") or [])]
    summary["alerts"] = len(alerts)
    if alerts:
        kinds: dict[str, int] = {}
        for alert in alerts:
            kinds[str(alert.get("kind"))] = kinds.get(str(alert.get("kind")), 0) + 1
        summary["alert_kinds"] = kinds
    if "eval_metrics" in last_eval:
        summary["eval_metrics"] = {name: _scalar(value) for name, value in last_eval["eval_metrics"].items()}
        summary["eval_metrics_lower_is_better"] = list(cfg["eval"].get("lower_is_better") or [])
    if stopped_early is not None:
        summary["stopped_early"] = stopped_early
    if accuracy:
        summary["final_val_accuracy"] = accuracy
        summary["avg_val_accuracy"] = float(np.mean(list(accuracy.values())))
    if "target_val_loss" in last_eval:
        summary["target_val_loss"] = float(last_eval["target_val_loss"])
    write_json_atomic(run_dir / "summary.json", json_safe(summary))  # a diverged run's NaN becomes null
    if write_plots:
        try:
            from gradmix_kit.report import write_report

            write_report([run_dir], run_dir, title=f"{cfg['name']} - {mix_cfg['method']} (seed {seed})")
        except ImportError as exc:  # matplotlib is optional
            warnings.warn(f"no plots written: {exc}", stacklevel=2)
    return summary


def _recorded_threads(folder: Path, name: str = "config.json") -> int | None:
    """The thread count a run (``config.json``: ``threads``) or a comparison (``corpus_record.json``:
    ``software.torch_threads``) recorded, or None."""
    try:
        record = json.loads((folder / name).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    value = record.get("software", {}).get("torch_threads") if name == "corpus_record.json" else record.get("threads")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _read_records(path: Path) -> list[dict[str, Any]]:
    from gradmix.writers import JsonlWriter

    return JsonlWriter(path).read()


def run_comparison(
    cfg: dict[str, Any],
    methods: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | Path,
    *,
    method_overrides: dict[str, dict[str, Any]] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    resume: bool = False,
    stop: StopSignals | None = None,
    overwrite: bool = False,
) -> Path:
    """Run every (method, seed) on the same prepared data; write ``comparison.json`` and the report.

    ``resume``: a run whose ``summary.json`` says it finished these steps is kept as it is; a run cut short (killed,
    preempted) continues from its checkpoint; the others start. ``overwrite``: every run starts over (without one of
    the two, a run folder that already holds a run is refused). ``stop``: see ``run_experiment``."""
    import copy

    out_dir = Path(out_dir)
    _import_plugins(cfg)

    def method_of(label: str) -> str:
        """A compared name is a method, or a label whose ``compare.overrides.<label>.mixing.method`` names one
        (variants of one method side by side, e.g. PiKE at two step sizes)."""
        return str(((method_overrides or {}).get(label, {}).get("mixing") or {}).get("method", label))

    for method in methods:
        method_class(method_of(method))  # an unknown name fails before any training
    out_dir.mkdir(parents=True, exist_ok=True)
    # one thread count for every run (runs of one count are bit-identical; the runs go one after another)
    previous = _recorded_threads(out_dir, "corpus_record.json") if resume else None
    threads = choose_threads(cfg.get("threads", "auto"), previous=previous)
    threads.apply()
    log(f"threads: {threads.note}")
    data = prepare_data(cfg, progress=progress)
    log(f"data: {json.dumps(data.info.get('train_windows'))} train windows per domain")
    record = data.info["corpus_record"]
    write_json_atomic(out_dir / "corpus_record.json", record)
    corpus_warnings = check_corpus_record(cfg, record, log)
    runs = []
    for method in methods:
        for seed in seeds:
            run_cfg = copy.deepcopy(cfg)
            run_cfg["seed"] = int(seed)
            run_cfg["mixing"]["method"] = method_of(method)
            run_cfg["mixing"]["label"] = None if method_of(method) == method else method
            overrides = (method_overrides or {}).get(method, {})
            if overrides:
                from gradmix_kit.experiment.config import _merge_raw, resolve_config

                run_cfg = resolve_config(_merge_raw(run_cfg, overrides))
            elif method_of(method) != cfg["mixing"]["method"]:
                run_cfg["mixing"]["params"] = {}
            params = run_cfg["mixing"]["params"]
            if run_cfg["mixing"]["method"] == "doremi" and not {"reference_loss", "reference_run"} & set(params):
                # DoReMi's reference model: the uniform run of the same seed (Xie et al. train it on the uniform mix)
                if "uniform" not in methods or list(methods).index("uniform") > list(methods).index(method):
                    raise ValueError(
                        f"{method!r} (DoReMi) needs a reference: compare 'uniform' before it, or set "
                        "mixing.params.reference_loss / reference_run"
                    )
                params["reference_run"] = str(out_dir / f"uniform-seed{seed}")
            if method_class(run_cfg["mixing"]["method"]).needs_target and data.target_train is None:
                raise ValueError(f"method {method!r} needs a target set: set data.target in the config")
            name = f"{method}-seed{seed}"
            summary = _finished_summary(out_dir / name, run_cfg) if resume else None
            kept = summary is not None
            if summary is None:
                if stop is not None:
                    stop.where = f"before run {name} started training; the finished runs are kept (use --resume)"
                summary = run_experiment(
                    run_cfg,
                    out_dir / name,
                    data=data,
                    progress=progress,
                    write_plots=False,
                    resume=resume,
                    stop=stop,
                    overwrite=overwrite,
                    threads=threads,
                )
            line = f"{name:28s} avg val {summary['avg_val_loss']:.4f}  worst {summary['worst_val_loss']:.4f}"
            if "avg_val_accuracy" in summary:
                line += f"  acc {summary['avg_val_accuracy']:.3f}"
            if "target_val_loss" in summary:
                line += f"  target {summary['target_val_loss']:.4f}"
            line += "  (finished earlier, kept)" if kept else f"  ({summary['wall_time_s']:.0f}s)"
            log(line)
            runs.append(name)
    if stop is not None:
        stop.where = "after the last run, while writing the report; every run is finished (--resume writes it)"
    write_json_atomic(
        out_dir / "comparison.json",
        {
            "runs": runs,
            "methods": list(methods),
            "seeds": list(seeds),
            "config": cfg,
            "corpus_warnings": corpus_warnings,  # the report lists them under "Warnings and alerts"
        },
    )
    from gradmix_kit.report import write_report

    return write_report([out_dir / r for r in runs], out_dir, title=f"{cfg['name']}: method comparison")


def _finished_summary(run_dir: Path, run_cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The summary of a run of ``gradmix compare --resume`` that already finished what ``run_cfg`` asks (its
    ``summary.json`` is the last file a run writes, and it names the method, seed and steps); else None."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # a damaged summary: the run is resumed from its checkpoint, which writes it again
    if not isinstance(summary, dict):
        return None
    same = (summary.get("method"), summary.get("seed"), summary.get("steps")) == (
        run_cfg["mixing"]["method"],
        int(run_cfg["seed"]),
        int(run_cfg["steps"]),
    )
    numbers = all(isinstance(summary.get(key), (int, float)) for key in ("avg_val_loss", "worst_val_loss"))
    return summary if same and numbers else None


def check_corpus_record(cfg: dict[str, Any], record: dict[str, Any], log: Callable[[str], None] = print) -> list[str]:
    """Compare this run's corpus record with ``data.expected_corpus`` (a ``corpus_record.json`` stored beside a
    results table); warn, naming each difference, when they differ. Returns the differences."""
    path = cfg["data"].get("expected_corpus")
    if not path:
        return []
    recorded_path = Path(str(path)).expanduser()
    if not recorded_path.is_file():
        message = (
            f"data.expected_corpus {str(path)!r} does not exist (relative paths are read from the current "
            "folder): nothing to compare this run's corpus with"
        )
        warnings.warn(message, stacklevel=2)
        log(f"WARNING: {message}")
        return [message]
    differences = record_differences(json.loads(recorded_path.read_text()), record)
    if differences:
        message = (
            f"this corpus or software differs from the one recorded in {path}, so the numbers will not "
            "match the recorded table exactly: " + "; ".join(differences)
        )
        warnings.warn(message, stacklevel=2)
        log(f"WARNING: {message}")
    else:
        log(f"corpus and software match the record in {path}")
    return differences


def run_diagnosis(
    cfg: dict[str, Any],
    out_dir: str | Path,
    *,
    steps: int = 30,
    checkpoint: str | Path | None = None,
    threshold: float = 0.1,
    data: PreparedData | None = None,
    progress: bool = True,
    write_page: bool = True,
) -> dict[str, Any]:
    """``gradmix diagnose``: measure the Gramian of the domains' gradients on ``steps`` steps of the config's model
    and data, then ``gradmix.diagnostics.diagnose`` it.

    Without ``checkpoint``: a short training run from scratch (the config's optimizer settings and learning-rate
    schedule over ``steps`` steps, a uniform mix so every domain is measured alike) whose every step goes through a
    ``GradientProbe(gram=True)`` (the config's ``mixing.probe`` settings apply, e.g. ``parameters = "last:4"``).
    With ``checkpoint`` (a ``checkpoint.pt`` of ``gradmix run`` with the same model config, or any file
    ``gradmix.checkpoint`` wrote with a ``model`` entry): the model is loaded and probed on ``steps`` batches
    without training. Writes ``diagnosis.json``, ``cosine_heatmap.png``, ``cosine_over_time.png`` and
    ``diagnosis.html`` into ``out_dir``; returns the diagnosis as a dict.
    """
    from gradmix.checkpoint import load_checkpoint_file
    from gradmix.diagnostics import diagnose
    from gradmix.probe import GradientProbe
    from gradmix.sampler import MixtureSampler
    from gradmix_kit.experiment.model import GPT, GPTConfig, per_example_loss

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"diagnose: --steps must be a positive integer, got {steps!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    choose_threads(cfg.get("threads", "auto")).apply()
    data = data or prepare_data(cfg, progress=progress)
    names = list(data.train.names)
    if len(names) < 2:
        raise ValueError(f"diagnose needs at least 2 domains; the config has {names}")
    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    train_cfg, mix_cfg = cfg["train"], cfg["mixing"]
    model = GPT(GPTConfig(vocab_size=data.vocab_size, context_length=data.train.window_tokens, **cfg["model"]))
    source = "training from scratch"
    if checkpoint is not None:
        state = load_checkpoint_file(checkpoint)
        if "model" not in state:
            raise ValueError(f"checkpoint {str(checkpoint)!r} holds no model state")
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise ValueError(f"checkpoint {str(checkpoint)!r} does not fit the config's model: {exc}") from None
        source = f"checkpoint {checkpoint} (no training)"
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=train_cfg["lr"], weight_decay=train_cfg["weight_decay"], betas=(0.9, 0.95)
    )
    probe_params = dict(mix_cfg.get("probe") or {})
    probe_params.pop("precondition_with_adam", None)
    probe_params.pop("preconditioner", None)
    probe_params["gram"] = True
    probe = GradientProbe(model, **probe_params)
    k = len(names)
    sampler = MixtureSampler(
        data.train.sizes,
        train_cfg["batch_size"],
        np.full(k, 1.0 / k),
        seed=seed,
        domain_names=names,
        shuffle=data.train.shuffle,
    )
    grams, measured_steps, losses = [], [], []
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=steps, desc=f"{cfg['name']}:diagnose", leave=False, dynamic_ncols=True)
        except ImportError:
            bar = None
    started = time.perf_counter()
    for step in range(steps):
        domains, examples = sampler.next_arrays()
        batch = data.train.gather(domains, examples)
        result = probe.backward(batch, batch["domain"].long(), k, per_example_loss, measure=True)
        if checkpoint is None:
            lr = _lr_at(step, steps, train_cfg["lr"], train_cfg["warmup_steps"], train_cfg["min_lr_ratio"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            if train_cfg.get("grad_clip"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg["grad_clip"])
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if result is not None and result.gram is not None:
            grams.append(result)  # the Measurement: its Gramian and per-domain example counts
            measured_steps.append(step + 1)
            losses.append(result.mean_loss)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    # without training every step probes the same iterate: one block (no phases to keep apart)
    window = max(1, len(grams)) if checkpoint is not None else None
    diagnosis = diagnose(grams, names, steps=measured_steps, threshold=threshold, window=window)
    record = json_safe(diagnosis.to_dict())
    record.update(
        {
            "source": source,
            "config": cfg.get("name"),
            "batch_size": int(train_cfg["batch_size"]),
            "probe": json_safe({k_: v for k_, v in probe_params.items()}),
            "probed_parameters": probe.num_probed,
            "train_loss": [None if not math.isfinite(v) else float(v) for v in losses],
            "wall_time_s": time.perf_counter() - started,
        }
    )
    write_json_atomic(out / "diagnosis.json", record)
    if write_page:
        try:
            from gradmix_kit.report import write_diagnosis_report

            write_diagnosis_report(record, out, title=f"{cfg['name']}: gradient conflict diagnosis")
        except ImportError as exc:  # matplotlib is optional
            warnings.warn(f"no diagnosis page written: {exc}", stacklevel=2)
    return record
