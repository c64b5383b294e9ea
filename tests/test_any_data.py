"""Any data as domains (issue 21 items 1 and 2): ``DomainSet.from_datasets`` over lists, torch datasets, HF datasets,
iterables and token windows; the default collate; SFT (per-example causal LM loss, packing within a domain, token
counts, a mix in tokens); the fused probe on padded, masked and packed batches of a tiny HF Llama against brute-force
per-example gradients of each example alone."""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from gradmix import Mixer
from gradmix.distributed import exit_rank
from gradmix.example_sources import DatasetDomain, IterableDatasetDomain, count_tokens, pad_collate
from gradmix.sft import PackedDataset, PackedIterable, block_causal_mask, causal_lm_loss, sequence_losses
from gradmix.sources import Domain, DomainSet, GatheredExamples
from test_fused_probe import u_statistics

torch.set_num_threads(1)
VOCAB = 64
pytestmark = pytest.mark.filterwarnings("ignore:.*its data is being repeated")  # tiny domains, many passes


# -- data -------------------------------------------------------------------------------------------------------------


def sft_examples(n: int, lo: int, hi: int, seed: int, first_id: int = 0) -> list[dict[str, Any]]:
    """SFT examples: variable length, the prompt (a random prefix) masked with -100, an ``id`` to follow them by."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(lo, hi + 1))
        ids = rng.integers(1, VOCAB, length).tolist()
        prompt = int(rng.integers(1, length - 1))
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "id": first_id + i})
    return out


class TorchMap(Dataset):
    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        return {"input_ids": torch.tensor(item["input_ids"]), "labels": torch.tensor(item["labels"]), "id": item["id"]}


class TorchStream(IterableDataset):
    """A re-iterable torch IterableDataset (each ``iter()`` starts over), counting how often it was opened."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items
        self.opened = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.opened += 1
        yield from self.items


def hf_dataset(items: list[dict[str, Any]]) -> Any:
    datasets = pytest.importorskip("datasets")
    return datasets.Dataset.from_list(items)


def token_windows(name: str, n: int, seed: int, width: int = 9) -> Domain:
    gen = torch.Generator().manual_seed(seed)
    return Domain(name, torch.randint(1, VOCAB, (n, width), generator=gen))


def no_id(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in e.items() if k != "id"} for e in examples]


KINDS: dict[str, Callable[[], dict[str, Any]]] = {
    "list": lambda: {"a": sft_examples(11, 3, 8, 1), "b": sft_examples(7, 5, 12, 2, 100)},
    "torch_dataset": lambda: {"a": TorchMap(sft_examples(11, 3, 8, 1)), "b": TorchMap(sft_examples(7, 5, 12, 2, 100))},
    "hf_dataset": lambda: {"a": hf_dataset(sft_examples(11, 3, 8, 1)), "b": hf_dataset(sft_examples(7, 5, 12, 2, 100))},
    "iterable": lambda: {"a": TorchStream(sft_examples(11, 3, 8, 1)), "b": TorchStream(sft_examples(7, 5, 12, 2, 100))},
    "hf_iterable": lambda: {
        "a": hf_dataset(sft_examples(11, 3, 8, 1)).to_iterable_dataset(),
        "b": hf_dataset(sft_examples(7, 5, 12, 2, 100)).to_iterable_dataset(),
    },
    "token_windows": lambda: {"a": token_windows("a", 11, 1), "b": token_windows("b", 7, 2)},
    "all_kinds": lambda: {  # one set; token windows take part as {"input_ids", "labels"} examples: no "id" fields
        "list": no_id(sft_examples(11, 3, 8, 1)),
        "torch": no_id(sft_examples(7, 5, 12, 2, 100)),
        "hf": hf_dataset(no_id(sft_examples(9, 3, 6, 3, 200))),
        "stream": TorchStream(no_id(sft_examples(6, 4, 9, 4, 300))),
        "windows": token_windows("windows", 8, 5),
    },
}


