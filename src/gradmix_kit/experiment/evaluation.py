"""How the experiments judge a trained model: validation loss per domain, and a multiple-choice continuation task.

The loss says how well the model predicts each domain's held-out text; the continuation task turns that into an
accuracy, as the PiKE paper reports downstream accuracy beside perplexity. Items follow the OLMES "cloze"
formulation: the model scores every candidate continuation by its log-likelihood given the passage, normalised by
length, and the highest score is its answer. Both evaluations are batched over examples (no loop over tokens).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gradmix_kit.experiment.model import per_example_loss

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = [
    "NORMALIZATIONS",
    "ContinuationItems",
    "ContinuationTask",
    "build_continuation_task",
    "evaluate_continuation",
    "evaluate_loss",
    "score_continuations",
]

NORMALIZATIONS = ("per_char", "per_token", "none")

Decoder = Union["Tokenizer", Callable[[list[int]], str]]


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def evaluate_loss(
    model: nn.Module, windows_by_domain: Mapping[str, torch.Tensor], batch_size: int = 64
) -> dict[str, float]:
    """Mean per-token next-token loss of each domain's validation windows (LongTensor (n, T+1) per domain).

    Runs in eval mode without gradients and puts the model back in the mode it was in.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    losses: dict[str, float] = {}
    try:
        with torch.no_grad():
            for domain, windows in windows_by_domain.items():
                if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
                    raise ValueError(
                        f"validation windows of domain {domain!r} must be a non-empty (n, T+1) tensor with T >= 1, "
                        f"got shape {tuple(windows.shape)}"
                    )
                total = 0.0
                for start in range(0, windows.shape[0], batch_size):
                    chunk = windows[start : start + batch_size].to(device)
                    # every window has the same T targets, so the token mean is the mean of the example means
                    total += float(per_example_loss(model, {"input_ids": chunk}).double().sum())
                losses[domain] = total / windows.shape[0]
    finally:
        model.train(was_training)
    return losses


@dataclass(frozen=True)
class ContinuationItems:
    """The items of one domain (N items, K choices, C context tokens, L continuation tokens).

    Attributes:
        contexts: LongTensor (N, C), the passage each item starts from.
        choices: LongTensor (N, K, L), candidate continuations; ``choices[i, answers[i]]`` is the true one.
        answers: LongTensor (N,), index of the true continuation.
        choice_num_chars: LongTensor (N, K), characters of each decoded choice (per-character normalisation), or
            None when the task was built without a tokenizer.
        sources: LongTensor (N, 2), (document index, start token) of each item's passage in the domain's documents.
    """

    contexts: torch.Tensor
    choices: torch.Tensor
    answers: torch.Tensor
    choice_num_chars: torch.Tensor | None
    sources: torch.Tensor

    @property
    def num_items(self) -> int:
        return int(self.answers.shape[0])


@dataclass(frozen=True)
class ContinuationTask:
    """A multiple-choice continuation task per domain, built by ``build_continuation_task``."""

    items: dict[str, ContinuationItems]
    context_tokens: int
    continuation_tokens: int
    num_choices: int
    seed: int

    @property
    def domains(self) -> list[str]:
        return list(self.items)


def _domain_rng(seed: int, domain: str) -> np.random.Generator:
    # Seeded by (seed, domain name) so a domain's items do not change when other domains are added or reordered;
    # crc32 rather than hash() because str hashing is randomised per process.
    return np.random.default_rng([seed, zlib.crc32(domain.encode("utf-8"))])


def _decode_lengths(tokenizer: Decoder, sequences: list[list[int]]) -> list[int]:
    if hasattr(tokenizer, "decode_batch"):
        texts = tokenizer.decode_batch(sequences, skip_special_tokens=False)
    elif callable(tokenizer):
        texts = [tokenizer(seq) for seq in sequences]
    else:
        raise TypeError(f"tokenizer must be a tokenizers.Tokenizer or a callable ids -> str, got {type(tokenizer)}")
    return [len(text) for text in texts]


