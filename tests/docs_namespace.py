"""What the README's and the docs' python blocks assume a reader already has: tests/test_docs_blocks.py runs every
block in a namespace built here.

Many blocks run as they are (the complete examples of the how-to pages define everything they use). The others are
snippets of a larger program: they use names the reader defined before, usually in an earlier block of the same page
(``model``, ``tokenizer``, ``en_docs``, ``optimizer``, ``domains``, ...). ``namespace_for(source)`` gives such a block
a small real object for every name it uses but neither defines nor imports, and nothing else: library names
(``torch``, ``Mixer``, ``TrainingArguments``) must be imported by the block itself, as a reader copying it would have
to. A name with no fixture here is an error that names it (so a block that uses a new name fails until a fixture is
added, rather than running against a stub).

What a name means depends on the block, as it does on the pages: ``model`` is a small GPT in the plain-loop
blocks, a tiny ``LlamaForCausalLM`` in the SFT and TRL blocks, a tiny GPT-2 in the Hugging Face Trainer block and
an MLP in the digit-classifier block; ``code_ds`` holds SFT examples in the SFT blocks and token windows in the HF
Trainer block. ``kind_of(source)`` picks the world a block lives in; each world is a ``Fixtures`` class whose
``make_<name>`` methods build the objects (each at most once per block; the texts and tokenizers are shared by all
blocks, everything trained or written to is fresh). Nothing is downloaded: the text is the repo's tiny built-in
corpus (src/gradmix_kit/data/tiny; its license texts stand in for `de_docs`) and questions about the standard
library; tokenizers are trained here, models are built from configs with random weights.

Blocks marked ``# docs-test: torchrun`` are not run here but as programs of their own under torchrun; what they take
from the reader's earlier code comes from tests/docs_torchrun_prelude.py.
"""

from __future__ import annotations

import builtins
import functools
import importlib.util
import inspect
import itertools
import symtable
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "src" / "gradmix_kit" / "data" / "tiny"
NUM_STEPS = 20  # `num_steps` in the loops: one update of the quickstart's mix (update_every=20), a measuring step
WINDOW = 16  # tokens per example of the `domains` the snippets reuse (the README's quickstart builds its own, of 64)

STDLIB_MODULES = ("bisect", "collections", "difflib", "fnmatch", "heapq", "json", "shutil", "statistics", "textwrap")


class MissingFixture(LookupError):
    """A block uses a name it neither defines nor imports, and this module has nothing for it."""


# -- what a block needs ------------------------------------------------------------------------------------------------


