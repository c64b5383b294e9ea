"""Byte-level BPE tokenizer for the experiments: trained on the experiment's own corpus, saved beside the run.

Byte-level (as GPT-2) so that every string of every language round-trips exactly (``decode(encode(x)) == x``) and
no text is ever mapped to an unknown token; small vocabularies (a few thousand) keep the model's embedding cheap.
Needs the optional ``tokenizers`` package (``pip install gradmix[text]``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from os import PathLike
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = [
    "END_OF_TEXT",
    "encode_documents",
    "load_tokenizer",
    "save_tokenizer",
    "train_bpe_tokenizer",
]

END_OF_TEXT = "<|endoftext|>"


def _non_empty_texts(texts: Iterable[str]) -> Iterator[str]:
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] is a {type(text).__name__}, expected str")
        if text:
            yield text


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    *,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = (END_OF_TEXT,),
) -> Tokenizer:
    """Train a byte-level BPE tokenizer (ByteLevel pre-tokenizer and decoder, no normaliser) on ``texts``.

    The 256 byte symbols are always in the vocabulary (so any text is encodable), then merges are learnt until
    ``vocab_size`` (special tokens included) or until no pair occurs ``min_frequency`` times. The result depends
    only on the texts and the arguments (training is deterministic), so a rerun rebuilds the same tokenizer.
    ``texts`` may be a generator: it is streamed, never held in memory.
    """
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level tokenizer needs 256 byte tokens plus "
            f"{len(special_tokens)} special token(s)"
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    stream = _non_empty_texts(texts)
    first = next(stream, None)
    if first is None:
        raise ValueError("train_bpe_tokenizer: no text to train on (texts is empty or holds only empty strings)")

    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False: a prefix space would be added on encode and not removed on decode (breaks round trip).
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(itertools.chain([first], stream), trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: str | PathLike[str]) -> Path:
    """Write the tokenizer as one JSON file (parent folders are created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def load_tokenizer(path: str | PathLike[str]) -> Tokenizer:
    """Read a tokenizer written by ``save_tokenizer``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}")
    return Tokenizer.from_file(str(path))


def encode_documents(
    tokenizer: Tokenizer,
    docs: Iterable[str],
    *,
    eot_token: str = END_OF_TEXT,
    append_eot: bool = True,
) -> list[list[int]]:
    """Token ids of each document (batch-encoded), each followed by the end-of-text id.

    The end-of-text token marks document boundaries once documents are concatenated into training windows, so
    the model never learns to continue one document with the start of an unrelated one without a signal.
    """
    docs = list(docs)
    for index, doc in enumerate(docs):
        if not isinstance(doc, str):
            raise TypeError(f"docs[{index}] is a {type(doc).__name__}, expected str")
    eot_id: int | None = None
    if append_eot:
        eot_id = tokenizer.token_to_id(eot_token)
        if eot_id is None:
            raise ValueError(
                f"the tokenizer has no {eot_token!r} token; train it with special_tokens=({eot_token!r},) "
                "or pass append_eot=False"
            )
    encodings = tokenizer.encode_batch(docs, add_special_tokens=False)
    if eot_id is None:
        return [list(enc.ids) for enc in encodings]
    return [[*list(enc.ids), eot_id] for enc in encodings]