def fake_losses(batch: dict[Any, Any]) -> torch.Tensor:
    """A deterministic per-example 'loss' from the example's content, so that a loss-based method moves the weights."""
    ids = batch["input_ids"].double()
    mask = batch["attention_mask"] if "attention_mask" in batch else torch.ones_like(ids)
    return (ids * mask).sum(dim=1) / mask.sum(dim=1) / VOCAB + batch["domain"].double()


def run(mixer: Mixer, steps: int, loader: Any = None) -> list[dict[Any, Any]]:
    seen = []
    batches = mixer.batches(steps) if loader is None else loader
    for i, batch in enumerate(batches):
        mixer.observe(batch["domain"], fake_losses(batch), tokens=count_tokens(batch))
        mixer.step()
        seen.append(batch)
        if loader is not None and i + 1 == steps:
            break
    return seen


def assert_same_batches(got: list[dict[Any, Any]], want: list[dict[Any, Any]]) -> None:
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want)):
        assert list(a) == list(b), step
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert torch.equal(a[key], b[key]), (step, key)
            else:
                assert a[key] == b[key], (step, key)


def make_mixer(data: dict[str, Any], **kwargs: Any) -> Mixer:
    params = {"method": "famo", "batch_size": 6, "update_every": 2, "seed": 7, "log_every": 1, **kwargs}
    return Mixer(DomainSet.from_datasets(data), **params)


# -- (1) every kind of domain through the Mixer, with exact resume ----------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_through_the_mixer_with_exact_resume(kind: str) -> None:
    """8 steps of 6 examples over domains of 11 and 7 examples (several passes each, a pass boundary inside batches):
    a run stopped after 3 steps, checkpointed and restored into a fresh Mixer over fresh datasets (streams re-read
    from the start), gives exactly the batches of the uninterrupted run; the loss-based method moved the weights."""
    full = make_mixer(KINDS[kind]())
    assert full.domains.is_windows == (kind == "token_windows")
    ref = run(full, 8)
    weights = {tuple(r["weights"].values()) for r in full.history}
    assert len(weights) > 1, "the weights never moved: the resume check would be weak"
    drawn = torch.bincount(torch.cat([b["domain"] for b in ref]), minlength=len(full.names)).tolist()
    assert sum(int(n) > size for n, size in zip(drawn, full.domains.sizes)) >= 2  # passes end inside the run

    first = make_mixer(KINDS[kind]())
    head = run(first, 3)
    state = json.loads(json.dumps(first.state_dict()))  # a checkpoint is plain data
    resumed = make_mixer(KINDS[kind]())
    resumed.load_state_dict(state)
    tail = run(resumed, 5)
    assert_same_batches(head + tail, ref)
    assert [r["tokens"] for r in resumed.history] == [r["tokens"] for r in list(full.history)[3:]]


@pytest.mark.parametrize("kind", ["list", "hf_dataset", "all_kinds"])
def test_dataloader_gives_the_batches_of_batches(kind: str) -> None:
    """``mixer.dataloader()`` (the DataLoader reads and collates a whole batch in ``__getitems__``) yields what
    ``mixer.batches()`` does; a collate_fn of one's own sees the examples as the datasets give them."""
    ref = run(make_mixer(KINDS[kind]()), 5)
    mixer = make_mixer(KINDS[kind]())
    assert_same_batches(run(mixer, 5, loader=mixer.dataloader()), ref)

    seen: list[Any] = []
    mixer = make_mixer(KINDS[kind]())
    loader = mixer.dataloader(collate_fn=lambda items: seen.extend([items]))
    next(iter(loader))
    assert isinstance(seen[0], GatheredExamples) and len(seen[0]) == 6
    assert set(seen[0][0]) == {"example", "domain"}


def test_dataloader_with_a_worker_process() -> None:
    ref = run(make_mixer(KINDS["list"]()), 4)
    mixer = make_mixer(KINDS["list"]())
    assert_same_batches(run(mixer, 4, loader=mixer.dataloader(num_workers=1)), ref)


# -- (2) torch.distributed: each rank its share -----------------------------------------------------------------------