def free_names(source: str) -> set[str]:
    """The names ``source`` reads but never binds (assignment, import, def, class, argument) and Python does not
    provide: what it expects from the reader's earlier code. Scopes are respected (an argument ``model`` of a
    function inside the block does not bind a ``model`` the block uses at the top level)."""
    top = symtable.symtable(source, "<block>", "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported() or s.is_namespace()}
    used: set[str] = set()

    def visit(table: symtable.SymbolTable) -> None:
        for symbol in table.get_symbols():
            if symbol.is_referenced() and (table is top or symbol.is_global()):
                used.add(symbol.get_name())
        for child in table.get_children():
            visit(child)

    visit(top)
    return used - bound - set(dir(builtins))


def kind_of(source: str) -> str:
    """The README world a block lives in: "trl", "hf", "sft", "classifier" or "lm" (the plain-loop blocks)."""
    if "MixingSFTTrainer" in source:
        return "trl"
    if "MixingTrainer" in source or "hf_domains" in source:
        return "hf"
    if "causal_lm_loss" in source:
        return "sft"
    if "train" in free_names(source):  # the digit classifier's {source: examples}
        return "classifier"
    return "lm"


def namespace_for(source: str) -> dict[str, Any]:
    """A fresh namespace for one block: a fixture for each of its free names (``MissingFixture`` if one has none)."""
    fixtures = KINDS[kind_of(source)]()
    names = sorted(free_names(source))
    missing = [name for name in names if not hasattr(fixtures, f"make_{name}")]
    if missing:
        raise MissingFixture(
            f"the block uses {', '.join(missing)}, which it neither defines nor imports, and "
            f"tests/docs_namespace.py has no fixture for it ({type(fixtures).__name__}): import it in the block "
            f"or add a make_<name> method"
        )
    return {name: fixtures.get(name) for name in names}


def prepare_files(source: str, folder: Path) -> list[Path]:
    """The data files a block reads by a relative path (it runs in ``folder``): written there, real tokens."""
    written = []
    if "data/web.bin" in source or "data/code.npy" in source:
        (folder / "data").mkdir(exist_ok=True)
        tokenizer = shared_tokenizer()
        web = np.asarray(tokenizer.encode(" ".join(tiny_documents("docs"))).ids, dtype=np.uint16)
        web.tofile(folder / "data" / "web.bin")  # nanoGPT's format: a flat uint16 stream
        code = np.asarray(tokenizer.encode("\n".join(tiny_documents("code"))).ids, dtype=np.int64)
        np.save(folder / "data" / "code.npy", code)  # a 1-D stream
        written += [folder / "data" / "web.bin", folder / "data" / "code.npy"]
    return written


# -- shared, read-only material ---------------------------------------------------------------------------------------


@functools.cache
def tiny_documents(name: str) -> tuple[str, ...]:
    """The documents of one file of the repo's tiny built-in corpus (Python docs, Python code, licences, ...)."""
    text = (TINY / f"{name}.txt").read_text(encoding="utf-8")
    return tuple(doc.strip() for doc in text.split("\n<|doc|>\n") if doc.strip())


@functools.cache
def shared_tokenizer() -> Any:
    """A byte-level BPE tokenizer (``tokenizers.Tokenizer``, the kit's trainer) on English prose and code."""
    from gradmix_kit.experiment.tokenizer import train_bpe_tokenizer

    texts = [
        *tiny_documents("docs"),
        *tiny_documents("legal"),
        *tiny_documents("code"),
        *(q + " " + a for q, a in sft_pairs("chat")),
    ]
    return train_bpe_tokenizer(texts, vocab_size=1024)


@functools.cache
def sft_pairs(source: str) -> tuple[tuple[str, str], ...]:
    """Instruction / response pairs: "chat" asks what a standard-library function does (the first sentence of its
    docstring), "code" asks to complete a line of Python (the tiny corpus), "math" asks for a sum."""
    pairs: list[tuple[str, str]] = []
    if source == "chat":
        for module_name in STDLIB_MODULES:
            module = importlib.import_module(module_name)
            for name in sorted(dir(module)):
                obj = getattr(module, name)
                doc = inspect.getdoc(obj) if not name.startswith("_") and callable(obj) else None
                first = " ".join((doc or "").split("\n\n")[0].split()).split(". ")[0]
                if len(first.split()) >= 4:
                    pairs.append((f"What does {module_name}.{name} do?", " ".join(first.split()[:20])))
    elif source == "code":
        for doc in tiny_documents("code"):
            for line in doc.splitlines():
                words = line.strip().split(" ")
                if len(words) >= 4 and not line.strip().startswith("#"):
                    half = len(words) // 2
                    pairs.append((f"Complete the line: {' '.join(words[:half])}", " ".join(words[half:])))
    elif source == "math":
        rng = np.random.default_rng(0)
        for a, b in rng.integers(0, 100, size=(200, 2)).tolist():
            pairs.append((f"What is {a} + {b}?", f"{a} + {b} = {a + b}."))
    else:
        raise ValueError(source)
    return tuple(pairs[:200])


def sft_example(encode: Callable[[str], list[int]], end: int, instruction: str, response: str) -> dict[str, Any]:
    """Prompt and response tokenized apart and joined, the end-of-text id last; labels -100 on the prompt."""
    prompt = encode(f"### Instruction:\n{instruction}\n### Response:\n")[:40]
    answer = [*encode(response)[:23], end]
    return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}


