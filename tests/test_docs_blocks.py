"""Docs that run (issue #24, item 3): every ```python block of README.md and of every page under docs/ (subfolders
included) is run, every ```toml block is read by `gradmix run`'s config loader, and every `gradmix ...`,
`python SCRIPT ...` and `torchrun ... SCRIPT ...` command the README, the docs and BENCHMARKS.md name (in shell
blocks and in inline code) must name a subcommand, script and flags that exist. So a block that fails as written, or
a documented command that rotted, fails here, naming its file and line.

Python blocks. Each runs on its own, in a fresh namespace (tests/docs_namespace.py: a small real object for each name
the block uses but neither defines nor imports), in a temporary working directory, with one torch thread and with the
hub and W&B kept offline. Tracebacks point into the markdown file: the block is compiled under the file's name with
its lines where they are in the file. Blocks that train through a framework (HF Trainer, TRL, Lightning) are marked
``integration`` (CI runs them: scripts/test.sh); the rest are fast unit tests.

Blocks that are not run. A block that cannot run on a CPU machine (a GPU, several nodes, a torchrun launch) or is
deliberately not runnable says so on its first line, a comment a reader sees in the rendered page::

    # docs-test: skip (needs torchrun with 2 processes)

and is skipped with that reason. Nothing else skips a block.

The site. mkdocs.yml's nav lists every page under docs/ and nothing else; relative links in the README and the docs
point at files that exist (and at anchors that exist, for links into the generated API page).
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

import docs_namespace

pytestmark = pytest.mark.filterwarnings("ignore:.*its data is being repeated")  # small data, by design

ROOT = Path(__file__).resolve().parents[1]
DOCS_DIR = ROOT / "docs"
PAGES = sorted(DOCS_DIR.rglob("*.md"))
DOCS = [ROOT / "README.md", *PAGES]
FENCE = re.compile(r"^```([\w+-]*)\s*$")
SKIP = re.compile(r"^#\s*docs-test:\s*skip\s*\((?P<reason>.+)\)\s*$")
SHELL = ("bash", "sh", "shell", "console")
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

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def skip(self) -> str | None:
        """The reason of a ``# docs-test: skip (reason)`` first line, else None."""
        first = self.source.split("\n", 1)[0].strip()
        mark = SKIP.match(first)
        return mark["reason"] if mark else None


def read_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a markdown file, with the line of each fence."""
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
        blocks.append(Block(path, i + 1, match.group(1), "\n".join(lines[i + 1 : end]) + "\n"))
        i = end + 1
    return blocks


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside code fences."""
    out, inside = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            inside = not inside
            continue
        if not inside:
            out.append((number, line))
    return out


ALL_BLOCKS = [block for path in DOCS for block in read_blocks(path)]
PYTHON_BLOCKS = [block for block in ALL_BLOCKS if block.lang == "python"]
TOML_BLOCKS = [block for block in ALL_BLOCKS if block.lang == "toml"]  # pieces of `gradmix run` configs


def _param(block: Block):
    marks = []
    if block.skip:
        marks.append(pytest.mark.skip(reason=f"{block.name}: {block.skip}"))
    if any(module in block.source for module in SLOW):
        marks.append(pytest.mark.integration)
    return pytest.param(block, marks=marks, id=block.name)


