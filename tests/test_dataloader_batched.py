"""``mixer.dataloader()`` reads whole batches (``DomainSet.__getitems__`` -> ``gather``), issue #20 item 4.

The batched path must yield exactly what the per-example path did (torch calling ``DomainSet.__getitem__`` per key,
``collate_examples`` stacking): same examples, order, ``domain`` / ``index`` fields and dtypes, with workers, across
weight changes, and after a resume mid-pass. Rows are also checked against the raw token arrays, independently of
any reader.
"""

from __future__ import annotations

import pickle
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from gradmix import Mixer, sources
from gradmix.methods.base import MixingMethod
from gradmix.sources import Domain, DomainSet, GatheredExamples, StreamDomain, TokenFileDomain, collate_examples

T = 16
Batch = dict[str, torch.Tensor]


class PerExample(Dataset):
    """The DomainSet seen without ``__getitems__``: the DataLoader reads key by key, as before the batched path."""

    def __init__(self, domains: DomainSet) -> None:
        self.domains = domains

    def __len__(self) -> int:
        return len(self.domains)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        return self.domains[key]


def _raw(tmp_path: Path) -> dict[str, np.ndarray]:
    """Raw windows per domain (what each row must hold), and the files holding them."""
    rng = np.random.default_rng(3)
    flat16 = rng.integers(0, 60_000, size=37 * T + 1 + 5, dtype=np.uint16)  # a tail shorter than a window
    flat16.tofile(tmp_path / "a.bin")
    flat32 = rng.integers(0, 2**31 - 1, size=23 * T + 1, dtype=np.int32)
    flat32.tofile(tmp_path / "b.bin")
    rows32 = rng.integers(0, 50_000, size=(29, T + 1), dtype=np.int32)
    np.save(tmp_path / "c.npy", rows32)
    mem = rng.integers(0, 1000, size=(31, T + 1))
    return {
        "a": np.stack([flat16[i * T : i * T + T + 1] for i in range(37)]).astype(np.int64),
        "b": np.stack([flat32[i * T : i * T + T + 1] for i in range(23)]).astype(np.int64),
        "c": rows32.astype(np.int64),
        "m": mem,
    }


