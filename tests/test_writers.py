"""Metrics writers: JSONL, CSV, TensorBoard and (offline) Weights & Biases, one set of names (issue 12)."""

from __future__ import annotations

import csv
import json
import os
import time

import numpy as np
import pytest
import torch

from gradmix import Mixer
from gradmix.sources import DomainSet
from gradmix.writers import CsvWriter, flatten_record, make_writers, scalar_metrics

RECORDS = [
    {"step": 1, "weights": {"en": 0.5, "de": 0.5}, "train_loss": {"en": 2.0, "de": None}, "max_weight": 0.5},
    {
        "step": 2,
        "weights": {"en": 0.6, "de": 0.4},
        "train_loss": {"en": 1.9, "de": 2.2},
        "max_weight": 0.6,
        "val_loss": {"en": 2.1, "de": 2.4},
        "train_val_gap": {"en": 0.2, "de": 0.2},
        "alerts": [{"kind": "collapse", "step": 2, "domain": "en", "message": "step 2: the mix collapsed, 'x'"}],
    },
    {
        "step": 3,
        "weights": {"en": 0.7, "de": 0.3},
        "train_loss": {"en": float("nan"), "de": 2.1},
        "max_weight": 0.7,
        "update_terms": {"gain": {"en": 0.1, "de": 0.2}},
    },
]


def test_flattened_names_are_shared():
    flat = flatten_record(RECORDS[1])
    assert flat["weights/en"] == 0.6 and flat["val_loss/de"] == 2.4 and flat["train_val_gap/en"] == 0.2
    scalars = scalar_metrics(RECORDS[2])
    assert scalars["update_terms/gain/de"] == 0.2 and "train_loss/en" not in scalars  # NaN left out
    assert scalars["alerts_count"] == 0 and scalar_metrics(RECORDS[1])["alerts_count"] == 1


def test_csv_header_grows_and_stays_one_valid_csv(tmp_path):
    writer = CsvWriter(tmp_path / "metrics.csv")
    for record in RECORDS:
        writer.write(record)
    with (tmp_path / "metrics.csv").open(newline="") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    assert len(body) == 3 and all(len(r) == len(header) for r in body)
    assert rows[0].count("step") == 1 and "update_terms/gain/en" in header and "val_loss/en" in header
    table = writer.read()
    assert table[0]["val_loss/en"] == "" and table[1]["val_loss/en"] == "2.1"
    assert json.loads(table[1]["alerts"])[0]["kind"] == "collapse"
    assert table[2]["train_loss/en"] == ""  # NaN -> empty cell
    # a fresh writer on the same file appends under the same header; truncate drops later rows
    again = CsvWriter(tmp_path / "metrics.csv")
    again.write({"step": 4, "weights": {"en": 0.8, "de": 0.2}, "max_weight": 0.8})
    assert [r["step"] for r in again.read()] == ["1", "2", "3", "4"]
    assert again.truncate_after(2) == 2 and [r["step"] for r in again.read()] == ["1", "2"]


def test_tensorboard_event_file_written_and_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (writer,) = make_writers(["tensorboard"], tmp_path)
    for record in RECORDS:
        writer.write(record)
    writer.close()
    files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert files
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "weights/en",
        "weights/de",
        "train_loss/en",
        "max_weight",
        "val_loss/de",
        "train_val_gap/en",
        "update_terms/gain/en",
        "alerts_count",
    } <= tags
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("weights/en")] == [(1, 0.5), (2, 0.6), (3, 0.7)]
    assert [e.step for e in acc.Scalars("val_loss/en")] == [2]
    assert [e.step for e in acc.Scalars("train_loss/en")] == [1, 2]  # the NaN at step 3 is not a point


def _read_wandb_records(path):
    """Decode an offline run's .wandb transaction log: a 7-byte header (":W&B", magic, version), then LevelDB-log
    style chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks, each a protobuf Record
    (wandb.proto.wandb_internal_pb2, wandb's own message types)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        chunk = data[pos : pos + length]
        pos += length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            chunks.append(pending + chunk)
            pending = b""
    records = []
    for raw in chunks:
        record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
        record.ParseFromString(raw)
        records.append(record)
    return records


def test_wandb_offline_run_written_and_read_back(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))
    (writer,) = make_writers(["wandb"], tmp_path, {"wandb": {"project": "gradmix-test", "name": "offline"}})
    for record in RECORDS:
        writer.write(record)
    run_dir = writer.run_dir
    writer.close()
    assert run_dir is not None and run_dir.name.startswith("offline-run-")
    (log,) = list(run_dir.glob("*.wandb"))
    # wandb's service process may still be writing the offline file after finish() returns on a loaded machine:
    # read it again until the summary (written last) is there, for at most 60 s
    deadline = time.monotonic() + 60.0
    while True:
        history: list[dict] = []
        summary: dict = {}
        for record in _read_wandb_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                history.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
            elif kind == "summary":
                summary.update(
                    {
                        item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.summary.update
                    }
                )
        if "alerts" in summary or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [h["_step"] for h in history] == [1, 2, 3]
    assert [h["weights/en"] for h in history] == [0.5, 0.6, 0.7]
    assert history[1]["val_loss/de"] == 2.4 and history[1]["alerts_count"] == 1
    assert history[2]["update_terms/gain/en"] == 0.1 and "train_loss/en" not in history[2]
    assert summary["weights/en"] == 0.7 and summary["alerts"] == ["step 2: the mix collapsed, 'x'"]


def test_mixer_writers_by_name(tmp_path):
    pytest.importorskip("tensorboard")
    rng = np.random.default_rng(0)
    domains = DomainSet.from_arrays({f"d{i}": rng.integers(0, 12, size=(30, 5)) for i in range(2)})
    mixer = Mixer(domains, "uniform", 8, run_dir=tmp_path, writers=["jsonl", "csv", "tensorboard"], log_every=1)
    for batch in mixer.batches(3):
        mixer.observe(batch["domain"], torch.ones(len(batch["domain"])))
        mixer.step()
    mixer.close()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    assert len(CsvWriter(tmp_path / "metrics.csv").read()) == 3
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    with pytest.raises(ValueError, match="unknown metrics writer"):
        make_writers(["parquet"], tmp_path)
    assert os.environ.get("WANDB_MODE") != "online"
