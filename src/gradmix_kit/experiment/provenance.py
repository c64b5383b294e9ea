"""What a result was measured on: a corpus record to store beside a results table, and a check against it.

A comparison's numbers depend on the exact documents (which the registry packages' versions decide), the
tokenizer sample, and the software that trains on them (torch's kernels and thread count change float rounding).
``corpus_record`` captures all of that in a small JSON-able dict: per domain the SHA-256 of the documents actually
used (after domain selection, caps and the train/validation split), their count, and the source package and version;
the same for the target set; and the versions of python / torch / numpy / tokenizers and the thread count.
``record_differences`` lists, in words, what differs between a recorded record and the current one, so a run on a
fresh machine can say *why* its numbers may differ before anybody compares them.
"""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

__all__ = ["corpus_record", "documents_digest", "record_differences"]

_PACKAGES = ("torch", "numpy", "tokenizers", "gradmix")


def documents_digest(docs: Sequence[str]) -> str:
    """SHA-256 over the documents in order (each document hashed, so boundaries count)."""
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(hashlib.sha256(doc.encode("utf-8")).digest())
    return digest.hexdigest()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    """The CPU model (its vector units decide which kernels torch runs, hence the float rounding)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def corpus_record(
    train: Mapping[str, Sequence[str]],
    val: Mapping[str, Sequence[str]],
    *,
    corpus: str,
    manifest: Mapping[str, Any] | None = None,
    target: Sequence[str] | None = None,
    target_name: str | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """The record of the documents a run trains and evaluates on, and the software it runs with."""
    sources = (manifest or {}).get("domains", {})
    domains = {}
    for name in train:
        source = sources.get(name, {})
        domains[name] = {
            "train_docs": len(train[name]),
            "val_docs": len(val.get(name, ())),
            "train_sha256": documents_digest(train[name]),
            "val_sha256": documents_digest(val.get(name, ())),
            "source": None if not source else f"{source.get('source_package')} {source.get('source_version')}",
        }
    record: dict[str, Any] = {"corpus": corpus, "domains": domains}
    if target is not None:
        record["target"] = {"name": target_name, "docs": len(target), "sha256": documents_digest(target)}
    import torch

    record["software"] = {
        "python": platform.python_version(),
        **{package: _version(package) for package in _PACKAGES},
        "torch_threads": threads if threads else torch.get_num_threads(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
    }
    return record


def record_differences(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """What differs between a recorded corpus record and this run's, one line per difference (empty: identical)."""
    out: list[str] = []
    exp_domains, act_domains = expected.get("domains", {}), actual.get("domains", {})
    missing = [d for d in exp_domains if d not in act_domains]
    extra = [d for d in act_domains if d not in exp_domains]
    if missing:
        out.append(f"domains {missing} are in the recorded corpus but not in this one")
    if extra:
        out.append(f"domains {extra} are in this corpus but not in the recorded one")
    for name in exp_domains:
        if name not in act_domains:
            continue
        e, a = exp_domains[name], act_domains[name]
        if e.get("source") != a.get("source"):
            out.append(f"domain {name!r}: source package {a.get('source')!r}, recorded {e.get('source')!r}")
        for key in ("train_docs", "val_docs"):
            if e.get(key) != a.get(key):
                out.append(f"domain {name!r}: {a.get(key)} {key.replace('_', ' ')}, recorded {e.get(key)}")
        if (e.get("train_sha256"), e.get("val_sha256")) != (a.get("train_sha256"), a.get("val_sha256")):
            out.append(f"domain {name!r}: its documents differ from the recorded ones (SHA-256)")
    e_target, a_target = expected.get("target"), actual.get("target")
    if (e_target or {}).get("sha256") != (a_target or {}).get("sha256"):
        out.append(
            f"target set: {None if a_target is None else a_target.get('docs')} documents, recorded "
            f"{None if e_target is None else e_target.get('docs')} (SHA-256 differs)"
        )
    e_soft, a_soft = expected.get("software", {}), actual.get("software", {})
    for key in sorted(set(e_soft) | set(a_soft)):
        if key != "gradmix" and e_soft.get(key) != a_soft.get(key):
            out.append(f"{key}: {a_soft.get(key)}, recorded {e_soft.get(key)} (float rounding may differ)")
    return out
