"""Domains that stay on disk: memory-mapped token files, HF map-style datasets and streams (issue #8, item 3).

Expected windows are computed independently (``pack_tokens`` on the same tokens, or explicit slicing), so a wrong
offset, stride, dtype or ordering in the readers fails here.
"""

from __future__ import annotations

import pickle
from typing import Any, cast

import numpy as np
import pytest
import torch

from gradmix.sources import (
    DocumentSplitError,
    Domain,
    DomainSet,
    DomainSource,
    HFDatasetDomain,
    StreamDomain,
    TokenFileDomain,
    pack_tokens,
)

T = 8


def _stream(n: int, high: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, size=n, dtype=np.int64)


def _docs(seed: int = 0, n_docs: int = 40) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 1000, size=int(rng.integers(0, 30))).tolist() for _ in range(n_docs)]


# -- token files ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,high", [("uint16", 65535), ("uint32", 2**32 - 1)])
def test_bin_windows_equal_pack_tokens(tmp_path, dtype, high):
    tokens = _stream(1003, high)
    path = tmp_path / "d.bin"
    tokens.astype(dtype).tofile(path)
    dom = TokenFileDomain("d", path, T, dtype=dtype)
    expected = pack_tokens([tokens], T)
    assert dom.size == expected.shape[0] == (1003 - 1) // T
    assert dom.window_tokens == T and dom.num_tokens == dom.size * T
    assert dom.shuffle is True and isinstance(dom, DomainSource)
    got = dom.take(np.arange(dom.size))
    assert got.dtype == torch.int64
    assert torch.equal(got, expected)
    # any order, with repeats, comes back in the order asked
    idx = np.array([7, 0, 7, dom.size - 1, 3])
    assert torch.equal(dom.take(idx), expected[torch.from_numpy(idx)])
    # window i is tokens[i*T : i*T + T + 1], checked by explicit slicing too
    assert dom.take(np.array([5]))[0].tolist() == tokens[5 * T : 5 * T + T + 1].tolist()
    assert int(got.max()) > 2**15 if dtype == "uint16" else int(got.max()) > 2**31  # no sign wrap


def test_npy_flat_and_windows(tmp_path):
    tokens = _stream(500, 4000, seed=1)
    flat = tmp_path / "flat.npy"
    np.save(flat, tokens.astype(np.int32))
    dom = TokenFileDomain("flat", flat, T)
    assert torch.equal(dom.take(np.arange(dom.size)), pack_tokens([tokens], T))

    windows = _stream(30 * (T + 1), 4000, seed=2).reshape(30, T + 1).astype(np.uint16)
    cut = tmp_path / "cut.npy"
    np.save(cut, windows)
    for window in (None, T):
        dom2 = TokenFileDomain("cut", cut, window)
        assert dom2.size == 30 and dom2.window_tokens == T
        idx = np.array([29, 0, 4, 4])
        assert torch.equal(dom2.take(idx), torch.from_numpy(windows[idx].astype(np.int64)))


def test_token_file_is_memory_mapped_and_pickles_small(tmp_path):
    tokens = _stream(200_000, 50_000, seed=3)
    path = tmp_path / "big.bin"
    tokens.astype(np.uint16).tofile(path)
    dom = TokenFileDomain("big", path, T, dtype="uint16")
    assert isinstance(dom.data, np.memmap)
    before = dom.take(np.array([10, 20_000]))
    blob = pickle.dumps(dom)
    assert len(blob) < 2_000, len(blob)  # path + layout, not 400 KB of tokens
    clone = pickle.loads(blob)
    assert clone._mm is None  # re-opened lazily in the new process
    assert torch.equal(clone.take(np.array([10, 20_000])), before)
    assert isinstance(clone.data, np.memmap)

    npy = tmp_path / "big.npy"
    np.save(npy, tokens.astype(np.uint16))
    dnpy = TokenFileDomain("big", npy, T)
    dnpy.take(np.array([1]))
    assert isinstance(dnpy.data, np.memmap)
    assert len(pickle.dumps(dnpy)) < 2_000