def example_module(name: str) -> ModuleType:
    """One of examples/*.py, imported by path (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"docs_example_{name}", ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Repeating:
    """A re-iterable stream of ``n`` examples (``examples`` cycled): what a user's large streaming source looks like
    to gradmix, with ``iter()`` starting over each time."""

    def __init__(self, examples: list[Any], n: int) -> None:
        self.examples, self.n = examples, n

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(itertools.cycle(self.examples), self.n)


# -- the worlds --------------------------------------------------------------------------------------------------------


class Fixtures:
    """Builds each name once per block (``get``); subclasses add or replace ``make_<name>`` methods."""

    def __init__(self) -> None:
        self._made: dict[str, Any] = {}

    def get(self, name: str) -> Any:
        if name not in self._made:
            self._made[name] = getattr(self, f"make_{name}")()
        return self._made[name]


class LMFixtures(Fixtures):
    """The plain-loop blocks: two kinds of English prose and code documents, the kit's BPE tokenizer and small GPT."""

    def make_en_docs(self) -> list[str]:
        return list(tiny_documents("docs"))  # Python's documentation (English prose)

    def make_de_docs(self) -> list[str]:
        return list(tiny_documents("legal"))  # a second kind of prose standing in for German (no German in the repo)

    def make_code_docs(self) -> list[str]:
        return list(tiny_documents("code"))  # Python standard-library source

    def make_tokenizer(self) -> Any:
        return shared_tokenizer()

    def make_domains(self) -> Any:
        from gradmix.sources import DomainSet

        texts = {"en": self.get("en_docs"), "de": self.get("de_docs"), "code": self.get("code_docs")}
        return DomainSet.from_texts(texts, self.get("tokenizer"), window=WINDOW)

    def make_model(self) -> torch.nn.Module:
        from gradmix_kit.experiment.model import GPT, GPTConfig

        vocab = self.get("tokenizer").get_vocab_size()
        torch.manual_seed(0)
        return GPT(GPTConfig(vocab_size=vocab, context_length=128, d_model=64, n_layers=2, n_heads=2))

    def make_per_example_loss(self) -> Callable[..., torch.Tensor]:
        from gradmix_kit.experiment.model import per_example_loss

        return per_example_loss

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.get("model").parameters(), lr=3e-3)

    def make_num_steps(self) -> int:
        return NUM_STEPS

    def make_MyMethod(self) -> type:
        import gradmix

        class MyMethod(gradmix.MixingMethod):
            """Weights proportional to each domain's training loss (a domain not seen keeps its weight)."""

            name = "mine"
            required_stats = frozenset({"loss"})

            def _update(self, stats: gradmix.DomainStats) -> np.ndarray:
                assert stats.loss is not None
                return np.where(np.isfinite(stats.loss), stats.loss, self.weights)

        return MyMethod

    # monitoring
    def make_val_losses(self) -> dict[str, float]:
        """Validation loss per domain of the model: a few held windows of each."""
        domains, model, loss_fn = self.get("domains"), self.get("model"), self.get("per_example_loss")
        with torch.no_grad():
            return {
                name: float(loss_fn(model, domains.gather(np.full(4, k), np.arange(4))).mean())
                for k, name in enumerate(domains.names)
            }

    def make_eval_data(self) -> dict[str, torch.Tensor]:
        domains = self.get("domains")
        k = len(domains.names)
        return domains.gather(np.repeat(np.arange(k), 4), np.tile(np.arange(4), k))

    def make_my_accuracy(self) -> Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], float]:
        def my_accuracy(model: torch.nn.Module, data: Mapping[str, torch.Tensor]) -> float:
            """Next-token accuracy on the windows of ``data``."""
            ids = data["input_ids"]
            with torch.no_grad():
                predicted = model(ids[:, :-1]).argmax(-1)
            return float((predicted == ids[:, 1:]).float().mean())

        return my_accuracy

    # data that stays on disk: an HF Dataset of 1024-token windows and a stream of documents
    def make_math_ds(self) -> Any:
        from gradmix.integrations.hf import windows_dataset

        return windows_dataset(shared_tokenizer().encode(" ".join(tiny_documents("legal"))).ids, 1024)

    def make_books_iterable_ds(self) -> Any:
        import datasets

        rows = [{"input_ids": shared_tokenizer().encode(doc).ids} for doc in tiny_documents("changelog")]
        return datasets.Dataset.from_list(rows).to_iterable_dataset()  # in memory: no cache files