def test_the_docs_have_their_blocks_and_every_skip_mark_is_a_first_line():
    """The collection itself: every page is found (subfolders too), the files have their blocks, and a skip mark is
    only ever the visible first line of a python or toml block (an old-style HTML comment mark is an error)."""
    assert ROOT / "docs" / "howto" / "plain_loop.md" in PAGES  # pages in subfolders are collected
    assert sum(b.path.name == "README.md" for b in PYTHON_BLOCKS) >= 3
    assert len(PYTHON_BLOCKS) >= 25
    assert len(TOML_BLOCKS) >= 2
    for block in ALL_BLOCKS:
        for offset, line in enumerate(block.source.splitlines()):
            if "docs-test:" in line:
                where = f"{block.name} (line {block.line + 1 + offset})"
                assert offset == 0 and SKIP.match(line.strip()), (
                    f"{where}: a docs-test mark must be the block's first line: # docs-test: skip (reason)"
                )
                assert block.lang in ("python", "toml"), f"{where}: only python and toml blocks are run"
    for path in DOCS:
        for number, line in prose_lines(path):
            assert not re.search(r"<!--\s*docs-test", line), (
                f"{path.relative_to(ROOT)}:{number}: mark a block that is not run on its first line, inside the "
                "block (# docs-test: skip (reason)), where readers see it"
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


# -- documented commands ----------------------------------------------------------------------------------------------

INLINE_CODE = re.compile(r"`([^`\n]+)`")
COMMANDS = ("gradmix", "python", "python3", "torchrun", "bash")
SEPARATORS = frozenset(["&&", "||", ";", "|"])


@cache
def gradmix_options() -> dict[str, frozenset[str]]:
    """{subcommand: its option strings}, from the `gradmix` command's own argparse parser."""
    import argparse

    from gradmix_kit.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {
        name: frozenset(s for action in sub._actions for s in action.option_strings)
        for name, sub in subparsers.choices.items()
    }


@cache
def script_options(path: Path) -> frozenset[str]:
    """The option strings a script's argparse parser defines (its ``add_argument("--x", ...)`` calls)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = {"-h", "--help"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("-"):
                    found.add(arg.value)
    return frozenset(found)


def _flags(tokens: list[str]) -> list[str]:
    """The ``--flags`` among a command's tokens, as written in synopses too: ``[--resume | --overwrite]``,
    ``--set train.lr=0.001``, ``--resume/--overwrite``."""
    out = []
    for token in tokens:
        for part in token.split("/"):
            part = part.strip("[](){}|,.;:")
            if part.startswith("--"):
                out.append(part.split("=")[0])
    return out


def _tokens(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("$ "):
        text = text[2:]
    try:
        return shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote in a synopsis: plain words
        return text.split("#")[0].split()


def check_command(text: str) -> list[str]:
    """What is wrong with one documented command line (empty: nothing, or not a command this test knows)."""
    problems = []
    tokens = _tokens(text)
    segments: list[list[str]] = [[]]
    for token in tokens:
        if token in SEPARATORS:
            segments.append([])
        else:
            segments[-1].append(token)
    for segment in segments:
        while segment and re.match(r"^[A-Z_][A-Z0-9_]*=", segment[0]):  # VAR=value before the command
            segment = segment[1:]
        if not segment or segment[0] not in COMMANDS:
            continue
        command, rest = segment[0], segment[1:]
        if command in ("python", "python3") and rest[:2] == ["-m", "gradmix_kit.cli"]:
            command, rest = "gradmix", rest[2:]
        if command == "gradmix":
            if not rest or not re.fullmatch(r"[a-z][a-z_-]*(/[a-z][a-z_-]*)*", rest[0]):
                continue  # `gradmix` alone, `gradmix --help`, a placeholder (`gradmix ...`, `gradmix SUB`)
            options = gradmix_options()
            subcommands = rest[0].split("/")  # `gradmix run/compare/report`
            for sub in subcommands:
                if sub not in options:
                    problems.append(f"`gradmix {sub}`: no such subcommand (gradmix has {', '.join(sorted(options))})")
            for flag in _flags(rest[1:]):
                for sub in subcommands:
                    if sub in options and flag not in options[sub]:
                        problems.append(f"`gradmix {sub} {flag}`: gradmix {sub} has no option {flag}")
            continue
        script_at = next((i for i, t in enumerate(rest) if t.endswith((".py", ".sh"))), None)
        if script_at is None or "/" not in rest[script_at]:
            continue  # python -m ..., python -c ..., torchrun --help; a file of the reader's own (`train.py`)
        script = ROOT / rest[script_at]
        if not script.is_file():
            problems.append(f"`{command} {rest[script_at]}`: no such file in the repository")
            continue
        if script.suffix == ".py":
            known = script_options(script)
            for flag in _flags(rest[script_at + 1 :]):
                if flag not in known:
                    problems.append(f"`{rest[script_at]} {flag}`: the script's parser has no option {flag}")
    return problems


def documented_commands(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every command the file names: each line of a shell block and every inline code span that
    starts with one of ``COMMANDS``."""
    found = []
    for block in read_blocks(path):
        if block.lang in SHELL:
            for offset, line in enumerate(block.source.splitlines()):
                if line.strip() and not line.strip().startswith("#"):
                    found.append((block.line + 1 + offset, line))
    for number, line in prose_lines(path):
        for span in INLINE_CODE.findall(line):
            if span.split(" ", 1)[0] in COMMANDS and " " in span:
                found.append((number, span))
    return found


COMMAND_DOCS = [*DOCS, ROOT / "BENCHMARKS.md"]  # the results' commands too (moved there from the README)


@pytest.mark.parametrize("path", COMMAND_DOCS, ids=[str(p.relative_to(ROOT)) for p in COMMAND_DOCS])
def test_documented_commands_exist(path: Path):
    """Every `gradmix SUB --flag`, `python SCRIPT --flag`, `torchrun ... SCRIPT --flag` and `bash SCRIPT` the page
    names refers to a subcommand / script / option that exists (checked against the argparse parsers)."""
    problems = [
        f"{path.relative_to(ROOT)}:{number}: {problem}"
        for number, text in documented_commands(path)
        for problem in check_command(text)
    ]
    assert not problems, "documented commands that do not exist:\n" + "\n".join(problems)


def test_the_command_check_catches_rot():
    """The check itself: a wrong subcommand, option or script is found; synopses are read as written."""
    assert check_command("gradmix run CONFIG [--out DIR] [--resume | --overwrite] --set train.lr=0.001") == []
    assert check_command("gradmix runn configs/smoke.toml")
    assert check_command("gradmix run configs/smoke.toml --no-such-flag")
    assert check_command("python examples/plain_loop.py --method pike --no-such-flag")
    assert check_command("torchrun --standalone --nproc_per_node 2 examples/nope.py")
    assert check_command("WANDB_MODE=offline gradmix compare c.toml --seedz 0,1")
    assert check_command("bash scripts/main.sh && bash scripts/test.sh") == []
    assert check_command("bash scripts/mian.sh")
    assert check_command("torchrun --standalone --nproc_per_node 2 repro.py keep") == []  # the reader's own file
    assert check_command("gradmix ... --anything") == []  # a placeholder, not a subcommand


# -- the site ---------------------------------------------------------------------------------------------------------


def _nav_pages(entries) -> list[str]:
    out: list[str] = []
    for entry in entries:
        if isinstance(entry, str):
            out.append(entry)
        elif isinstance(entry, dict):
            for value in entry.values():
                out.extend(_nav_pages([value]) if isinstance(value, str) else _nav_pages(value))
        elif isinstance(entry, list):
            out.extend(_nav_pages(entry))
    return out


def test_mkdocs_nav_lists_every_page():
    """mkdocs.yml's nav holds every page under docs/ once, and every nav entry is a page that exists."""
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    assert config.get("docs_dir", "docs") == "docs"
    nav = [page for page in _nav_pages(config["nav"]) if not page.startswith(("http://", "https://"))]
    pages = {str(p.relative_to(DOCS_DIR)) for p in PAGES}
    missing = sorted(pages - set(nav))
    assert not missing, f"pages under docs/ that mkdocs.yml's nav does not list: {missing}"
    absent = sorted(set(nav) - pages)
    assert not absent, f"mkdocs.yml's nav lists pages that do not exist: {absent}"
    twice = sorted({page for page in nav if nav.count(page) > 1})
    assert not twice, f"mkdocs.yml's nav lists pages twice: {twice}"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_relative_links_point_at_files_that_exist(path: Path):
    api = (DOCS_DIR / "api.md").read_text(encoding="utf-8")
    problems = []
    for number, line in prose_lines(path):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if target.startswith(("http://", "https://", "mailto:", "#")):
                continue
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve()
            if not resolved.exists():
                problems.append(f"{path.relative_to(ROOT)}:{number}: {target} does not exist")
            elif anchor and resolved == (DOCS_DIR / "api.md").resolve() and f'id="{anchor}"' not in api:
                problems.append(f"{path.relative_to(ROOT)}:{number}: docs/api.md has no anchor {anchor!r}")
    assert not problems, "\n".join(problems)
