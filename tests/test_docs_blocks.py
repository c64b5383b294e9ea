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

Blocks run under torchrun. A block that is a program for ``torchrun`` (it initialises a process group) says so on its
first line, a comment a reader sees in the rendered page::

    # docs-test: torchrun

It runs as a program of its own under ``torchrun --standalone --nproc_per_node 2`` with gloo on the CPU (marked
``integration``, like the other torchrun tests), in a temporary working directory: a ``train.py`` that imports from
tests/docs_torchrun_prelude.py the names the block takes from the reader's earlier code (``make_model``,
``domains``, ``per_example_loss``, ``num_steps``), then runs the block, compiled under the markdown file's name and
lines, in its module globals. Every rank must exit 0 within ``TORCHRUN_TIMEOUT_S``; what a page documents about a
block's run (a checkpoint resumed, an abort at exit and its workaround) is checked too.

Blocks that are not run. A block that cannot run on a CPU machine (a GPU, several nodes) or is deliberately not
runnable says so on its first line::

    # docs-test: skip (needs a GPU)

and is skipped with that reason. Nothing else skips a block.

The site. mkdocs.yml's nav lists every page under docs/ and nothing else; relative links in the README and the docs
point at files that exist (and at anchors that exist, for links into the generated API page).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
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
TORCHRUN = re.compile(r"^#\s*docs-test:\s*torchrun\s*$")
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

    @property
    def torchrun(self) -> bool:
        """The block's first line is ``# docs-test: torchrun``: a program for torchrun, run under it."""
        return bool(TORCHRUN.match(self.source.split("\n", 1)[0].strip()))


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
IN_PROCESS_BLOCKS = [block for block in PYTHON_BLOCKS if not block.torchrun]
TORCHRUN_BLOCKS = [block for block in PYTHON_BLOCKS if block.torchrun]
TOML_BLOCKS = [block for block in ALL_BLOCKS if block.lang == "toml"]  # pieces of `gradmix run` configs


def _param(block: Block):
    marks = []
    if block.skip:
        marks.append(pytest.mark.skip(reason=f"{block.name}: {block.skip}"))
    if any(module in block.source for module in SLOW):
        marks.append(pytest.mark.integration)
    return pytest.param(block, marks=marks, id=block.name)


def test_the_docs_have_their_blocks_and_every_skip_mark_is_a_first_line():
    """The collection itself: every page is found (subfolders too), the files have their blocks, and a mark (skip,
    torchrun) is only ever the visible first line of a python or toml block (an old-style HTML comment mark is an
    error); the torchrun blocks of the DDP / FSDP2 page and of the gloo abort reproducer are found as such."""
    assert ROOT / "docs" / "howto" / "plain_loop.md" in PAGES  # pages in subfolders are collected
    assert sum(b.path.name == "README.md" for b in PYTHON_BLOCKS) >= 3
    assert len(PYTHON_BLOCKS) >= 25
    assert len(TOML_BLOCKS) >= 2
    torchrun_pages = {str(b.path.relative_to(ROOT)) for b in TORCHRUN_BLOCKS}
    assert torchrun_pages >= {"docs/howto/distributed.md", "docs/bad_inputs.md"}
    for block in ALL_BLOCKS:
        for offset, line in enumerate(block.source.splitlines()):
            if "docs-test:" in line:
                where = f"{block.name} (line {block.line + 1 + offset})"
                assert offset == 0 and (SKIP.match(line.strip()) or TORCHRUN.match(line.strip())), (
                    f"{where}: a docs-test mark must be the block's first line: # docs-test: skip (reason) or "
                    "# docs-test: torchrun"
                )
                assert block.lang in ("python", "toml"), f"{where}: only python and toml blocks are run"
                assert block.lang == "python" or not TORCHRUN.match(line.strip()), f"{where}: torchrun runs python"
    for path in DOCS:
        for number, line in prose_lines(path):
            assert not re.search(r"<!--\s*docs-test", line), (
                f"{path.relative_to(ROOT)}:{number}: mark a block that is not run on its first line, inside the "
                "block (# docs-test: skip (reason)), where readers see it"
            )


@pytest.mark.parametrize("block", [_param(b) for b in IN_PROCESS_BLOCKS])
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


# -- blocks run under torchrun ----------------------------------------------------------------------------------------