def _build_domain_items(
    domain: str,
    docs: Sequence[Sequence[int]],
    *,
    num_items: int,
    context_tokens: int,
    continuation_tokens: int,
    num_choices: int,
    seed: int,
    tokenizer: Decoder | None,
) -> ContinuationItems:
    span = context_tokens + continuation_tokens
    rng = _domain_rng(seed, domain)
    arrays = [np.asarray(doc, dtype=np.int64).reshape(-1) for doc in docs]
    # Passages: non-overlapping spans of C+L tokens inside single documents (never across a document boundary),
    # each document's grid shifted by a random offset so passages do not all begin at a document start.
    passage_doc: list[int] = []
    passage_start: list[int] = []
    for doc_index, tokens in enumerate(arrays):
        count = tokens.shape[0] // span
        if count == 0:
            continue
        offset = int(rng.integers(0, tokens.shape[0] - count * span + 1))
        passage_doc.extend([doc_index] * count)
        passage_start.extend(offset + span * np.arange(count))
    needed = max(num_items, num_choices)
    if len(passage_doc) < needed:
        total_tokens = sum(int(a.shape[0]) for a in arrays)
        raise ValueError(
            f"domain {domain!r} has too little held-out text for the continuation task: its {len(arrays)} "
            f"document(s) ({total_tokens} tokens) give {len(passage_doc)} passage(s) of {span} tokens "
            f"(context_tokens={context_tokens} + continuation_tokens={continuation_tokens}); "
            f"num_items={num_items} with num_choices={num_choices} needs {needed} passages, i.e. at least "
            f"{needed * span} tokens in documents of >= {span} tokens"
        )
    passages = np.stack([arrays[d][s : s + span] for d, s in zip(passage_doc, passage_start)])
    continuations = passages[:, context_tokens:]
    num_passages = passages.shape[0]

    chosen = rng.choice(num_passages, size=num_items, replace=False)
    choices = np.empty((num_items, num_choices, continuation_tokens), dtype=np.int64)
    answers = rng.integers(0, num_choices, size=num_items)
    for item, passage in enumerate(chosen):
        # Distractors: true continuations of OTHER passages of the same domain, each different (as token
        # sequences) from the answer and from each other, so exactly one choice is right.
        picked = [continuations[passage]]
        order = rng.permutation(num_passages)
        for other in order:
            if other == passage:
                continue
            candidate = continuations[other]
            if any(np.array_equal(candidate, seen) for seen in picked):
                continue
            picked.append(candidate)
            if len(picked) == num_choices:
                break
        if len(picked) < num_choices:
            raise ValueError(
                f"domain {domain!r}: only {len(picked) - 1} distinct distractor continuation(s) differ from the "
                f"answer of an item, {num_choices - 1} needed; the domain's text is too repetitive or too short"
            )
        distractors = picked[1:]
        answer = int(answers[item])
        ordered = [*distractors[:answer], picked[0], *distractors[answer:]]
        choices[item] = np.stack(ordered)

    num_chars = None
    if tokenizer is not None:
        lengths = _decode_lengths(tokenizer, choices.reshape(-1, continuation_tokens).tolist())
        num_chars = torch.tensor(lengths, dtype=torch.long).view(num_items, num_choices)
    sources = np.stack([np.asarray(passage_doc)[chosen], np.asarray(passage_start)[chosen]], axis=1)
    return ContinuationItems(
        contexts=torch.from_numpy(np.ascontiguousarray(passages[chosen, :context_tokens])),
        choices=torch.from_numpy(choices),
        answers=torch.from_numpy(answers.astype(np.int64)),
        choice_num_chars=num_chars,
        sources=torch.from_numpy(sources.astype(np.int64)),
    )


