"""Docs that run (issue #24, item 3): every ```python block of README.md and docs/*.md is run, so a block that fails
as written fails here, naming its file and line.

Each block runs on its own, in a fresh namespace (tests/docs_namespace.py: a small real object for each name the
block uses but neither defines nor imports), in a temporary working directory, with one torch thread and with the
hub and W&B kept offline. Tracebacks point into the markdown file: the block is compiled under the file's name with
its lines where they are in the file. A block that cannot run on a CPU machine (a GPU, several nodes, a torchrun
launch) carries an HTML comment on the line right before its fence, ``<!-- docs-test: skip (reason) -->``, and is
skipped with that reason. Blocks that train through a framework (HF Trainer, TRL, Lightning) are marked
``integration``; the rest are fast unit tests.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import docs_namespace

pytestmark = pytest.mark.filterwarnings("ignore:.*its data is being repeated")  # small data, by design

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w+-]*)\s*$")
SKIP = re.compile(r"^<!--\s*docs-test:\s*skip\s*\((?P<reason>.+)\)\s*-->\s*$")
SLOW = ("gradmix.integrations.hf", "gradmix.integrations.trl", "gradmix.integrations.lightning")  # a framework trains
ENV = {
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
OPTIONAL = frozenset(  # the extras a block (or its fixtures) may need
    ["accelerate", "datasets", "lightning", "sklearn", "tensorboard", "tokenizers", "transformers", "trl", "wandb"]
)


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the fence; the code starts on the next line
    lang: str
    source: str
    skip: str | None  # the reason given by a `<!-- docs-test: skip (...) -->` line right before the fence

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def read_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a markdown file, with the line of each fence and any skip mark before it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        if end == len(lines):
            raise ValueError(f"{path}:{i + 1}: a code fence that is never closed")
        mark = SKIP.match(lines[i - 1].strip()) if i else None
        blocks.append(Block(path, i + 1, match.group(1), "\n".join(lines[i + 1 : end]) + "\n", mark and mark["reason"]))
        i = end + 1
    return blocks


ALL_BLOCKS = [block for path in DOCS for block in read_blocks(path)]
PYTHON_BLOCKS = [block for block in ALL_BLOCKS if block.lang == "python"]
TOML_BLOCKS = [block for block in ALL_BLOCKS if block.lang == "toml"]  # pieces of `gradmix run` configs


def _param(block: Block):
    marks = []
    if block.skip:
        marks.append(pytest.mark.skip(reason=block.skip))
    if any(module in block.source for module in SLOW):
        marks.append(pytest.mark.integration)
    return pytest.param(block, marks=marks, id=block.name)


def test_the_docs_have_their_blocks_and_every_skip_mark_is_on_one():
    """The collection itself: the files have their blocks, and no skip mark sits where no block that runs follows."""
    assert sum(b.path.name == "README.md" for b in PYTHON_BLOCKS) >= 13
    assert len(TOML_BLOCKS) >= 2
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if SKIP.match(line.strip()):
                follows = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
                assert follows is not None and follows.group(1) in ("python", "toml"), (
                    f"{path.name}:{i + 1}: a docs-test skip mark must be the line right before a ```python or "
                    f"```toml fence"
                )


@pytest.mark.parametrize("block", [_param(b) for b in PYTHON_BLOCKS])
def test_python_block_runs(block: Block, tmp_path, monkeypatch):
    import torch

    import gradmix
    from gradmix.controller import Mixer

    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    for key in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # nothing under $HOME
        monkeypatch.setenv(key, str(tmp_path / ".wandb"))
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    methods = set(gradmix.available_methods())
    code = compile("\n" * block.line + block.source, str(block.path), "exec")  # tracebacks name the file's lines
    namespace: dict = {"__name__": "__docs_block__"}
    try:
        try:
            docs_namespace.prepare_files(block.source, tmp_path)
            namespace.update(docs_namespace.namespace_for(block.source))
            started = time.perf_counter()
            exec(code, namespace)
        except ImportError as exc:  # an extra that is not installed here (CI installs them all)
            missing = _missing_optional(exc)
            if missing is None:
                raise
            pytest.skip(f"{block.name} needs {missing}, which is not installed")
        print(f"{block.name}: ran in {time.perf_counter() - started:.2f} s")
        records = {path: _records(path) for path in tmp_path.rglob("metrics.jsonl")}  # every line one JSON record
        if any(module in block.source for module in SLOW):  # a framework trained: its mix was recorded as it went
            assert any(records.values()), f"{block.name}: the run wrote no metrics records ({sorted(records)})"
    finally:
        for value in list(namespace.values()):  # release the run folders of the Mixers it left open
            if isinstance(value, Mixer):
                value.close()
        for name in set(gradmix.available_methods()) - methods:  # what the block registered
            gradmix.unregister_method(name)
        torch.set_num_threads(threads)


def _missing_optional(exc: BaseException | None) -> str | None:
    """The optional package whose absence raised ``exc`` (directly or as its cause), else None."""
    while exc is not None:
        name = getattr(exc, "name", None)
        if isinstance(exc, ModuleNotFoundError) and name and name.split(".")[0] in OPTIONAL:
            return name
        exc = exc.__cause__
    return None


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("block", [_param(b) for b in TOML_BLOCKS])
def test_toml_block_is_a_valid_gradmix_config(block: Block, tmp_path):
    """A config piece in the docs is read by `gradmix run`'s own loader: every key known, every value checked."""
    from gradmix_kit.experiment.config import load_config

    path = tmp_path / "block.toml"
    path.write_text(block.source, encoding="utf-8")
    config = load_config(path)
    for table in ("mixing", "logging", "eval"):
        assert isinstance(config[table], dict)