def _ddp_data() -> dict[str, Any]:
    return {"a": sft_examples(13, 3, 8, 1), "b": TorchStream(sft_examples(9, 5, 12, 2, 100))}


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    import datetime
    import os

    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        mixer = make_mixer(_ddp_data(), batch_size=8)
        assert mixer.world_size == 2 and mixer.rank == rank
        steps = []
        for batch in mixer.batches(5):
            mixer.observe(batch["domain"], fake_losses(batch), tokens=count_tokens(batch))
            mixer.step()
            steps.append({"pairs": list(zip(batch["domain"].tolist(), batch["id"].tolist()))})
        for record, step in zip(mixer.history, steps):
            step.update(tokens=record["tokens"], weights=record["weights"])
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(steps))
    except BaseException:
        dist.destroy_process_group()
        raise
    exit_rank()  # a normal return can abort at interpreter exit under gloo (torch 2.13; docs/bad_inputs.md)


@pytest.mark.integration
def test_two_gloo_ranks_share_a_dict_example_batch(tmp_path: Path) -> None:
    """Two gloo processes over a list domain and a stream: each rank gets 4 of the 8 examples of every global batch,
    the two shares are disjoint and together the global batch of a one-process Mixer; the ``tokens`` KPI (all-reduced)
    and the weights are the same on both ranks and count the whole global batch."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    one = make_mixer(_ddp_data(), batch_size=8)
    for step, batch in enumerate(run(one, 5)):
        pairs = list(zip(batch["domain"].tolist(), batch["id"].tolist()))
        shares = [[tuple(p) for p in ranks[r][step]["pairs"]] for r in range(2)]
        assert len(shares[0]) == len(shares[1]) == 4
        assert sorted(shares[0] + shares[1]) == sorted(pairs), step
        assert ranks[0][step]["tokens"] == ranks[1][step]["tokens"] == one.history[step]["tokens"]
        assert ranks[0][step]["weights"] == ranks[1][step]["weights"] == one.history[step]["weights"]


# -- (3) the default collate ------------------------------------------------------------------------------------------


def test_pad_collate_pads_sequences_and_masks() -> None:
    examples = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "score": 0.5, "features": [0.1, 0.2], "text": "abc"},
        {"input_ids": [8], "labels": [8], "score": 1, "features": [0.3, 0.4], "text": "d"},
        {"input_ids": torch.tensor([9, 10]), "labels": np.array([9, 10]), "score": 2.0, "features": [1.0, 2.0],
         "text": "ef"},
    ]  # fmt: skip
    batch = pad_collate(examples, pad_token_id=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3], [9, 10, 3]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100], [9, 10, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert batch["score"].dtype == torch.float32 and batch["score"].tolist() == [0.5, 1.0, 2.0]  # int -> float
    assert batch["features"].shape == (3, 2) and batch["features"].is_floating_point()
    assert batch["text"] == ["abc", "d", "ef"]
    # a float sequence of different lengths is padded with 0.0; nested dicts are collated too
    nested = pad_collate([{"x": {"w": [1.5]}}, {"x": {"w": [2.5, 3.5]}}])
    assert nested["x"]["w"].tolist() == [[1.5, 0.0], [2.5, 3.5]]
    # tuples -> integer keys; images stack
    images = pad_collate([(torch.ones(3, 4, 4), 1), (torch.zeros(3, 4, 4), 0)])
    assert images[0].shape == (2, 3, 4, 4) and images[1].tolist() == [1, 0]
    # equal lengths: no padding, an all-ones mask (the batch's fields do not depend on its lengths)
    assert pad_collate([{"input_ids": [1, 2]}, {"input_ids": [3, 4]}])["attention_mask"].tolist() == [[1, 1], [1, 1]]
    with pytest.raises(ValueError, match=r"field 'x'.*only 1-D sequences are padded"):
        pad_collate([{"x": torch.zeros(2, 3)}, {"x": torch.zeros(3, 3)}])
    with pytest.raises(ValueError, match="different fields"):
        pad_collate([{"input_ids": [1]}, {"ids": [1]}])


def test_a_domainset_batch_is_the_collated_examples_plus_domain() -> None:
    data = {"a": sft_examples(5, 3, 6, 1), "b": sft_examples(5, 7, 9, 2, 100)}
    ds = DomainSet.from_datasets(data)
    batch = ds.gather(np.array([0, 1, 0]), np.array([2, 0, 4]))
    want = pad_collate([data["a"][2], data["b"][0], data["a"][4]])
    assert batch["domain"].tolist() == [0, 1, 0] and batch["domain"].dtype == torch.long
    for key, value in want.items():
        assert torch.equal(batch[key], value), key

    # a collate_fn of one's own
    def lengths(items: list[Any]) -> dict[str, torch.Tensor]:
        return {"n": torch.tensor([len(e["input_ids"]) for e in items])}

    custom = DomainSet.from_datasets(data, collate_fn=lengths)
    want_n = [len(data["b"][0]["input_ids"]), len(data["a"][0]["input_ids"])]
    assert custom.gather(np.array([1, 0]), np.array([0, 0]))["n"].tolist() == want_n


# -- (4) the SFT loss -------------------------------------------------------------------------------------------------


class TinyCausal(nn.Module):
    """Embedding -> causal prefix mean -> head: a causal LM that takes HF-style keyword arguments."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None, position_ids: Any = None) -> torch.Tensor:
        h = self.embed(input_ids).cumsum(dim=1) / torch.arange(1, input_ids.shape[1] + 1)[None, :, None]
        return self.head(torch.tanh(h))


