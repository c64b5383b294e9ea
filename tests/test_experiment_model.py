"""Tests of the experiment kit: tokenizer, small GPT, per-example loss, validation loss, continuation task."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gradmix_kit.experiment import (
    GPT,
    GPTConfig,
    build_continuation_task,
    encode_documents,
    evaluate_continuation,
    evaluate_loss,
    load_tokenizer,
    per_example_loss,
    save_tokenizer,
    score_continuations,
    train_bpe_tokenizer,
)

WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
    "yankee",
    "zulu",
]


def repetitive_cycle(seed: int = 0, num_words: int = 150) -> str:
    """A fixed random word sequence: repeated, every 48-token context determines its continuation."""
    rnd = random.Random(seed)
    return " ".join(rnd.choice(WORDS) for _ in range(num_words)) + ". "


@pytest.fixture(scope="module")
def tokenizer():
    texts = [repetitive_cycle(seed) * 3 for seed in range(4)] + ["Ünïcödé テキスト 😀 tabs\t and\r\n newlines"]
    return train_bpe_tokenizer(texts, vocab_size=320)


def tiny_model(vocab_size: int = 50, context_length: int = 32, seed: int = 0, **kwargs) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(
        vocab_size,
        context_length=context_length,
        d_model=kwargs.pop("d_model", 16),
        n_layers=kwargs.pop("n_layers", 2),
        n_heads=kwargs.pop("n_heads", 2),
        **kwargs,
    )
    return GPT(config)


# ---------------------------------------------------------------- tokenizer


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=200))
def test_tokenizer_round_trips_any_text(tokenizer, text):
    if "<|endoftext|>" in text:  # the special token is meant to be dropped on decode
        return
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_tokenizer_training_is_deterministic_and_uses_the_vocab_budget():
    texts = [repetitive_cycle(seed) for seed in range(3)]
    first = train_bpe_tokenizer(texts, vocab_size=300)
    second = train_bpe_tokenizer(iter(texts), vocab_size=300)  # a generator works too
    assert first.to_str() == second.to_str()
    assert first.get_vocab_size() == 300
    assert first.token_to_id("<|endoftext|>") is not None
    # merges were learnt: a word from the corpus needs fewer tokens than its bytes
    assert len(first.encode(" foxtrot").ids) < len(b" foxtrot")


def test_tokenizer_rejects_empty_texts():
    with pytest.raises(ValueError, match="no text"):
        train_bpe_tokenizer([], vocab_size=300)
    with pytest.raises(ValueError, match="no text"):
        train_bpe_tokenizer(["", ""], vocab_size=300)
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(["abc"], vocab_size=100)


def test_save_load_and_encode_documents(tokenizer, tmp_path):
    path = save_tokenizer(tokenizer, tmp_path / "sub" / "tokenizer.json")
    loaded = load_tokenizer(path)
    docs = ["alpha bravo", "zulu, zulu ÿ", ""]
    encoded = encode_documents(loaded, docs)
    eot = tokenizer.token_to_id("<|endoftext|>")
    for doc, ids in zip(docs, encoded):
        assert ids[-1] == eot
        assert ids[:-1] == tokenizer.encode(doc).ids  # batch encoding == one-by-one with the original tokenizer
        assert loaded.decode(ids) == doc
    assert encode_documents(loaded, docs, append_eot=False)[0] == tokenizer.encode(docs[0]).ids
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.json")


# ---------------------------------------------------------------- model


def test_gpt_shapes_parameter_count_and_tied_head():
    vocab, ctx, d, layers = 37, 12, 16, 3
    model = tiny_model(vocab, ctx, d_model=d, n_layers=layers, n_heads=4)
    logits = model(torch.randint(0, vocab, (5, 9)))
    assert logits.shape == (5, 9, vocab)
    per_block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    expected = vocab * d + ctx * d + layers * per_block + 2 * d
    assert model.num_parameters() == expected
    assert model.num_parameters(include_position_embedding=False) == expected - ctx * d
    assert model.head.weight.data_ptr() == model.token_embedding.weight.data_ptr()
    with pytest.raises(ValueError, match="context_length"):
        model(torch.zeros(1, ctx + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(10, d_model=10, n_heads=3)


def test_default_config_is_about_a_million_parameters():
    model = GPT(GPTConfig(vocab_size=4096))
    assert 0.8e6 < model.num_parameters() < 2e6


def test_causal_masking():
    model = tiny_model(vocab_size=30, context_length=16)
    ids = torch.randint(0, 30, (2, 16), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    position = 9
    changed[:, position] = (changed[:, position] + 7) % 30
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(before[:, :position], after[:, :position], rtol=0, atol=1e-6)
    assert (before[:, position:] - after[:, position:]).abs().amax(dim=-1).min() > 1e-6


def test_per_example_loss_matches_cross_entropy_by_hand():
    model = tiny_model(vocab_size=40, context_length=16)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 40, (4, 11), generator=gen)
    mask = torch.rand(4, 10, generator=gen) > 0.4
    mask[:, 0] = True
    with torch.no_grad():
        logits = model(ids[:, :-1])
        plain = per_example_loss(model, {"input_ids": ids})
        with_other_keys: dict[str, Any] = {"input_ids": ids, "loss_mask": mask, "domain": "ignored"}
        masked = per_example_loss(model, with_other_keys)
        masked_full = per_example_loss(model, {"input_ids": ids, "loss_mask": torch.cat([mask[:, :1], mask], 1)})
    for i in range(4):
        assert plain[i].item() == pytest.approx(F.cross_entropy(logits[i], ids[i, 1:]).item(), rel=1e-5)
        sel = mask[i]
        assert masked[i].item() == pytest.approx(F.cross_entropy(logits[i][sel], ids[i, 1:][sel]).item(), rel=1e-5)
    torch.testing.assert_close(masked, masked_full)
    assert plain.shape == (4,)


def test_per_example_loss_is_differentiable_and_rejects_bad_input():
    model = tiny_model(vocab_size=20, context_length=8)
    ids = torch.randint(0, 20, (3, 9))
    per_example_loss(model, {"input_ids": ids}).mean().backward()
    assert model.token_embedding.weight.grad is not None
    empty_mask = torch.ones(3, 8)
    empty_mask[1] = 0
    with pytest.raises(ValueError, match="example 1"):
        per_example_loss(model, {"input_ids": ids, "loss_mask": empty_mask})
    with pytest.raises(ValueError, match="loss_mask"):
        per_example_loss(model, {"input_ids": ids, "loss_mask": torch.ones(3, 5)})
    with pytest.raises(ValueError, match="input_ids"):
        per_example_loss(model, {"input_ids": ids[:, :1]})


# ---------------------------------------------------------------- validation loss


def test_evaluate_loss_matches_token_mean_and_restores_mode():
    model = tiny_model(vocab_size=25, context_length=16, dropout=0.3)
    gen = torch.Generator().manual_seed(3)
    windows = {"a": torch.randint(0, 25, (7, 13), generator=gen), "b": torch.randint(0, 25, (3, 13), generator=gen)}
    model.train()
    losses = evaluate_loss(model, windows, batch_size=2)
    assert model.training
    model.eval()
    with torch.no_grad():
        for domain, w in windows.items():
            token_losses = [
                F.cross_entropy(model(w[i : i + 1, :-1])[0], w[i, 1:], reduction="none") for i in range(w.shape[0])
            ]
            assert losses[domain] == pytest.approx(torch.cat(token_losses).mean().item(), rel=1e-5)
    assert not model.training
    assert evaluate_loss(model, windows, batch_size=64) == pytest.approx(losses, rel=1e-6)
    assert not model.training
    with pytest.raises(ValueError, match="'empty'"):
        evaluate_loss(model, {"empty": torch.zeros(0, 13, dtype=torch.long)})


# ---------------------------------------------------------------- continuation task


def _random_docs(low: int, high: int, lengths: list[int], seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(low, high, size=n).tolist() for n in lengths]


def _occurs_in(sequence: np.ndarray, docs: list[list[int]]) -> bool:
    length = len(sequence)
    for doc in docs:
        arr = np.asarray(doc)
        for start in range(len(arr) - length + 1):
            if np.array_equal(arr[start : start + length], sequence):
                return True
    return False


def test_continuation_task_is_deterministic_and_well_formed():
    # two domains over disjoint token ranges: a distractor's range tells which domain it came from
    docs = {"low": _random_docs(0, 50, [130, 90, 75, 200], 0), "high": _random_docs(50, 100, [300, 64, 10], 1)}
    kwargs: dict[str, Any] = dict(num_items=6, context_tokens=12, continuation_tokens=5, num_choices=4)
    task = build_continuation_task(docs, seed=7, **kwargs)
    again = build_continuation_task(docs, seed=7, **kwargs)
    other_seed = build_continuation_task(docs, seed=8, **kwargs)
    for domain in docs:
        a, b, c = task.items[domain], again.items[domain], other_seed.items[domain]
        assert torch.equal(a.choices, b.choices) and torch.equal(a.answers, b.answers)
        assert torch.equal(a.contexts, b.contexts) and torch.equal(a.sources, b.sources)
        assert not (torch.equal(a.contexts, c.contexts) and torch.equal(a.answers, c.answers))
    # adding a domain does not change the others' items
    extra = build_continuation_task({**docs, "more": _random_docs(0, 9, [500], 2)}, seed=7, **kwargs)
    assert torch.equal(extra.items["low"].choices, task.items["low"].choices)

    all_answers = []
    for domain, items in task.items.items():
        assert items.contexts.shape == (6, 12) and items.choices.shape == (6, 4, 5)
        for i in range(items.num_items):
            doc, start = items.sources[i].tolist()
            source = np.asarray(docs[domain][doc])
            true = source[start + 12 : start + 17]
            assert np.array_equal(items.contexts[i].numpy(), source[start : start + 12])
            answer = int(items.answers[i])
            assert np.array_equal(items.choices[i, answer].numpy(), true)
            all_answers.append(answer)
            for j in range(4):
                if j == answer:
                    continue
                distractor = items.choices[i, j].numpy()
                assert not np.array_equal(distractor, true)
                assert _occurs_in(distractor, docs[domain])  # real text of the same domain
                other = "high" if domain == "low" else "low"
                assert not _occurs_in(distractor, docs[other])
            assert len({tuple(row) for row in items.choices[i].tolist()}) == 4  # choices pairwise different
    assert len(set(all_answers)) > 1  # the answer's position is shuffled


def test_continuation_task_errors_name_the_domain():
    docs = {"fine": _random_docs(0, 50, [400], 0), "tiny": _random_docs(0, 50, [40, 30], 1)}
    # "tiny" gives 2 + 1 passages of 20 tokens; 4 items need 4 passages
    with pytest.raises(ValueError, match=r"'tiny'.*3 passage\(s\).*needs 4 passages.*at least 80 tokens"):
        build_continuation_task(docs, num_items=4, context_tokens=15, continuation_tokens=5)
    with pytest.raises(ValueError, match=r"'same'.*distinct distractor"):
        build_continuation_task({"same": [[1, 2, 3, 4] * 40]}, num_items=2, context_tokens=4, continuation_tokens=4)
    task = build_continuation_task({"fine": docs["fine"]}, num_items=3, context_tokens=15, continuation_tokens=5)
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate_continuation(tiny_model(vocab_size=50), task)  # per_char needs the character lengths


def _brute_force_scores(model, task, normalization):
    """One forward per continuation token: log p(token | everything before it), summed."""
    scores = {}
    with torch.no_grad():
        for domain, items in task.items.items():
            n, k, length = items.choices.shape
            out = torch.zeros(n, k, dtype=torch.float64)
            for i in range(n):
                for j in range(k):
                    prefix = items.contexts[i].tolist()
                    total = 0.0
                    for token in items.choices[i, j].tolist():
                        logits = model(torch.tensor([prefix]))[0, -1]
                        total += torch.log_softmax(logits.double(), dim=-1)[token].item()
                        prefix.append(token)
                    if normalization == "per_char":
                        total /= int(items.choice_num_chars[i, j])
                    elif normalization == "per_token":
                        total /= length
                    out[i, j] = total
            scores[domain] = out
    return scores


def test_evaluate_continuation_agrees_with_brute_force(tokenizer):
    docs = {
        "a": encode_documents(tokenizer, [repetitive_cycle(0) * 2]),
        "b": encode_documents(tokenizer, [repetitive_cycle(1), repetitive_cycle(2)]),
    }
    task = build_continuation_task(docs, num_items=5, context_tokens=8, continuation_tokens=4, tokenizer=tokenizer)
    model = tiny_model(vocab_size=tokenizer.get_vocab_size(), context_length=16, d_model=32, n_heads=4)
    model.train()
    for normalization in ("per_char", "per_token", "none"):
        fast = score_continuations(model, task, batch_size=3, normalization=normalization)
        assert model.training
        model.eval()
        slow = _brute_force_scores(model, task, normalization)
        model.train()
        for domain in docs:
            torch.testing.assert_close(fast[domain], slow[domain], rtol=1e-4, atol=1e-5)
        accuracy = evaluate_continuation(model, task, batch_size=7, normalization=normalization)
        for domain in docs:
            expected = np.mean(
                [int(np.argmax(slow[domain][i].numpy())) == int(task.items[domain].answers[i]) for i in range(5)]
            )
            assert accuracy[domain] == pytest.approx(expected)
    # the stored character lengths are those of the decoded choices
    items = task.items["b"]
    assert items.choice_num_chars is not None
    assert int(items.choice_num_chars[2, 1]) == len(tokenizer.decode(items.choices[2, 1].tolist()))


def test_training_on_a_text_lifts_its_continuation_accuracy_above_chance(tokenizer):
    cycle = repetitive_cycle(0)
    train_ids = torch.tensor(encode_documents(tokenizer, [cycle * 20])[0])
    held_out = encode_documents(tokenizer, [cycle * 10, (cycle * 10)[37:], (cycle * 10)[91:]])
    task = build_continuation_task({"text": held_out}, num_items=100, tokenizer=tokenizer, seed=1)
    model = tiny_model(vocab_size=tokenizer.get_vocab_size(), context_length=64, d_model=64, n_heads=4)
    untrained = evaluate_continuation(model, task)["text"]
    assert 0.1 <= untrained <= 0.4  # chance is 0.25

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        starts = torch.randint(0, len(train_ids) - 65, (16,), generator=gen)
        batch = torch.stack([train_ids[s : s + 65] for s in starts])
        loss = per_example_loss(model, {"input_ids": batch}).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = evaluate_continuation(model, task)["text"]
    assert trained >= 0.8
    assert evaluate_continuation(model, task, normalization="per_token")["text"] >= 0.8