def test_token_file_errors(tmp_path):
    tokens = _stream(100, 1000).astype(np.uint16)
    good = tmp_path / "good.bin"
    tokens.tofile(good)

    with pytest.raises(ValueError, match=r"missing.bin.*does not exist"):
        TokenFileDomain("m", tmp_path / "missing.bin", T, dtype="uint16")
    with pytest.raises(FileNotFoundError):
        TokenFileDomain("m", tmp_path / "missing.bin", T, dtype="uint16")
    with pytest.raises(ValueError, match=r"good.bin.*dtype="):
        TokenFileDomain("g", good, T)
    with pytest.raises(ValueError, match=r"good.bin.*float32"):
        TokenFileDomain("g", good, T, dtype="float32")
    with pytest.raises(ValueError, match=r"good.bin.*not a numpy dtype"):
        TokenFileDomain("g", good, T, dtype="nonsense")

    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match=r"odd.bin.*not a multiple"):
        TokenFileDomain("o", odd, T, dtype="uint16")

    short = tmp_path / "short.bin"
    tokens[:T].tofile(short)  # T tokens: one window needs T + 1
    with pytest.raises(DocumentSplitError, match=f"short.bin.*{T} tokens.*needs {T + 1}"):
        TokenFileDomain("s", short, T, dtype="uint16")
    tokens[: T + 1].tofile(short)
    assert TokenFileDomain("s", short, T, dtype="uint16").size == 1

    floats = tmp_path / "floats.npy"
    np.save(floats, np.zeros(100, dtype=np.float32))
    with pytest.raises(ValueError, match=r"floats.npy.*integers"):
        TokenFileDomain("f", floats, T)

    cut = tmp_path / "cut.npy"
    np.save(cut, np.zeros((4, T + 1), dtype=np.int64))
    with pytest.raises(ValueError, match=f"cut.npy.*{T} \\+ 1 tokens.*window=4"):
        TokenFileDomain("c", cut, 4)
    flat = tmp_path / "flat.npy"
    np.save(flat, np.zeros(100, dtype=np.int64))
    with pytest.raises(ValueError, match=r"flat.npy.*window="):
        TokenFileDomain("f", flat, None)
    cube = tmp_path / "cube.npy"
    np.save(cube, np.zeros((2, 2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match=r"cube.npy.*shape"):
        TokenFileDomain("c", cube, None)
    txt = tmp_path / "tokens.txt"
    txt.write_text("1 2 3")
    with pytest.raises(ValueError, match=r"tokens.txt.*unsupported"):
        TokenFileDomain("t", txt, T)

    dom = TokenFileDomain("g", good, T, dtype="uint16")
    with pytest.raises(IndexError, match=r"'g'.*index 12"):
        dom.take(np.array([0, 12]))
    with pytest.raises(IndexError, match=r"'g'.*index -1"):
        dom.take(np.array([-1]))


# -- HF map-style datasets -----------------------------------------------------------------------------------------


def test_hf_dataset_take_equals_rows():
    datasets = pytest.importorskip("datasets")
    rows = _stream(25 * (T + 1), 30_000, seed=4).reshape(25, T + 1)
    ds = datasets.Dataset.from_dict({"input_ids": rows.tolist(), "text": [str(i) for i in range(25)]})
    dom = HFDatasetDomain("hf", ds)
    assert dom.size == 25 and dom.window_tokens == T and dom.shuffle is True
    idx = np.array([24, 0, 3, 3, 11])
    got = dom.take(idx)
    assert got.dtype == torch.int64
    assert torch.equal(got, torch.from_numpy(rows[idx]))
    assert torch.equal(dom.take(np.arange(25)), torch.from_numpy(rows))

    other = datasets.Dataset.from_dict({"ids": rows.tolist()})
    assert torch.equal(HFDatasetDomain("hf", other, column="ids").take(np.array([2])), torch.from_numpy(rows[[2]]))


def test_hf_dataset_errors():
    datasets = pytest.importorskip("datasets")
    ragged = datasets.Dataset.from_dict({"input_ids": [[1] * (T + 1), [2] * (T + 1), [3] * T, [4] * (T + 1)]})
    dom = HFDatasetDomain("rag", ragged)
    assert dom.take(np.array([0, 1, 3])).shape == (3, T + 1)
    with pytest.raises(ValueError, match=r"'rag'.*'input_ids' row 2 has 8 tokens"):
        dom.take(np.array([0, 2]))
    with pytest.raises(ValueError, match=r"'rag'.*row 2"):
        dom.take(np.array([2]))  # all rows read the same (wrong) length
    with pytest.raises(ValueError, match=r"'nocol'.*no column 'tokens'"):
        HFDatasetDomain("nocol", ragged, column="tokens")
    floats = datasets.Dataset.from_dict({"input_ids": [[0.5] * (T + 1)]})
    with pytest.raises(ValueError, match=r"'flt'.*integer"):
        HFDatasetDomain("flt", floats)
    with pytest.raises(TypeError, match=r"'lst'.*datasets.Dataset"):
        HFDatasetDomain("lst", [[1, 2, 3]])
    stream = datasets.Dataset.from_dict({"input_ids": [[1] * (T + 1)]}).to_iterable_dataset()
    with pytest.raises(TypeError, match=r"'it'.*StreamDomain"):
        HFDatasetDomain("it", stream)


# -- streams -------------------------------------------------------------------------------------------------------


def _hf_stream(docs):
    datasets = pytest.importorskip("datasets")

    def gen():
        for d in docs:
            yield {"input_ids": d}

    return datasets.IterableDataset.from_generator(gen)


def test_stream_full_pass_equals_pack_tokens():
    docs = _docs(5)
    expected = pack_tokens(docs, T)
    for source in (_hf_stream(docs), docs, lambda: iter(docs)):
        dom = StreamDomain("s", source, T, size=expected.shape[0])
        assert dom.shuffle is False and dom.window_tokens == T
        got = torch.cat([dom.take(np.arange(i, min(i + 7, dom.size))) for i in range(0, dom.size, 7)])
        assert torch.equal(got, expected)
        assert dom.reopens == 1
    # with a separator, and with size counted from the stream
    expected_sep = pack_tokens(docs, T, separator=0)
    dom = StreamDomain("s", _hf_stream(docs), T, separator=0)
    assert dom.size == expected_sep.shape[0]
    assert torch.equal(dom.take(np.arange(dom.size)), expected_sep)


def test_stream_jumps_backward_forward_and_new_pass():
    docs = _docs(6, n_docs=120)
    expected = pack_tokens(docs, T)
    n = expected.shape[0]
    assert n > 100
    dom = StreamDomain("s", _hf_stream(docs), T, size=n, buffer_windows=16)

    assert torch.equal(dom.take(np.arange(0, 40)), expected[0:40])
    # small backward jump (prefetch rollback): served from the ring, no re-open
    assert torch.equal(dom.take(np.arange(30, 45)), expected[30:45])
    assert dom.reopens == 1
    # forward skip: read and discard
    assert torch.equal(dom.take(np.arange(80, 84)), expected[80:84])
    assert dom.reopens == 1
    # ... and the windows just before the skip target are in the ring too (16 windows: 68..83)
    assert torch.equal(dom.take(np.arange(68, 73)), expected[68:73])
    assert dom.reopens == 1
    # jump back further than the ring holds: re-open and skip forward
    assert torch.equal(dom.take(np.arange(50, 52)), expected[50:52])
    assert dom.reopens == 2
    # finish the pass, then a new pass starts at 0; a batch may cross the pass boundary
    assert torch.equal(dom.take(np.arange(52, n)), expected[52:])
    cross = np.r_[np.arange(n - 3, n), np.arange(0, 5)]
    assert torch.equal(dom.take(cross), expected[torch.from_numpy(cross)])
    assert dom.reopens == 3
    # a resume at an arbitrary cursor in a fresh object reads forward to it
    fresh = StreamDomain("s", _hf_stream(docs), T, size=n, buffer_windows=16)
    assert torch.equal(fresh.take(np.arange(n - 10, n - 2)), expected[n - 10 : n - 2])
    # pickled copies start over but stay correct
    clone = pickle.loads(pickle.dumps(StreamDomain("s", docs, T, size=n)))
    assert torch.equal(clone.take(np.arange(3, 9)), expected[3:9])


def test_stream_skip_inside_one_long_document():
    docs = [list(range(1, 1001)), list(range(2000, 2100))]
    expected = pack_tokens(docs, T)
    dom = StreamDomain("long", docs, T, size=expected.shape[0], buffer_windows=16)
    assert torch.equal(dom.take(np.arange(0, 2)), expected[0:2])
    assert torch.equal(dom.take(np.arange(100, 103)), expected[100:103])  # skip 98 windows of one document
    assert torch.equal(dom.take(np.arange(87, 100)), expected[87:100])  # the 16 before 103 are buffered
    assert dom.reopens == 1
    assert torch.equal(dom.take(np.arange(86, 88)), expected[86:88])  # 86 is not: re-open
    assert dom.reopens == 2
    assert torch.equal(dom.take(np.arange(120, expected.shape[0])), expected[120:])


def test_stream_errors():
    docs = _docs(7)
    n = pack_tokens(docs, T).shape[0]
    long = StreamDomain("long", docs, T, size=n + 5)
    with pytest.raises(DocumentSplitError, match=f"'long' ended after {n} windows; its size is {n + 5}"):
        long.take(np.arange(n - 2, n + 2))
    with pytest.raises(TypeError, match=r"'gen'.*one-shot"):
        StreamDomain("gen", (d for d in docs), T, size=3)
    with pytest.raises(DocumentSplitError, match=r"'tiny'.*3 tokens"):
        _ = StreamDomain("tiny", [[1, 2, 3]], T).size
    with pytest.raises(ValueError, match=r"'col'.*no column 'input_ids'"):
        StreamDomain("col", [{"ids": [1] * 20}], T, size=1).take(np.array([0]))
    with pytest.raises(TypeError, match=r"'txt'.*text"):
        StreamDomain("txt", ["some text"], T, size=1).take(np.array([0]))
    with pytest.raises(IndexError, match=r"'short'.*index 3"):
        StreamDomain("short", docs, T, size=3).take(np.array([3]))


# -- DomainSet over mixed kinds ------------------------------------------------------------------------------------


def test_domain_set_gather_across_kinds(tmp_path):
    datasets = pytest.importorskip("datasets")
    mem_windows = pack_tokens(_docs(8), T)
    file_tokens = _stream(400, 60_000, seed=9)
    (tmp_path / "f.bin").write_bytes(file_tokens.astype(np.uint16).tobytes())
    hf_rows = _stream(12 * (T + 1), 1000, seed=10).reshape(12, T + 1)
    docs = _docs(11)
    stream_expected = pack_tokens(docs, T)

    ds = DomainSet(
        [
            Domain("mem", mem_windows),
            TokenFileDomain("file", tmp_path / "f.bin", T, dtype=np.uint16),
            HFDatasetDomain("hf", datasets.Dataset.from_dict({"input_ids": hf_rows.tolist()})),
            StreamDomain("stream", _hf_stream(docs), T, size=stream_expected.shape[0]),
        ]
    )
    assert ds.shuffle == [True, True, True, False]
    assert ds.window_tokens == T
    file_expected = pack_tokens([file_tokens], T)
    assert ds.sizes == [mem_windows.shape[0], file_expected.shape[0], 12, stream_expected.shape[0]]
    expected_by_domain = [mem_windows, file_expected, torch.from_numpy(hf_rows), stream_expected]

    pairs = [(3, 0), (1, 9), (0, 2), (2, 11), (3, 1), (1, 0), (3, 2), (2, 0), (0, 2)]
    batch = ds.get_batch(pairs)
    want = torch.stack([expected_by_domain[d][i] for d, i in pairs])
    assert torch.equal(batch["input_ids"], want)
    assert batch["domain"].tolist() == [d for d, _ in pairs]
    assert batch["index"].tolist() == [i for _, i in pairs]
    item = ds[(1, 4)]
    assert torch.equal(item["input_ids"], file_expected[4]) and item["domain"] == 1 and item["index"] == 4


def test_domain_set_validation(tmp_path):
    np.save(tmp_path / "a.npy", _stream(100, 100))
    a = TokenFileDomain("a", tmp_path / "a.npy", T)
    b = Domain("b", torch.zeros(3, T + 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"different.*'a': 8.*'b': 9"):
        DomainSet([a, b])
    with pytest.raises(ValueError, match="duplicate domain names: \\['a'\\]"):
        DomainSet([a, TokenFileDomain("a", tmp_path / "a.npy", T)])
    with pytest.raises(TypeError, match="ndarray"):
        DomainSet([a, cast(Any, np.zeros((3, T + 1)))])  # deliberately not a DomainSource


def test_domain_set_from_token_files_pickles_for_workers(tmp_path):
    streams = {"x": _stream(300, 60_000, seed=12), "y": _stream(150, 60_000, seed=13)}
    paths = {}
    for name, toks in streams.items():
        paths[name] = tmp_path / f"{name}.bin"
        toks.astype(np.uint16).tofile(paths[name])
    ds = DomainSet.from_token_files(paths, T, dtype="uint16")
    ds.gather(np.array([0, 1]), np.array([0, 0]))  # maps the files in this process
    blob = pickle.dumps(ds)
    assert len(blob) < 4_000
    clone = pickle.loads(blob)
    doms = np.array([1, 0, 1, 0])
    idx = np.array([17, 35, 0, 1])
    got = clone.gather(doms, idx)["input_ids"]
    expect = {k: pack_tokens([v], T) for k, v in streams.items()}
    want = torch.stack([expect["xy"[d]][i] for d, i in zip(doms, idx, strict=True)])
    assert torch.equal(got, want)

    keys = [(0, 3), (1, 4)]
    loader = torch.utils.data.DataLoader(clone, batch_size=None, sampler=keys)
    for item, (d, i) in zip(loader, keys, strict=True):
        assert torch.equal(item["input_ids"], expect["xy"[d]][i])


def test_domain_set_from_hf_datasets():
    datasets = pytest.importorskip("datasets")
    rows = {k: _stream(6 * (T + 1), 500, seed=s).reshape(6, T + 1) for k, s in (("p", 14), ("q", 15))}
    ds = DomainSet.from_hf_datasets(
        {k: datasets.Dataset.from_dict({"tok": v.tolist()}) for k, v in rows.items()}, column="tok"
    )
    assert ds.names == ["p", "q"] and ds.sizes == [6, 6]
    got = ds.gather(np.array([1, 0]), np.array([5, 2]))["input_ids"]
    assert torch.equal(got, torch.from_numpy(np.stack([rows["q"][5], rows["p"][2]])))


def test_in_memory_domain_take_unchanged():
    windows = pack_tokens(_docs(16), T)
    dom = Domain("m", windows)
    assert dom.shuffle is True and dom.size == windows.shape[0]
    idx = np.array([2, 0, 2])
    assert torch.equal(dom.take(idx), windows[torch.from_numpy(idx)])
    assert torch.equal(dom.windows, windows)
    with pytest.raises(IndexError, match="'m'"):
        dom.take(np.array([dom.size]))


# -- the Mixer over disk and stream domains ----------------------------------------------------------------------


def _disk_mixer(tmp_path, seed: int = 0):
    from gradmix import Mixer

    datasets = pytest.importorskip("datasets")
    flat = _stream(4000, 60000, seed=1).astype(np.uint16)
    flat.tofile(tmp_path / "a.bin")
    docs = _docs(seed=2, n_docs=400)
    stream = datasets.IterableDataset.from_generator(lambda: ({"input_ids": d} for d in docs))
    n_stream = (sum(len(d) for d in docs) - 1) // T
    rows = pack_tokens([_stream(3000, 900, seed=3)], T).numpy()
    table = datasets.Dataset.from_dict({"input_ids": rows.tolist()})
    domains = DomainSet(
        [
            TokenFileDomain("file", tmp_path / "a.bin", T, dtype="uint16"),
            StreamDomain("stream", stream, T, size=n_stream),
            HFDatasetDomain("table", table),
        ]
    )
    return Mixer(domains, "fixed", 12, method_params={"weights": [0.5, 0.3, 0.2]}, seed=seed), domains


def test_mixer_trains_on_disk_and_stream_domains_and_resumes_exactly(tmp_path):
    mixer, _domains = _disk_mixer(tmp_path)
    assert mixer.sampler.shuffle.tolist() == [True, False, True]
    batches, states = [], {}
    for step, batch in enumerate(mixer.batches(30)):
        batches.append(batch)
        mixer.observe(batch["domain"], torch.zeros(len(batch["domain"])))
        mixer.step()
        states[step + 1] = mixer.state_dict()
    # the stream domain is read in stream order: its rows are the stream's packed windows 0, 1, 2, ...
    docs = _docs(seed=2, n_docs=400)
    expected = pack_tokens([np.concatenate([np.asarray(x, dtype=np.int64) for x in docs])], T)
    stream_rows = torch.cat([b["input_ids"][b["domain"] == 1] for b in batches])
    assert torch.equal(stream_rows, expected[: len(stream_rows)])
    assert abs(len(stream_rows) - 0.3 * 12 * 30) < 1  # the exact share of the mix
    # a fresh Mixer (the stream re-opened from its start) resumed at step 12 continues exactly
    resumed, _ = _disk_mixer(tmp_path)
    resumed.load_state_dict(states[12])
    for t, batch in enumerate(resumed.batches(18), start=12):
        assert torch.equal(batch["input_ids"], batches[t]["input_ids"])
        assert torch.equal(batch["domain"], batches[t]["domain"])