def test_sft_loss_reductions() -> None:
    model = TinyCausal()
    examples = sft_examples(4, 3, 9, 5)
    batch = pad_collate(examples)
    logits = model(batch["input_ids"])
    per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none")
    mask = batch["labels"][:, 1:] != -100
    sums = (per_token * mask).sum(1)
    counts = mask.sum(1)
    torch.testing.assert_close(causal_lm_loss(model, batch), sums / counts)  # default: mean over its tokens
    torch.testing.assert_close(causal_lm_loss(model, batch, reduction="sum"), sums)
    token = causal_lm_loss(model, batch, reduction="token")
    torch.testing.assert_close(token.mean(), sums.sum() / counts.sum())  # the batch mean is token-weighted
    # each example's loss is its loss alone: padding changes nothing
    for i, example in enumerate(examples):
        torch.testing.assert_close(causal_lm_loss(model, pad_collate([example]))[0], (sums / counts)[i])
    # no labels: input_ids where the attention mask is 1
    plain = pad_collate([{"input_ids": e["input_ids"]} for e in examples])
    targets = plain["input_ids"].masked_fill(plain["attention_mask"] == 0, -100)
    want = sequence_losses(model(plain["input_ids"]), targets)
    torch.testing.assert_close(causal_lm_loss(model, plain), want)
    # an example with no trained token: loss 0
    empty = pad_collate([{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}])
    assert causal_lm_loss(model, empty).tolist() == [0.0]
    with pytest.raises(ValueError, match="reduction"):
        causal_lm_loss(model, batch, reduction="avg")


# -- (5) packing ------------------------------------------------------------------------------------------------------