def build_continuation_task(
    docs_by_domain: Mapping[str, Sequence[Sequence[int]]],
    *,
    num_items: int = 100,
    context_tokens: int = 48,
    continuation_tokens: int = 16,
    num_choices: int = 4,
    seed: int = 0,
    tokenizer: Decoder | None = None,
) -> ContinuationTask:
    """Multiple-choice continuation items from held-out documents (token ids), per domain.

    Each item is a passage of ``context_tokens`` tokens of real text, its true continuation of
    ``continuation_tokens`` tokens, and ``num_choices - 1`` distractors: the continuations of other passages of the
    SAME domain, with the same token length (so the model must know the domain's text, not just its style). The
    answer's position is shuffled. Deterministic for (seed, domain name, documents). ``tokenizer`` (a
    ``tokenizers.Tokenizer`` or a callable ids -> str) is used only to store each choice's decoded length in
    characters, which the default per-character normalisation of ``evaluate_continuation`` needs.
    """
    for name, value in (
        ("num_items", num_items),
        ("context_tokens", context_tokens),
        ("continuation_tokens", continuation_tokens),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if num_choices < 2:
        raise ValueError(f"num_choices must be >= 2, got {num_choices}")
    if not docs_by_domain:
        raise ValueError("docs_by_domain is empty: no domain to build a continuation task for")
    items = {
        domain: _build_domain_items(
            domain,
            docs,
            num_items=num_items,
            context_tokens=context_tokens,
            continuation_tokens=continuation_tokens,
            num_choices=num_choices,
            seed=seed,
            tokenizer=tokenizer,
        )
        for domain, docs in docs_by_domain.items()
    }
    return ContinuationTask(
        items=items,
        context_tokens=context_tokens,
        continuation_tokens=continuation_tokens,
        num_choices=num_choices,
        seed=seed,
    )


def _continuation_log_likelihoods(
    model: nn.Module, items: ContinuationItems, batch_size: int, device: torch.device
) -> torch.Tensor:
    """Sum of log p(choice tokens | context) for every (item, choice): tensor (N, K), float64."""
    n, k, length = items.choices.shape
    context_length = items.contexts.shape[1]
    sequences = torch.cat([items.contexts.unsqueeze(1).expand(n, k, context_length), items.choices], dim=2).reshape(
        n * k, context_length + length
    )
    totals = torch.empty(n * k, dtype=torch.float64)
    for start in range(0, n * k, batch_size):
        chunk = sequences[start : start + batch_size].to(device)
        logits = model(chunk[:, :-1])[:, context_length - 1 :]  # the positions that predict the choice tokens
        log_probs = F.log_softmax(logits.float(), dim=-1)
        token_log_probs = log_probs.gather(2, chunk[:, context_length:].unsqueeze(2)).squeeze(2)
        totals[start : start + chunk.shape[0]] = token_log_probs.double().sum(dim=1).cpu()
    return totals.view(n, k)


def score_continuations(
    model: nn.Module, task: ContinuationTask, batch_size: int = 64, *, normalization: str = "per_char"
) -> dict[str, torch.Tensor]:
    """Score of every choice of every item, per domain (tensor (N, K)); the highest score is the model's answer.

    normalization (OLMES): ``"per_char"`` log-likelihood / decoded characters of the choice (the default, as OLMES
    uses for cloze tasks: token counts depend on the tokenizer, characters do not); ``"per_token"``
    log-likelihood / tokens; ``"none"`` raw log-likelihood. All choices of a task have the same number of tokens,
    so "per_token" and "none" pick the same answers. ``batch_size`` counts (item, choice) sequences.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    config = getattr(model, "config", None)
    needed = task.context_tokens + task.continuation_tokens - 1
    if config is not None and getattr(config, "context_length", needed) < needed:
        raise ValueError(
            f"the task's items need {needed} input tokens (context_tokens + continuation_tokens - 1) but the "
            f"model's context_length is {config.context_length}"
        )
    device = _model_device(model)
    was_training = model.training
    model.eval()
    scores: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for domain, items in task.items.items():
                log_likelihood = _continuation_log_likelihoods(model, items, batch_size, device)
                if normalization == "per_char":
                    if items.choice_num_chars is None:
                        raise ValueError(
                            f"per-character normalisation needs the choices' character lengths, which domain "
                            f"{domain!r} of this task lacks: build the task with tokenizer=..., or evaluate with "
                            "normalization='per_token'"
                        )
                    scores[domain] = log_likelihood / items.choice_num_chars.clamp(min=1).double()
                elif normalization == "per_token":
                    scores[domain] = log_likelihood / task.continuation_tokens
                else:
                    scores[domain] = log_likelihood
    finally:
        model.train(was_training)
    return scores


def evaluate_continuation(
    model: nn.Module, task: ContinuationTask, batch_size: int = 64, *, normalization: str = "per_char"
) -> dict[str, float]:
    """Accuracy per domain on the continuation task (chance is 1 / num_choices); see ``score_continuations``."""
    scores = score_continuations(model, task, batch_size, normalization=normalization)
    return {
        domain: float((domain_scores.argmax(dim=1) == task.items[domain].answers).double().mean())
        for domain, domain_scores in scores.items()
    }
