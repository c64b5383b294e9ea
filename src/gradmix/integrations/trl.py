"""TRL integration: ``trl.SFTTrainer`` training on several instruction sources whose mix changes while it trains
(``pip install gradmix[trl]``).

    from trl import SFTConfig
    from gradmix.integrations.trl import MixingSFTTrainer

    # each source: tokenized SFT examples {"input_ids": [...], "labels": [...]} with -100 on the prompt
    trainer = MixingSFTTrainer(model=model, args=SFTConfig(output_dir="out", max_steps=1000, max_length=2048),
                               processing_class=tokenizer, domains={"chat": chat_ds, "code": code_ds, "math": math_ds},
                               method="pike", mixer_options={"update_every": 50})
    trainer.train()                                   # or trainer.train(resume_from_checkpoint=True)

``MixingSFTTrainer`` is ``gradmix.integrations.hf.MixingTrainerMixin`` on ``SFTTrainer`` (through a thin subclass that
builds it without a training set of its own), so everything the HF integration does holds here unchanged: the
train dataloader is gradmix's live sampler (one global batch of ``per_device_train_batch_size x
gradient_accumulation_steps x world_size`` examples per optimizer step, as strided micro-batches), every backward
goes through ``Mixer.backward`` (loss-only methods see per-example losses; gradient methods - PiKE, Fair-PiKE, DGA
toward a target set (``mixer_options={"target": examples}``), ... - get the probe's statistics), ``Mixer.step()``
runs after every optimizer step, the KPIs reach the Trainer's loggers (``gradmix/weights/<domain>``, ...),
``metrics.jsonl`` is written to ``output_dir``, every checkpoint folder gets ``gradmix_state.pt``, and
``train(resume_from_checkpoint=...)`` continues exactly (same batches, weights and losses as an uninterrupted run);
see ``gradmix.integrations.hf``. Nothing of TRL or transformers is patched: only subclassing.

The training data (``domains=``):

- a ``DomainSet`` of SFT examples (e.g. ``DomainSet.from_datasets(...)``), used as it is; or
- ``{name: dataset}`` of tokenized SFT examples (map-style or iterable; rows ``input_ids`` and optional ``labels``,
  -100 where no loss is taken, e.g. the prompt), turned into ``DomainSet.from_datasets`` with an
  ``SFTCollate`` that follows the ``SFTConfig``: examples longer than ``max_length`` are cut as
  ``truncation_mode`` says, and batches are right-padded with the tokenizer's pad id. ``SFTConfig(packing=True)``
  packs each source's examples into rows of at most ``max_length`` tokens, in order and never across sources
  (``gradmix.sft.PackedDataset``; TRL's ``packing_strategy`` does not apply), so the per-source statistics stay valid.

The loss of an example is the mean of its next-token cross entropy over its trained tokens (``labels != -100``;
``gradmix.sft.causal_lm_loss``, computed from the model's logits), the unit the Mixer samples and the probe measures;
the step's loss is the mean over the global batch's examples. ``per_example_loss=`` replaces it.

Glue, and why: ``SFTTrainer`` needs a ``datasets.Dataset`` to prepare (tokenize, add EOS, build labels, truncate,
pack, shuffle), but the mixed stream is drawn by gradmix's sampler, batch by batch; so the trainer is built on a
one-row, already tokenized placeholder (its preparation is skipped; its ``prompt`` / ``completion`` fields make
``completion_only_loss=None`` mean what it means for prompt-completion data), and ``train_dataset`` is then the
domains. SFTTrainer's data collator and ``compute_loss`` are used for evaluation only.

Tested (tests/test_integration_trl.py, a tiny Llama on CPU): PiKE, Fair-PiKE, ODM (loss-only), DGA toward a target
set and uniform; gradient accumulation (the same numbers as one batch, up to float rounding); SFTConfig's default
gradient checkpointing (no number changes); attention dropout; stop-and-resume and SIGKILL-and-resume equal to an
uninterrupted run; ``packing=True``; ``eval_dataset`` / ``evaluate()``, which stay SFTTrainer's own (its preparation
and loss; with ``completion_only_loss=None`` prompt-completion eval data is scored on the completion, as
SFTTrainer's default). Passed through to SFTTrainer / the Trainer but not tested here: DDP (the HF integration's
rank handling), PEFT (``peft_config=``), ``activation_offloading``, bf16/fp16.

Refused (``ValueError`` before anything is built): ``train_dataset=``; ``padding_free=True``; ``loss_type="dft"``,
``label_smoothing_factor > 0`` and ``compute_loss_func=`` (the training loss is the per-example loss above);
``assistant_only_loss=True`` (a tokenization option: put -100 in the labels of the other tokens instead). An MoE
model with a router auxiliary loss (it would be dropped) is refused once SFTTrainer is built. Not supported: raw
(untokenized) training data (tokenize each source first), vision-language examples, TRL's ``packing_strategy``,
SFTTrainer's train metrics ``entropy`` / ``mean_token_accuracy`` / ``num_tokens`` (gradmix logs ``tokens`` in
``metrics.jsonl``), and what the HF integration does not support (``nn.DataParallel``, DeepSpeed, hyperparameter
search).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from trl import SFTConfig, SFTTrainer

from gradmix.example_sources import pad_collate
from gradmix.integrations.hf import MixingTrainerMixin, PerExampleLoss
from gradmix.sft import causal_lm_loss
from gradmix.sources import DomainSet, DomainSource

__all__ = ["MixingSFTTrainer", "SFTCollate", "sft_domains"]

TRUNCATION_MODES = ("keep_start", "keep_end")


class SFTCollate:
    """``pad_collate`` (right padding, ``labels`` -100 on padding, an ``attention_mask``) after cutting every example
    to ``max_length`` tokens: ``truncation_mode="keep_start"`` keeps the first tokens, ``"keep_end"`` the last (as
    ``SFTConfig``). Every field of an example that is a sequence as long as its ``input_ids`` (``labels``,
    ``attention_mask``, ``position_ids``, ...) is cut the same way. Picklable (DataLoader workers)."""

    def __init__(
        self, pad_token_id: int = 0, max_length: int | None = None, truncation_mode: str = "keep_start"
    ) -> None:
        if max_length is not None and (isinstance(max_length, bool) or int(max_length) < 1):
            raise ValueError(f"max_length must be None or an integer >= 1, got {max_length!r}")
        if truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode must be one of {list(TRUNCATION_MODES)}, got {truncation_mode!r}")
        self.pad_token_id = int(pad_token_id)
        self.max_length = None if max_length is None else int(max_length)
        self.truncation_mode = truncation_mode

    def cut(self, example: Any) -> Any:
        """The example cut to ``max_length`` tokens (itself when it is short enough or not a dict with input_ids)."""
        if self.max_length is None or not isinstance(example, Mapping) or "input_ids" not in example:
            return example
        length = len(example["input_ids"])
        if length <= self.max_length:
            return example
        keep = slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(-self.max_length, None)
        out = {}
        for key, value in example.items():
            same = isinstance(value, (list, tuple, np.ndarray, torch.Tensor)) and len(value) == length
            out[key] = value[keep] if same else value
        return out

    def __call__(self, examples: Sequence[Any]) -> dict[Any, Any]:
        return pad_collate([self.cut(e) for e in examples], pad_token_id=self.pad_token_id)

    def __repr__(self) -> str:
        return (
            f"SFTCollate(pad_token_id={self.pad_token_id}, max_length={self.max_length}, "
            f"truncation_mode={self.truncation_mode!r})"
        )


def _first_example(dataset: Any) -> Any:
    """The first example of a map-style dataset, or None (streams are not opened here)."""
    if isinstance(dataset, (torch.utils.data.IterableDataset, DomainSource)):
        return None
    cls = type(dataset)
    if not (hasattr(cls, "__len__") and hasattr(cls, "__getitem__")) or isinstance(dataset, (str, bytes, Mapping)):
        return None
    try:
        return dataset[0] if len(dataset) else None
    except (IndexError, KeyError, TypeError):
        return None


def sft_domains(
    datasets: Mapping[str, Any],
    *,
    pad_token_id: int = 0,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    packing: bool = False,
    sizes: Mapping[str, int] | None = None,
) -> DomainSet:
    """A ``DomainSet`` of tokenized SFT sources as ``MixingSFTTrainer`` builds it from ``{name: dataset}``: examples
    cut to ``max_length`` and padded with ``pad_token_id`` (``SFTCollate``), or, with ``packing=True``, each source
    packed into rows of at most ``max_length`` tokens (``DomainSet.from_datasets(pack=True)``). A map-style source
    whose first example has no ``input_ids`` is a ``ValueError`` naming it (raw text must be tokenized first)."""
    if not isinstance(datasets, Mapping) or not datasets:
        raise ValueError("domains must be a non-empty {source name: dataset of tokenized SFT examples} mapping")
    for name, ds in datasets.items():
        first = _first_example(ds)
        if first is not None and not (isinstance(first, Mapping) and "input_ids" in first):
            fields = sorted(map(str, first)) if isinstance(first, Mapping) else type(first).__name__
            raise ValueError(
                f"domain {name!r}: MixingSFTTrainer trains on tokenized SFT examples (input_ids, labels with -100 "
                f"on the prompt), got {fields}; tokenize the source first (e.g. with datasets' .map)"
            )
    if packing:
        if max_length is None:
            raise ValueError("packing=True needs max_length (tokens per packed row)")
        collate = SFTCollate(pad_token_id)  # packed rows are at most max_length long already
        return DomainSet.from_datasets(datasets, collate, sizes=sizes, pack=True, max_length=int(max_length))
    return DomainSet.from_datasets(datasets, SFTCollate(pad_token_id, max_length, truncation_mode), sizes=sizes)


def _placeholder_dataset() -> Any:
    """The one-row training set SFTTrainer is built on: already tokenized (SFTTrainer's preparation is skipped for
    it), with ``prompt``/``completion`` fields so that ``completion_only_loss=None`` means what it means for
    prompt-completion data (the eval sets' preparation reads it)."""
    import datasets as hf_datasets

    return hf_datasets.Dataset.from_dict(
        {"prompt": [""], "completion": [""], "input_ids": [[0, 0]], "labels": [[0, 0]]}
    )


class _SFTTrainerOnDomains(SFTTrainer):
    """``SFTTrainer`` built on a placeholder training set (the mix is gradmix's); ``MixingTrainerMixin`` puts the
    domains in its place once the Trainer exists."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._gradmix_placeholder = kwargs["train_dataset"] = _placeholder_dataset()
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
        """SFTTrainer's preparation, except for the placeholder (ready as it is; spares its progress bars)."""
        if dataset is getattr(self, "_gradmix_placeholder", None):
            return dataset
        return super()._prepare_dataset(dataset, *args, **kwargs)


def _check_sft_args(args: Any, kwargs: Mapping[str, Any]) -> None:
    """The SFTConfig options that would change the training loss or data behind the Mixer's back are refused."""
    if kwargs.get("compute_loss_func") is not None:
        raise ValueError(
            "MixingSFTTrainer computes the training loss per example (per_example_loss=...); compute_loss_func "
            "is not supported"
        )
    if args is None:
        return
    checks = (
        (
            getattr(args, "padding_free", False),
            "padding_free=True is not supported: gradmix batches are padded (or packed per source with "
            "SFTConfig(packing=True))",
        ),
        (
            getattr(args, "loss_type", "nll") != "nll",
            f"loss_type={getattr(args, 'loss_type', None)!r} is not supported: the training loss is the per-example "
            "mean token cross entropy (per_example_loss=... replaces it)",
        ),
        (
            float(getattr(args, "label_smoothing_factor", 0.0) or 0.0) > 0,
            "label_smoothing_factor > 0 is not supported: the training loss is per_example_loss",
        ),
        (
            getattr(args, "assistant_only_loss", False),
            "assistant_only_loss=True is an option of SFTTrainer's tokenization, which the mixed training "
            "examples do not go through: give them labels with -100 on the tokens not to train on",
        ),
    )
    for refused, message in checks:
        if refused:
            raise ValueError(f"MixingSFTTrainer: {message}")


def _max_length(args: Any) -> tuple[int | None, str, bool]:
    """(max_length, truncation_mode, packing) as the SFTConfig the trainer will use says (a plain
    ``TrainingArguments`` becomes an ``SFTConfig`` with its defaults)."""
    fields = SFTConfig.__dataclass_fields__
    default_length: Any = fields["max_length"].default
    length: Any = getattr(args, "max_length", default_length) if args is not None else default_length
    mode: Any = getattr(args, "truncation_mode", fields["truncation_mode"].default)
    packing = bool(getattr(args, "packing", False))
    return (None if length is None else int(length)), str(mode), packing


def _pad_token_id(processing_class: Any) -> int:
    tokenizer = getattr(processing_class, "tokenizer", processing_class)  # a processor holds its tokenizer
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


class MixingSFTTrainer(MixingTrainerMixin, _SFTTrainerOnDomains):
    """``trl.SFTTrainer`` training on a gradmix mix of SFT sources that changes while it trains (see the module
    docstring).

    Keyword arguments: SFTTrainer's own (``model``, ``args``, ``processing_class``, ``eval_dataset``,
    ``peft_config``, ``callbacks``, ...; not ``train_dataset``), ``MixingTrainerMixin``'s (``method``,
    ``method_params``, ``mixer_options``, ``mixer``, ``overwrite``, ``log_to_trainer``; see
    ``gradmix.integrations.hf``), and:
        domains: a ``DomainSet`` of SFT examples, or ``{name: dataset}`` of tokenized SFT examples (``sft_domains``
            with the SFTConfig's ``max_length``, ``truncation_mode``, ``packing`` and the tokenizer's pad id).
        per_example_loss: ``(model, batch) -> (n,)`` losses; default ``gradmix.sft.causal_lm_loss`` (each example's
            mean token cross entropy over ``labels != -100``).
        sizes: examples per pass of iterable sources (``DomainSet.from_datasets``).

    ``args.max_steps`` must be set (the mix is an endless stream).
    """

    def __init__(
        self,
        model: Any = None,
        args: Any = None,
        *,
        domains: DomainSet | Sequence[DomainSource] | Mapping[str, Any] | None = None,
        per_example_loss: PerExampleLoss | None = None,
        sizes: Mapping[str, int] | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("train_dataset") is not None:
            raise ValueError("MixingSFTTrainer draws its training data from domains=...; do not pass train_dataset")
        _check_sft_args(args, kwargs)
        if isinstance(domains, Mapping):
            max_length, mode, packing = _max_length(args)
            domains = sft_domains(
                domains,
                pad_token_id=_pad_token_id(kwargs.get("processing_class")),
                max_length=max_length,
                truncation_mode=mode,
                packing=packing,
                sizes=sizes,
            )
        elif sizes is not None:
            raise ValueError("sizes=... applies to {name: dataset} domains only")
        super().__init__(
            model=model,
            args=args,
            domains=domains,
            per_example_loss=per_example_loss if per_example_loss is not None else causal_lm_loss,
            **kwargs,
        )
        if getattr(self, "aux_loss_enabled", False):
            lock = self.mixer.run_lock
            if lock is not None:
                lock.release()
            raise ValueError(
                "MixingSFTTrainer: the model adds a router auxiliary loss (MoE), which the per-example loss would "
                "drop; set SFTConfig(router_aux_loss_coef=0.0) to train without it"
            )

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """``MixingTrainerMixin.training_step`` inside SFTTrainer's activation-offloading context (a no-op unless
        ``activation_offloading=True``)."""
        with self.maybe_activation_offload_context:
            return super().training_step(model, inputs, num_items_in_batch)