PRELUDE = Path(__file__).with_name("docs_torchrun_prelude.py")
NPROC = 2
TORCHRUN_TIMEOUT_S = 120
TORCHRUN_ENV = {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Launch:
    returncode: int
    output: str  # stdout and stderr of the launcher and its ranks, interleaved
    seconds: float


def _prelude_assignments() -> dict[str, ast.expr]:
    tree = ast.parse(PRELUDE.read_text(encoding="utf-8"))
    return {
        target.id: node.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }


@cache
def prelude_names() -> tuple[str, ...]:
    """The names the prelude hands a block: its ``__all__``."""
    return tuple(ast.literal_eval(_prelude_assignments()["__all__"]))


def prelude_num_steps() -> int:
    return int(ast.literal_eval(_prelude_assignments()["num_steps"]))


def write_torchrun_script(block: Block, folder: Path) -> Path:
    """``folder/train.py``, the program a torchrun block is: an import of the prelude names the block uses (the prelude
    copied next to it, when the block uses any), then the block (``folder/block.txt``), compiled under the markdown
    file's name with its lines where they are in the file and run in this module's own globals, as the same code
    written in the file would be (they live until the interpreter's exit, which matters to the gloo abort
    reproducer). Everything else the block imports itself, as a reader copying it must."""
    used = sorted(docs_namespace.free_names(block.source))
    missing = [name for name in used if name not in prelude_names()]
    if missing:
        raise docs_namespace.MissingFixture(
            f"{block.name} uses {', '.join(missing)}, which it neither defines nor imports, and "
            f"tests/{PRELUDE.name} does not provide it (its __all__: {', '.join(prelude_names())})"
        )
    lines = []
    if used:
        (folder / PRELUDE.name).write_text(PRELUDE.read_text(encoding="utf-8"), encoding="utf-8")
        lines.append(f"from {PRELUDE.stem} import {', '.join(used)}  # tests/{PRELUDE.name}")
    code = folder / "block.txt"  # the block, its lines where they are in the markdown file
    code.write_text("\n" * block.line + block.source, encoding="utf-8")
    read = f"open({str(code)!r}, encoding='utf-8').read()"  # binds no name in the block's globals
    lines.append(f"exec(compile({read}, {str(block.path)!r}, 'exec'))  # {block.name}")
    script = folder / "train.py"
    script.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return script


def run_torchrun(block: Block, folder: Path, *args: str) -> Launch:
    """``torchrun --standalone --nproc_per_node 2 train.py ARGS`` in ``folder``, train.py the block's program (gloo on
    loopback, one thread per rank, ``examples/`` importable, the hub and W&B offline); the launcher and its ranks are
    killed after ``TORCHRUN_TIMEOUT_S``."""
    path = write_torchrun_script(block, folder)
    pythonpath = [str(ROOT / "examples"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, **ENV, **TORCHRUN_ENV, "PYTHONPATH": os.pathsep.join(pythonpath)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(NPROC)]
    started = time.perf_counter()
    proc = subprocess.Popen(
        [*command, str(path), *args],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a timeout ends the launcher and every rank
    )
    try:
        output, _ = proc.communicate(timeout=TORCHRUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun {path.name} {' '.join(args)}: not done in {TORCHRUN_TIMEOUT_S} s:\n{output[-4000:]}")
    return Launch(proc.returncode, output, time.perf_counter() - started)


def _exitcodes(output: str) -> list[int]:
    """The exit codes torchrun reports for the ranks that failed (``exitcode  : -6 (pid: ...)``)."""
    return [int(code) for code in re.findall(r"exitcode\s*:\s*(-?\d+)", output)]


@pytest.mark.integration
@pytest.mark.parametrize("block", TORCHRUN_BLOCKS, ids=[b.name for b in TORCHRUN_BLOCKS])
def test_torchrun_block_runs(block: Block, tmp_path):
    """A ``# docs-test: torchrun`` block runs as written under torchrun with 2 gloo processes and every rank exits 0.
    A block that trains with a Mixer logs its metrics records in step order up to num_steps. A block that saves sharded
    checkpoints (the FSDP2 page) leaves them complete, and launched again with its newest checkpoint cut short (no
    ``COMPLETE`` marker: never resumed from, as the page says) it resumes from the one before and logs the same
    records as the uninterrupted run (metrics.jsonl cut back to the checkpoint, then continued)."""
    first = run_torchrun(block, tmp_path)
    print(f"{block.name}: torchrun ({NPROC} processes) ran in {first.seconds:.1f} s")
    assert first.returncode == 0, f"{block.name}: torchrun exited {first.returncode}:\n{first.output[-4000:]}"
    metrics = sorted(tmp_path.rglob("metrics.jsonl"))
    if "Mixer(" in block.source:
        assert metrics, f"{block.name}: the run wrote no metrics.jsonl"
    steps = prelude_num_steps()
    for path in metrics:  # a record every log_every steps (the Mixer's default: 10), the last one at num_steps
        logged = [r["step"] for r in _records(path)]
        assert logged and logged == sorted(set(logged)) and logged[-1] == steps, f"{path}: steps {logged}"
    if "save_sharded_checkpoint" not in block.source:
        return
    (run_dir,) = {path.parent for path in metrics}
    saved = sorted((run_dir / "checkpoints").iterdir())
    assert [folder.name for folder in saved] == [f"step-{s:06d}" for s in range(10, steps + 1, 10)]
    assert all((folder / "COMPLETE").is_file() for folder in saved)
    kept = {folder.name: (folder / "COMPLETE").stat().st_mtime_ns for folder in saved[:-1]}
    uninterrupted = _records(run_dir / "metrics.jsonl")
    (saved[-1] / "COMPLETE").unlink()  # as if the last save had been cut short
    again = run_torchrun(block, tmp_path)
    print(f"{block.name}: resumed in {again.seconds:.1f} s")
    assert again.returncode == 0, f"{block.name}: the second launch exited {again.returncode}:\n{again.output[-4000:]}"
    assert (saved[-1] / "COMPLETE").is_file()  # the last steps ran again and saved again
    assert {name: (run_dir / "checkpoints" / name / "COMPLETE").stat().st_mtime_ns for name in kept} == kept, (
        "the second launch started over instead of resuming from the newest complete checkpoint"
    )
    resumed = _records(run_dir / "metrics.jsonl")
    fields = ("step", "weights", "requested_weights", "train_loss")
    assert [[r.get(f) for f in fields] for r in resumed] == [[r.get(f) for f in fields] for r in uninterrupted]


@pytest.mark.integration
def test_gloo_abort_reproducer_and_its_workaround(tmp_path):
    """docs/bad_inputs.md, "gloo: SIGABRT at interpreter exit": the reproducer (run as written, without ``keep``, by
    ``test_torchrun_block_runs``: 0 of 20 aborted) with ``keep`` either ends cleanly or aborts at exit with
    SIGABRT ("terminate called without an active exception"), nothing else (it aborts in about half the runs, so
    one run cannot show the abort); with the page's workaround in place of its last line it ends cleanly on every
    rank."""
    block = next(b for b in TORCHRUN_BLOCKS if b.path.name == "bad_inputs.md" and "KEEP" in b.source)
    workaround = next(  # the page's one-line workaround: `dist.barrier(); ...; os._exit(0)`
        span
        for number, line in prose_lines(block.path)
        if number > block.line
        for span in INLINE_CODE.findall(line)
        if "destroy_process_group()" in span and "os._exit(0)" in span
    )
    last = "dist.destroy_process_group()\n"
    assert block.source.endswith(last), f"{block.name}: the reproducer no longer ends with {last.strip()}"
    fixed = replace(block, source=block.source[: -len(last)] + f"import os; {workaround}\n")

    (tmp_path / "keep").mkdir()
    kept = run_torchrun(block, tmp_path / "keep", "keep")
    aborted = kept.returncode != 0
    print(f"{block.name} keep: {'aborted at exit' if aborted else 'ended cleanly'} in {kept.seconds:.1f} s")
    if aborted:
        codes = set(_exitcodes(kept.output))  # a rank that aborted; torchrun then stops the other one (SIGTERM)
        abort, stopped = -int(signal.SIGABRT), -int(signal.SIGTERM)
        assert "terminate called" in kept.output and abort in codes and codes <= {abort, stopped}, (
            f"{block.name} keep: failed other than by the documented abort at exit:\n{kept.output[-4000:]}"
        )

    (tmp_path / "workaround").mkdir()
    clean = run_torchrun(fixed, tmp_path / "workaround", "keep")
    print(f"{block.name} keep + workaround: ran in {clean.seconds:.1f} s")
    assert clean.returncode == 0, f"{block.name} + workaround: exited {clean.returncode}:\n{clean.output[-4000:]}"


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