def test_packing_keeps_one_domain_per_row_and_restarts_positions() -> None:
    a = [{"input_ids": [1] * n, "labels": [1] * n} for n in (3, 5, 2, 7, 4, 4, 1)]  # domain a: token 1
    b = [{"input_ids": [2] * n} for n in (6, 6, 6, 2)]  # domain b: token 2, no labels
    packed = PackedDataset(a, 10)
    assert len(packed) == 3  # [3, 5, 2] [7] [4, 4, 1]
    row = packed[0]
    assert row["seq_lens"].tolist() == [3, 5, 2]
    assert row["position_ids"].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1]
    assert row["labels"].tolist() == [-100, 1, 1, -100, 1, 1, 1, 1, -100, 1]  # a first token is never predicted
    unpacked = count_tokens(pad_collate(a[:3]))
    packed_count = count_tokens(pad_collate([row]))
    assert unpacked is not None and packed_count is not None
    assert int(packed_count.sum()) == int(unpacked.sum()) == 2 + 4 + 1  # packing changes no token count
    assert [len(r) for r in PackedIterable(b, 12)] == [4, 4]  # rows are dicts of 4 fields
    assert [r["seq_lens"].tolist() for r in PackedIterable(b, 12)] == [[6, 6], [6, 2]]

    ds = DomainSet.from_datasets({"a": a, "b": TorchStream(b)}, pack=True, max_length=10)
    assert ds.sizes == [3, 3]
    batch = Mixer(ds, batch_size=6, seed=1).batches(1).__next__()
    for i in range(6):
        real = batch["attention_mask"][i].bool()
        tokens = set(batch["input_ids"][i][real].tolist())
        assert tokens == {int(batch["domain"][i]) + 1}, "a packed row mixes domains"
        assert int(batch["seq_lens"][i].sum()) == int(real.sum())
        pos = batch["position_ids"][i][real]
        starts = torch.cumsum(batch["seq_lens"][i], 0)[:-1]
        starts = starts[starts < int(real.sum())]
        assert pos[0] == 0 and bool((pos[starts] == 0).all())
    mask = block_causal_mask(torch.tensor([[0, 1, 2, 0, 1, 0]]))[0]
    assert mask[4].tolist() == [False, False, False, True, True, False]
    assert mask[2].tolist() == [True, True, True, False, False, False]
    with pytest.warns(UserWarning, match="1 example"):
        assert PackedDataset([{"input_ids": [1] * 12}], 10)[0]["input_ids"].numel() == 10
    with pytest.raises(ValueError, match="max_length"):
        DomainSet.from_datasets({"a": a}, pack=True)


# -- (6) token counts and (7) a mix in tokens --------------------------------------------------------------------------


