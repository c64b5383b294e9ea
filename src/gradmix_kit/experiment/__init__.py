"""The experiment kit: tokenizer, small GPT, and the evaluations used to compare mixing methods on real text.

The model and evaluations need only torch; the tokenizer needs the optional ``tokenizers`` package and is
imported on first use, so ``import gradmix_kit.experiment`` works without it.
"""

from gradmix_kit.experiment.evaluation import (
    ContinuationItems,
    ContinuationTask,
    build_continuation_task,
    evaluate_continuation,
    evaluate_loss,
    score_continuations,
)
from gradmix_kit.experiment.model import GPT, GPTConfig, per_example_loss

__all__ = [
    "GPT",
    "ContinuationItems",
    "ContinuationTask",
    "GPTConfig",
    "build_continuation_task",
    "encode_documents",
    "evaluate_continuation",
    "evaluate_loss",
    "load_tokenizer",
    "per_example_loss",
    "save_tokenizer",
    "score_continuations",
    "train_bpe_tokenizer",
]

_TOKENIZER_NAMES = ("encode_documents", "load_tokenizer", "save_tokenizer", "train_bpe_tokenizer")


def __getattr__(name: str):  # lazy: the tokenizers package is optional
    if name in _TOKENIZER_NAMES:
        from gradmix_kit.experiment import tokenizer

        return getattr(tokenizer, name)
    raise AttributeError(f"module 'gradmix_kit.experiment' has no attribute {name!r}")