def _domains(tmp_path: Path, raw: dict[str, np.ndarray], stream: bool = False) -> DomainSet:
    doms: list[Any] = [
        TokenFileDomain("a", tmp_path / "a.bin", T, "uint16"),
        TokenFileDomain("b", tmp_path / "b.bin", T, "int32"),
        TokenFileDomain("c", tmp_path / "c.npy", None),
        Domain("m", torch.from_numpy(raw["m"])),
    ]
    if stream:  # windows of one flat stream, cut in order: the stream re-reads over passes
        tokens = raw["s"]
        docs = [tokens[i : i + 50].tolist() for i in range(0, tokens.size, 50)]
        doms.append(StreamDomain("s", docs, T, size=(tokens.size - 1) // T))
    return DomainSet(doms)


class Drift(MixingMethod):
    """New mixed weights at every update, from a counter (resumable): batches mix several domains, and the mix moves."""

    name = "test_drift"

    def __init__(self, num_domains: int) -> None:
        super().__init__(num_domains)
        self.draws = 0

    def _update(self, stats: Any) -> np.ndarray:
        self.draws += 1
        return np.random.default_rng([7, self.draws]).dirichlet(np.ones(self.num_domains)) + 0.05

    def _extra_state(self) -> dict[str, Any]:
        return {"draws": self.draws}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.draws = int(state["draws"])


def _mixer(domains: DomainSet) -> Mixer:
    return Mixer(domains, Drift(len(domains.names)), 8, seed=5, update_every=3, log_every=10**9)


def _run(mixer: Mixer, loader: Any, steps: int, save_at: int | None = None) -> tuple[list[Batch], Any]:
    """Train-loop stand-in: consume ``steps`` batches, step the Mixer (weights change every 3), snapshot at
    ``save_at`` (while a DataLoader with workers holds prefetched batches)."""
    out, state = [], None
    for batch in loader:
        if mixer.step_count >= steps:
            break
        out.append(batch)
        mixer.observe(batch["domain"], batch["input_ids"].float().mean(1))
        mixer.step()
        if mixer.step_count == save_at:
            state = mixer.state_dict()
    return out, state


def _same(got: list[Batch], ref: list[Batch]) -> None:
    assert len(got) == len(ref)
    for step, (g, r) in enumerate(zip(got, ref, strict=True)):
        assert type(g) is dict and sorted(g) == sorted(r) == ["domain", "index", "input_ids"], step
        for key in r:
            assert g[key].dtype == r[key].dtype == torch.long, (step, key)
            assert g[key].shape == r[key].shape, (step, key)
            assert g[key].is_contiguous(), (step, key)
            assert torch.equal(g[key], r[key]), (step, key)


def _check_rows(batches: list[Batch], domains: DomainSet, raw: dict[str, np.ndarray]) -> None:
    for batch in batches:
        for row, d, i in zip(batch["input_ids"], batch["domain"].tolist(), batch["index"].tolist(), strict=True):
            assert row.tolist() == raw[domains.names[d]][i].tolist()


def _no_single_reads(self: DomainSet, key: Any) -> Any:
    raise AssertionError(f"per-example read of {key}: the batched path was not taken")


@pytest.mark.parametrize("workers, pipe", [(0, True), (2, True), (2, False)])
def test_batched_loader_yields_what_the_per_example_path_did(
    tmp_path: Path, workers: int, pipe: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = _raw(tmp_path)
    kw: dict[str, Any] = {"num_workers": workers}
    fast = _mixer(_domains(tmp_path, raw))
    with monkeypatch.context() as patch:  # (workers are forked: they see the patch too)
        patch.setattr(DomainSet, "__getitem__", _no_single_reads)
        if not pipe:  # every batch leaves its worker through shared memory, as a large one does
            patch.setattr(sources, "_PIPE_MAX_BYTES", 0)
        got, _ = _run(fast, fast.dataloader(**kw), 24)  # 24 x 8 examples: every domain wraps into a new pass
    # a batch from a worker's pipe is in private memory; one handed over through shared memory is shared
    assert all(b["input_ids"].is_shared() == (workers > 0 and not pipe) for b in got)
    slow = _mixer(_domains(tmp_path, raw))
    ref_loader = DataLoader(PerExample(slow.domains), batch_sampler=slow.sampler, collate_fn=collate_examples, **kw)
    ref, _ = _run(slow, ref_loader, 24)
    _same(got, ref)
    _check_rows(got, fast.domains, raw)
    assert len({tuple(b["domain"].tolist()) for b in got}) > 3  # weights moved: not one fixed pattern
    assert min(len(set(b["domain"].tolist())) for b in got) >= 2  # every batch mixes domains
    if workers == 0:  # no prefetch: the same batches as the loop without a DataLoader
        plain = _mixer(_domains(tmp_path, raw))
        _same(got, _run(plain, plain.batches(24), 24)[0])


def test_batched_loader_with_a_stream_domain(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    raw["s"] = np.random.default_rng(9).integers(0, 500, size=19 * T + 1)
    fast = _mixer(_domains(tmp_path, raw, stream=True))
    got, _ = _run(fast, fast.dataloader(), 20)
    slow = _mixer(_domains(tmp_path, raw, stream=True))
    ref, _ = _run(
        slow, DataLoader(PerExample(slow.domains), batch_sampler=slow.sampler, collate_fn=collate_examples), 20
    )
    _same(got, ref)
    stream = raw.pop("s")
    raw["s"] = np.stack([stream[i * T : i * T + T + 1] for i in range(19)])
    _check_rows(got, fast.domains, raw)


def test_resume_mid_pass_with_workers_matches_the_uninterrupted_per_example_run(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    steps, save_at = 20, 7  # step 7: mid-pass for every domain, with 4 batches prefetched by 2 workers
    full = _mixer(_domains(tmp_path, raw))
    ref_loader = DataLoader(
        PerExample(full.domains), batch_sampler=full.sampler, collate_fn=collate_examples, num_workers=2
    )
    ref, _ = _run(full, ref_loader, steps)

    first = _mixer(_domains(tmp_path, raw))
    head, state = _run(first, first.dataloader(num_workers=2, prefetch_factor=2), steps, save_at=save_at)
    assert state is not None
    resumed = _mixer(_domains(tmp_path, raw))
    resumed.load_state_dict(state)
    tail, _ = _run(resumed, resumed.dataloader(num_workers=2, prefetch_factor=2), steps)
    _same(head[:save_at] + tail, ref)
    _same(head, ref)


def test_any_collate_fn_still_sees_per_example_dicts(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    fast = _mixer(_domains(tmp_path, raw))
    got, _ = _run(fast, fast.dataloader(collate_fn=default_collate), 6)
    slow = _mixer(_domains(tmp_path, raw))
    ref, _ = _run(slow, DataLoader(PerExample(slow.domains), batch_sampler=slow.sampler, collate_fn=default_collate), 6)
    _same(got, ref)

    keys = [(0, 3), (3, 1), (0, 3), (2, 28)]
    items = fast.domains.__getitems__(keys)
    assert isinstance(items, GatheredExamples) and len(items) == 4
    for item, key in zip(items, keys, strict=True):
        want = fast.domains[key]
        assert (item["domain"], item["index"]) == (want["domain"], want["index"]) == key
        assert torch.equal(item["input_ids"], want["input_ids"])
    assert [e["index"] for e in items[1:3]] == [1, 3] and items[-1]["index"] == 28
    with pytest.raises(IndexError):
        items[4]


def test_gather_in_any_order_matches_single_reads(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    ds = _domains(tmp_path, raw)
    rng = np.random.default_rng(1)
    for trial in range(20):
        n = int(rng.integers(1, 40))
        doms = rng.integers(0, 4, size=n)
        if trial % 2:  # sorted by domain, as the sampler hands them: the slice path
            doms = np.sort(doms)
        idx = np.array([rng.integers(0, ds.sizes[d]) for d in doms], dtype=np.int64)
        batch = ds.gather(doms, idx)
        for row, d, i in zip(batch["input_ids"], doms.tolist(), idx.tolist(), strict=True):
            assert row.tolist() == raw[ds.names[d]][i].tolist()
        assert batch["domain"].tolist() == doms.tolist() and batch["index"].tolist() == idx.tolist()
        assert all(t.is_contiguous() and t.dtype == torch.long for t in batch.values())
    empty = ds.gather(np.empty(0, np.int64), np.empty(0, np.int64))
    assert empty["input_ids"].shape == (0, T + 1) and empty["domain"].shape == (0,)
    with pytest.raises(IndexError, match="domain index 4"):
        ds.gather(np.array([0, 4]), np.array([0, 0]))
    with pytest.raises(IndexError, match="out of range for 37"):
        ds.gather(np.array([0]), np.array([37]))


def test_a_piped_batch_unpickles_as_a_plain_dict_of_the_same_tensors(tmp_path: Path) -> None:
    batch = _domains(tmp_path, _raw(tmp_path)).gather(np.array([0, 0, 2, 3]), np.array([5, 1, 7, 30]))
    for dumps in (pickle.dumps, ForkingPickler.dumps):  # what a DataLoader worker's queue uses
        back = pickle.loads(dumps(sources._PipedBatch(batch)))
        assert type(back) is dict and sorted(back) == sorted(batch)
        for key, value in batch.items():
            got = back[key]
            assert type(got) is torch.Tensor and got.dtype == value.dtype and got.is_contiguous()
            assert torch.equal(got, value)
            got += 1  # writable, and not the sender's memory
        assert not torch.equal(back["input_ids"], batch["input_ids"])


def test_a_subclass_with_its_own_getitem_is_still_read_through_it(tmp_path: Path) -> None:
    class Tagged(DomainSet):
        def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
            return {**super().__getitem__(key), "tag": 1}

    raw = _raw(tmp_path)
    ds = Tagged(_domains(tmp_path, raw).domains)
    batch = next(iter(DataLoader(ds, batch_sampler=[[(0, 1), (2, 3)]], collate_fn=default_collate)))
    assert batch["tag"].tolist() == [1, 1] and batch["index"].tolist() == [1, 3]
    assert batch["input_ids"][1].tolist() == raw["c"][3].tolist()