class SFTFixtures(LMFixtures):
    """The SFT blocks: instruction sources (map-style, a stream), a tiny random-init ``LlamaForCausalLM``."""

    def _sources(self) -> dict[str, list[dict[str, Any]]]:
        tokenizer = shared_tokenizer()
        end = tokenizer.token_to_id("<|endoftext|>")

        def encode(text: str) -> list[int]:
            return list(tokenizer.encode(text).ids)

        return {name: [sft_example(encode, end, q, a) for q, a in sft_pairs(name)] for name in ("chat", "code", "math")}

    def make_chat_ds(self) -> list[dict[str, Any]]:
        return self._sources()["chat"]

    def make_code_ds(self) -> list[dict[str, Any]]:
        return self._sources()["code"]

    def make_math_stream(self) -> Repeating:
        return Repeating(self._sources()["math"], 50_000)

    def make_model(self) -> torch.nn.Module:
        import transformers

        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=shared_tokenizer().get_vocab_size(),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
            use_cache=False,
        )
        return transformers.LlamaForCausalLM(config)

    # images: (image, label) pairs of two sources, and a collate_fn of one's own
    def _images(self, seed: int) -> list[tuple[torch.Tensor, int]]:
        generator = torch.Generator().manual_seed(seed)
        return [(torch.rand(3, 8, 8, generator=generator), i % 10) for i in range(40)]

    def make_cifar(self) -> list[tuple[torch.Tensor, int]]:
        return self._images(0)

    def make_svhn(self) -> list[tuple[torch.Tensor, int]]:
        return self._images(1)

    def make_my_collate(self) -> Callable[[list[tuple[torch.Tensor, int]]], dict[str, torch.Tensor]]:
        def my_collate(examples: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
            return {"image": torch.stack([e[0] for e in examples]), "label": torch.tensor([e[1] for e in examples])}

        return my_collate


class TRLFixtures(SFTFixtures):
    """The TRL block: the same sources as HF ``Dataset``s, the tokenizer as a ``PreTrainedTokenizerFast``."""

    def make_math_ds(self) -> Any:
        import datasets

        return datasets.Dataset.from_list(self._sources()["math"])

    def make_chat_ds(self) -> Any:
        import datasets

        return datasets.Dataset.from_list(self._sources()["chat"])

    def make_code_ds(self) -> Any:
        import datasets

        return datasets.Dataset.from_list(self._sources()["code"])

    def make_tokenizer(self) -> Any:
        import transformers

        return transformers.PreTrainedTokenizerFast(
            tokenizer_object=shared_tokenizer(), eos_token="<|endoftext|>", pad_token="<|endoftext|>"
        )


class HFFixtures(Fixtures):
    """The HF Trainer block: three HF ``Dataset``s of byte windows of the tiny corpus and a tiny random GPT-2
    (examples/hf_trainer.py's)."""

    def _windows(self, name: str) -> Any:
        from gradmix.integrations.hf import windows_dataset

        data = "\n".join(tiny_documents(name)).encode("utf-8")
        return windows_dataset(np.frombuffer(data, dtype=np.uint8), WINDOW)

    def make_code_ds(self) -> Any:
        return self._windows("code")

    def make_docs_ds(self) -> Any:
        return self._windows("docs")

    def make_legal_ds(self) -> Any:
        return self._windows("legal")

    def make_model(self) -> torch.nn.Module:
        import transformers

        torch.manual_seed(0)
        config = transformers.GPT2Config(
            vocab_size=256, n_positions=WINDOW, n_embd=32, n_layer=1, n_head=2, bos_token_id=None, eos_token_id=None
        )
        return transformers.GPT2LMHeadModel(config)


class ClassifierFixtures(Fixtures):
    """The digit-classifier block: examples/multitask_tabular_vision.py's four sources and MLP."""

    def _example(self) -> ModuleType:
        if "_module" not in self._made:
            self._made["_module"] = example_module("multitask_tabular_vision")
        return self._made["_module"]

    def make_train(self) -> dict[str, list[dict[str, Any]]]:
        return self._example().build_sources(0)[0]

    def make_model(self) -> torch.nn.Module:
        torch.manual_seed(0)
        return self._example().make_model()

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.get("model").parameters(), lr=3e-3)

    def make_out(self) -> str:
        return "runs/digits/pike"


KINDS: dict[str, type[Fixtures]] = {
    "lm": LMFixtures,
    "sft": SFTFixtures,
    "trl": TRLFixtures,
    "hf": HFFixtures,
    "classifier": ClassifierFixtures,
}