def test_token_counts_exclude_padding_and_masked_tokens() -> None:
    data = {"a": sft_examples(10, 3, 8, 1), "b": sft_examples(10, 10, 20, 2, 100)}
    model = TinyCausal()
    mixer = Mixer(DomainSet.from_datasets(data), batch_size=6, seed=2, log_every=1)
    want = np.zeros(2)
    for batch in mixer.batches(4):
        mixer.backward(model, batch, causal_lm_loss)
        mixer.step()
        for d, i in zip(batch["domain"].tolist(), batch["id"].tolist()):
            example = data["ab"[d]][i - 100 * d]
            want[d] += sum(label != -100 for label in example["labels"][1:])  # trained-on tokens only
        assert mixer.history[-1]["tokens"] == {"a": int(want[0]), "b": int(want[1])}
    padded = int(batch["attention_mask"].sum())
    counted = count_tokens(batch)
    assert counted is not None and int(counted.sum()) < padded < batch["input_ids"].numel()  # no padding, no prompts
    # without labels: the attention mask (real tokens)
    masked = count_tokens({"attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])})
    assert masked is not None and masked.tolist() == [2, 1]
    assert count_tokens({0: torch.zeros(2, 3)}) is None


def test_a_mix_in_tokens_realises_token_shares() -> None:
    """Short (3-6 tokens) and long (30-50) examples at 50/50: counted in tokens the realised shares are within 0.05 of
    50/50 over 40 steps; a mix in examples gives the long domain about 90% of the tokens."""
    data = {
        "short": [{"input_ids": [1] * n} for n in range(3, 7)] * 10,
        "long": [{"input_ids": [2] * n} for n in range(30, 51)],
    }
    shares = {}
    for unit in ("tokens", "examples"):
        mixer = Mixer(
            DomainSet.from_datasets(data),
            "fixed",
            batch_size=16,
            method_params={"weights": {"short": 0.5, "long": 0.5}},
            mix_unit=unit,
            log_every=40,
        )
        run(mixer, 40)
        tokens = mixer.history[-1]["tokens"]
        shares[unit] = tokens["long"] / (tokens["long"] + tokens["short"])
        if unit == "tokens":
            assert mixer.history[-1]["weights"]["long"] == pytest.approx(0.5, abs=0.02)  # recorded in tokens
            assert mixer.sampler.weights[0] > 0.85  # the sampler draws ~9 short examples per long one
    assert shares["tokens"] == pytest.approx(0.5, abs=0.05)
    assert shares["examples"] > 0.85
    with pytest.raises(ValueError, match="mix_unit"):
        Mixer(DomainSet.from_datasets(data), mix_unit="bytes")
    with pytest.raises(ValueError, match=r"domain 'x'.*no token counts"):
        Mixer(DomainSet.from_datasets({"x": [(1.0, 2)] * 4}), mix_unit="tokens")


# -- (8) errors -------------------------------------------------------------------------------------------------------


def one_line_error(error: type[Exception], name: str, build: Callable[[], Any]) -> str:
    """``build()`` raises ``error`` with a one-line message naming domain ``name``; returns the message."""
    with pytest.raises(error) as exc:
        build()
    text = str(exc.value)
    assert "\n" not in text and repr(name) in text, text
    return text


def test_errors_name_the_domain_in_one_line() -> None:
    text = one_line_error(TypeError, "numbers", lambda: DomainSet.from_datasets({"numbers": 42}))
    assert "__len__" in text and "__iter__" in text
    one_line_error(ValueError, "empty", lambda: DomainSet.from_datasets({"ok": sft_examples(3, 3, 5, 1), "empty": []}))
    one_line_error(ValueError, "empty_stream", lambda: DomainSet.from_datasets({"empty_stream": TorchStream([])}))
    one_line_error(TypeError, "gen", lambda: DomainSet.from_datasets({"gen": (e for e in sft_examples(3, 3, 5, 1))}))
    one_line_error(TypeError, "dd", lambda: DomainSet.from_datasets({"dd": {"train": [1, 2]}}))

    data = {"good": [{"x": 1.0}] * 3, "bad": [{"x": "text"}] * 3}

    def tuple_collate(items: list[Any]) -> Any:  # drops the dict: nowhere to put batch["domain"]
        return tuple(torch.tensor([e["x"] for e in items]) for _ in range(2))

    text = one_line_error(ValueError, "good", lambda: DomainSet.from_datasets(data, collate_fn=tuple_collate))
    assert "batch['domain']" in text

    def float_collate(items: list[Any]) -> Any:
        return {"x": torch.tensor([float(e["x"]) for e in items])}

    one_line_error(ValueError, "bad", lambda: DomainSet.from_datasets(data, collate_fn=float_collate))
    text = one_line_error(ValueError, "mine", lambda: DomainSet.from_datasets({"mine": [{"domain": "chat", "x": 1.0}]}))
    assert "rename" in text
    stream = IterableDatasetDomain("short", TorchStream(sft_examples(3, 3, 5, 1)), size=5)
    one_line_error(ValueError, "short", lambda: stream.examples(np.arange(5)))
    with pytest.raises(TypeError, match="not token windows"):
        _ = DomainSet.from_datasets({"a": [1.0, 2.0]}).window_tokens
    assert isinstance(DomainSet.from_datasets({"a": [1.0, 2.0]}).domains[0], DatasetDomain)


# -- (9) the fused probe on padded, masked and packed batches equals brute force --------------------------------------


def llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).double()


def one_example(batch: dict[Any, Any], i: int) -> dict[Any, Any]:
    """Row i of a collated batch with its padding cut off: the example as a batch of one, never padded."""
    length = int(batch["attention_mask"][i].sum())
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value[i : i + 1]
            if value.dim() == 2 and key != "seq_lens":
                value = value[:, :length]
        out[key] = value
    return out


@pytest.mark.parametrize(("pack", "probe"), [(False, "fused"), (True, "fused"), (False, "micro")])
def test_fused_probe_statistics_equal_brute_force_on_padded_and_packed_batches(pack: bool, probe: str) -> None:
    """A tiny random HF Llama (float64), SFT examples of 3-20 tokens with masked prompts, the Mixer's PiKE measuring
    every step: the per-domain ``grad_sq_norm`` and ``grad_var`` of the fused probe's one backward over the padded
    (or packed and padded) batch equal the U-statistics of brute-force gradients of each example (row) ALONE, unpadded
    - so padding, label masks and packing change nothing. Packed rows: a row's summed loss equals the sum of its
    examples' losses computed separately (attention stays within each packed example). The micro-batch probe with
    one example per part (``num_splits`` >= the group sizes) computes the same estimators from slices of the batch."""
    model = llama()
    data = {"a": sft_examples(30, 3, 8, 1), "b": sft_examples(30, 8, 16, 2, 100), "c": sft_examples(30, 3, 20, 3, 200)}
    ds = DomainSet.from_datasets(data, pack=pack, max_length=24 if pack else None)
    probe_params = {"fused": False, "num_splits": 12} if probe == "micro" else {}
    mixer = Mixer(ds, "pike", batch_size=12, model=model, update_every=1, seed=3, probe_params=probe_params)
    assert type(mixer.probe).__name__ == ("GradientProbe" if probe == "micro" else "FusedGradientProbe")
    for step, batch in enumerate(mixer.batches(2)):
        padded = bool((batch["attention_mask"] == 0).any())
        assert padded and bool((batch["labels"][:, 1:] == -100).any())
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = mixer.backward(model, batch, causal_lm_loss)
            mixer.step()
        assert result is not None and result.grad_sq_norm is not None and result.grad_var is not None
        params = [p for _, p in mixer.probe.named_parameters]
        assert sum(p.numel() for p in params) == sum(p.numel() for p in model.parameters())  # all covered
        rows = []
        for i in range(batch["domain"].shape[0]):
            loss = causal_lm_loss(model, one_example(batch, i)).sum()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            flat = [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
            rows.append(torch.cat(flat))
        sq, var, _ = u_statistics(torch.stack(rows).numpy(), batch["domain"].numpy(), 3)
        assert np.isfinite(sq).all()
        np.testing.assert_allclose(result.grad_sq_norm, sq, rtol=1e-5, atol=1e-8 * np.abs(var).max(), err_msg=str(step))
        np.testing.assert_allclose(result.grad_var, var, rtol=1e-5, err_msg=str(step))
        if pack and step == 0:
            with torch.no_grad():
                for i in range(batch["domain"].shape[0]):
                    row = one_example(batch, i)
                    lengths = row["seq_lens"][0][row["seq_lens"][0] > 0].tolist()
                    parts, start = [], 0
                    for n in lengths:  # each packed example alone: its tokens, its labels (first one -100)
                        part = {key: row[key][:, start : start + n] for key in ("input_ids", "labels")}
                        parts.append(causal_lm_loss(model, part, reduction="sum"))
                        start += n
                    torch.testing.assert_close(causal_lm_loss(model, row, reduction="sum"), sum(parts))


def test_mixer_target_set_of_examples() -> None:
    """DGA on a set of examples: the target is a dataset of the same kind of examples, collated the same way."""
    model = TinyCausal()
    data = {"a": sft_examples(10, 3, 8, 1), "b": sft_examples(10, 5, 9, 2, 100)}
    mixer = Mixer(
        DomainSet.from_datasets(data), "dga", batch_size=4, model=model, target=sft_examples(6, 3, 6, 9), update_every=1
    )
    target = mixer.next_target_batch()
    assert set(target) == {"input_ids", "labels", "id", "attention_mask"}
    for batch in mixer.batches(2):
        result = mixer.backward(model, batch, functools.partial(causal_lm_loss, reduction="mean"))
        mixer.step()
    assert result is not None and result.target_alignment is not None


def test_accumulation_splits_the_batch_of_examples() -> None:
    """accumulation_steps=2: the two micro-batches of a step (each collated, padded on its own) hold exactly the
    examples of the batch a Mixer without accumulation draws."""
    data = {"a": sft_examples(10, 3, 8, 1), "b": sft_examples(10, 10, 20, 2, 100)}
    whole = Mixer(DomainSet.from_datasets(data), batch_size=8, seed=4)
    split = Mixer(DomainSet.from_datasets(data), batch_size=8, seed=4, accumulation_steps=2)
    parts = list(split.batches(3))
    for step, batch in enumerate(whole.batches(3)):
        micro = parts[2 * step : 2 * step + 2]
        assert all(len(m["id"]) == 4 for m in micro)
        assert sorted(torch.cat([m["id"] for m in micro]).tolist()) == sorted(batch["id"].tolist())
