"""Write docs/api.md, the API reference of the ``gradmix`` library, from its docstrings.

    python scripts/gen_api_docs.py            # (re)writes docs/api.md
    python scripts/gen_api_docs.py --check    # exit 1 if docs/api.md is not what this script writes now
    python scripts/gen_api_docs.py --out FILE # writes FILE instead

What it covers: the public names of every module in ``MODULES`` (its ``__all__``; a module without one: the public
names it defines), each with its signature and its docstring; a class also with its public methods and properties
(the ones it defines itself). Names a module re-exports from another documented module are a link to where they are
documented. Modules listed in ``INTERNAL`` are the probe's and the methods' building blocks, named on the page but not
documented name by name.

Deterministic: the modules are imported (to find the public names, classes' bases and what kind each name is), but
every signature, default value, constant and docstring is read from the source text (``ast``), never from ``repr``
(which would print memory addresses and set orders that change from run to run), and everything is in a fixed
order. A module that cannot be imported here (an integration whose framework is not installed) is skipped with a
note in the page; tests/test_api_docs.py compares the page with a fresh one only where nothing was skipped.

Standard library only (``ast``, ``inspect``, ``importlib``).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
OUT = ROOT / "docs" / "api.md"
COMMAND = "python scripts/gen_api_docs.py"

# (module, one line on what it is for): the page's order
MODULES: tuple[tuple[str, str], ...] = (
    ("gradmix", "the package: the names most programs need"),
    ("gradmix.controller", "`Mixer`, the plain-loop composition of core, sampler, probe and writers"),
    ("gradmix.core", "`MixingCore`, the loop-agnostic core any training loop drives"),
    ("gradmix.sampler", "`MixtureSampler`, weights -> batches of (domain, example)"),
    ("gradmix.sources", "named domains: token windows in RAM, token files, HF datasets, streams"),
    ("gradmix.example_sources", "domains of examples of any structure, and their collate function"),
    ("gradmix.sft", "supervised fine-tuning: per-example causal-LM loss, packing within a domain"),
    ("gradmix.stats", "`DomainStats` and `Measurement`: what a probe measures and a method reads"),
    ("gradmix.probe", "per-domain gradient statistics from the training step (micro-batch, fused, sharded)"),
    ("gradmix.methods", "the method registry: `make_method`, `register_method`, ..."),
    ("gradmix.methods.base", "`MixingMethod`, the interface every method implements"),
    ("gradmix.methods.static", "uniform, fixed, proportional, temperature, round robin, random"),
    ("gradmix.methods.pike", "PiKE"),
    ("gradmix.methods.fair_pike", "Fair-PiKE"),
    ("gradmix.methods.dga", "DGA: steering toward a target set"),
    ("gradmix.methods.doge", "DoGE"),
    ("gradmix.methods.doremi", "DoReMi (online)"),
    ("gradmix.methods.odm", "ODM (a bandit)"),
    ("gradmix.methods.famo", "FAMO adapted to data mixing"),
    ("gradmix.methods.importance", "importance sampling from a target histogram"),
    ("gradmix.methods.schedule", "replaying an exported per-step schedule"),
    ("gradmix.alerts", "alerts: collapse, starved, overfitting, repetition"),
    ("gradmix.writers", "metrics writers: jsonl, csv, TensorBoard, W&B; the tag names"),
    ("gradmix.diagnostics", "do the domains' gradients conflict? (`gradmix diagnose`)"),
    ("gradmix.checkpoint", "atomic, verified checkpoint files"),
    ("gradmix.runlock", "one owner per run folder"),
    ("gradmix.distributed", "process-group timeout and rank agreement"),
    ("gradmix.permutation", "seeded bijections: one exact permutation per domain and pass"),
    ("gradmix.integrations.hf", "Hugging Face `Trainer` (`pip install 'gradmix[hf]'`)"),
    ("gradmix.integrations.trl", "TRL `SFTTrainer` (`pip install 'gradmix[trl]'`)"),
    ("gradmix.integrations.torchtitan", "torchtitan (`pip install 'gradmix[torchtitan]'`)"),
    ("gradmix.integrations.lightning", "Lightning (`pip install 'gradmix[lightning]'`)"),
    ("gradmix.integrations.fsdp", "FSDP2 sharded checkpoints"),
)

# modules that are building blocks of the documented ones: named, not documented name by name
INTERNAL: tuple[str, ...] = (
    "gradmix.integrations",
    "gradmix.probe.attention",
    "gradmix.probe.checks",
    "gradmix.probe.coverage",
    "gradmix.probe.estimators",
    "gradmix.probe.factory",
    "gradmix.probe.fused",
    "gradmix.probe.layout",
    "gradmix.probe.micro",
    "gradmix.probe.parts",
    "gradmix.probe.products",
    "gradmix.probe.protocol",
    "gradmix.probe.reduce",
    "gradmix.probe.reroute",
    "gradmix.probe.scaling",
    "gradmix.probe.sharded",
    "gradmix.probe.target",
)

WIDTH = 116  # a signature longer than this is written one parameter per line


# -- source text --------------------------------------------------------------------------------------------------


@dataclass
class Source:
    """One module's source: its text and syntax tree, and an index of its classes and functions by qualified name."""

    text: str
    tree: ast.Module
    defs: dict[str, ast.AST] = field(default_factory=dict)

    @classmethod
    def of(cls, module_name: str) -> Source:
        module = importlib.import_module(module_name)
        path = Path(inspect.getsourcefile(module) or "")
        text = path.read_text(encoding="utf-8")
        source = cls(text, ast.parse(text))
        source._index(source.tree.body, "")
        return source

    def _index(self, body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + node.name
                self.defs.setdefault(name, node)
                if isinstance(node, ast.ClassDef):
                    self._index(node.body, name + ".")

    def segment(self, node: ast.AST | None) -> str:
        """The source text of ``node``, on one line."""
        if node is None:
            return ""
        return " ".join((ast.get_source_segment(self.text, node) or "").split())

    def assignments(self) -> dict[str, tuple[str, str | None]]:
        """Top-level ``NAME = value`` / ``NAME: type = value``: name -> (value text, the docstring after it)."""
        found: dict[str, tuple[str, str | None]] = {}
        body = self.tree.body
        for i, node in enumerate(body):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                targets, value = [node.target], node.value
            else:
                continue
            doc = None
            after = body[i + 1] if i + 1 < len(body) else None
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                text = after.value.value
                doc = inspect.cleandoc(text) if isinstance(text, str) else None
            for target in targets:
                if isinstance(target, ast.Name):
                    found[target.id] = (self.segment(value), doc)
        return found


_SOURCES: dict[str, Source] = {}


def source_of(module_name: str) -> Source:
    if module_name not in _SOURCES:
        _SOURCES[module_name] = Source.of(module_name)
    return _SOURCES[module_name]


def definition(obj: Any) -> tuple[Source, ast.AST] | None:
    """The ``def`` / ``class`` node of a gradmix function or class, with its module's source."""
    module_name = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(module_name, str) or not module_name.startswith("gradmix") or not isinstance(qualname, str):
        return None
    source = source_of(module_name)
    node = source.defs.get(qualname)
    return None if node is None else (source, node)


# -- signatures ---------------------------------------------------------------------------------------------------


def _parameter(source: Source, arg: ast.arg, default: ast.expr | None, star: str = "") -> str:
    text = star + arg.arg
    if arg.annotation is not None:
        text += f": {source.segment(arg.annotation)}"
    if default is not None:
        text += f" = {source.segment(default)}" if arg.annotation is not None else f"={source.segment(default)}"
    return text


def parameters(source: Source, args: ast.arguments, drop_first: bool) -> list[str]:
    """The parameters of a ``def`` as written in the source (``self`` / ``cls`` dropped when asked)."""
    positional = [*args.posonlyargs, *args.args]
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    out: list[str] = []
    for i, (arg, default) in enumerate(zip(positional, defaults)):
        if drop_first and i == 0:
            continue
        out.append(_parameter(source, arg, default))
        if args.posonlyargs and i == len(args.posonlyargs) - 1:
            out.append("/")
    if args.vararg is not None:
        out.append(_parameter(source, args.vararg, None, "*"))
    elif args.kwonlyargs:
        out.append("*")
    for arg, kw_default in zip(args.kwonlyargs, args.kw_defaults):
        out.append(_parameter(source, arg, kw_default))
    if args.kwarg is not None:
        out.append(_parameter(source, args.kwarg, None, "**"))
    return out


def dataclass_fields(source: Source, node: ast.ClassDef) -> list[str]:
    """The ``__init__`` parameters a dataclass gets from its annotated fields (``ClassVar``s and ``init=False``
    fields left out)."""
    out = []
    for stmt in node.body:
        if not isinstance(stmt, ast.AnnAssign) or not isinstance(stmt.target, ast.Name):
            continue
        annotation = source.segment(stmt.annotation)
        if annotation.startswith(("ClassVar", "typing.ClassVar")):
            continue
        value = stmt.value
        if isinstance(value, ast.Call) and source.segment(value.func).endswith("field"):
            keywords = {kw.arg: kw.value for kw in value.keywords}
            init = keywords.get("init")
            if isinstance(init, ast.Constant) and init.value is False:
                continue
            if "default" in keywords:
                value = keywords["default"]
            elif "default_factory" in keywords:
                out.append(f"{stmt.target.id}: {annotation} = <{source.segment(keywords['default_factory'])}()>")
                continue
            else:
                value = None
        text = f"{stmt.target.id}: {annotation}"
        out.append(text + (f" = {source.segment(value)}" if value is not None else ""))
    return out


def join_signature(name: str, params: list[str], returns: str = "") -> str:
    tail = f" -> {returns}" if returns else ""
    line = f"{name}({', '.join(params)}){tail}"
    if len(line) <= WIDTH or not params:
        return line
    return f"{name}(\n" + "".join(f"    {p},\n" for p in params) + f"){tail}"


def function_signature(obj: Any, name: str, *, method: bool = False) -> str:
    found = definition(inspect.unwrap(obj))
    if found is None or not isinstance(found[1], (ast.FunctionDef, ast.AsyncFunctionDef)):
        return f"{name}(...)"
    source, node = found
    assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    returns = source.segment(node.returns) if node.returns is not None else ""
    return join_signature(name, parameters(source, node.args, drop_first=method), returns)


def _is_gradmix(cls: type) -> bool:
    return cls.__module__.startswith("gradmix")


def class_signature(cls: type) -> str | None:
    """``Name(parameters)`` of the constructor, from the first gradmix class in the MRO that defines ``__init__``
    (or is a dataclass); None when the constructor is a foreign base's (an exception, a protocol)."""
    for klass in cls.__mro__:
        if not _is_gradmix(klass):
            return None
        found = definition(klass)
        if found is None:
            return None
        source, node = found
        assert isinstance(node, ast.ClassDef)
        init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        if init is not None:
            return join_signature(cls.__name__, parameters(source, init.args, drop_first=True))
        if "__dataclass_fields__" in vars(klass):
            return join_signature(cls.__name__, dataclass_fields(source, node))
    return None


def bases_text(cls: type) -> str:
    found = definition(cls)
    if found is None or not isinstance(found[1], ast.ClassDef):
        return ""
    source, node = found
    assert isinstance(node, ast.ClassDef)
    names = [source.segment(b) for b in node.bases] + [f"{k.arg}={source.segment(k.value)}" for k in node.keywords]
    return ", ".join(names)


# -- docstrings ---------------------------------------------------------------------------------------------------


def own_doc(obj: Any) -> str:
    """``obj``'s own docstring, cleaned ("" when it has none: nothing inherited, no generated dataclass one)."""
    doc = vars(obj).get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    if not isinstance(doc, str):
        return ""
    doc = inspect.cleandoc(doc)
    if isinstance(obj, type) and "__dataclass_fields__" in vars(obj) and doc.startswith(f"{obj.__name__}("):
        return ""  # the dataclass decorator's generated signature, not a docstring
    return doc


def fence(*parts: str) -> list[str]:
    """A ```text block of the non-empty parts, separated by blank lines."""
    body = "\n\n".join(p for p in parts if p)
    if not body:
        return []
    if "```" in body:
        raise ValueError("a docstring holds a ``` fence, which would end the page's text block")
    return ["```text", *body.splitlines(), "```", ""]


# -- the page -----------------------------------------------------------------------------------------------------


def anchor(name: str) -> str:
    return f'<a id="{name}"></a>'


def public_names(module: Any, module_name: str) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    source = source_of(module_name)  # no __all__: the public names it defines, in source order
    out: list[str] = []
    for node in source.tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append(node.name)
        elif isinstance(node, ast.Assign):
            out.extend(t.id for t in node.targets if isinstance(t, ast.Name))
    return [n for n in out if not n.startswith("_")]


def home_of(obj: Any, name: str, module_name: str, documented: set[str]) -> str | None:
    """Where ``obj`` is documented when that is another documented module (a re-export), else None."""
    home = getattr(obj, "__module__", None) if (inspect.isclass(obj) or inspect.isfunction(obj)) else None
    if home is None:  # a constant: the documented module whose source assigns it
        if name in source_of(module_name).assignments():
            return None
        for other, _ in MODULES:
            if other != module_name and other in documented and name in source_of(other).assignments():
                module = sys.modules[other]
                if getattr(module, name, None) is obj:
                    return other
        return None
    return home if home != module_name and home in documented else None


def member_lines(cls: type) -> Iterator[str]:
    """A class's own public methods and properties, in the order it defines them."""
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        qual = f"{cls.__module__}.{cls.__qualname__}.{name}"
        if isinstance(value, property):
            target = value.fget
            kind = "property"
            signature = f"{name}"
            found = definition(target) if target is not None else None
            if found is not None and isinstance(found[1], ast.FunctionDef) and found[1].returns is not None:
                signature += f": {found[0].segment(found[1].returns)}"
        elif isinstance(value, (classmethod, staticmethod)):
            target = value.__func__
            kind = type(value).__name__
            signature = function_signature(target, name, method=isinstance(value, classmethod))
        elif inspect.isfunction(value):
            target, kind = value, "method"
            signature = function_signature(value, name, method=True)
        else:
            continue
        yield f"#### {anchor(qual)}`{cls.__name__}.{name}` ({kind})"
        yield ""
        yield from fence(signature, own_doc(target) if target is not None else "")


def object_lines(module_name: str, name: str, obj: Any) -> Iterator[str]:
    qual = f"{module_name}.{name}"
    if inspect.isclass(obj):
        kind = "exception" if issubclass(obj, BaseException) else "class"
        yield f"### {anchor(qual)}`{name}` ({kind})"
        yield ""
        bases = bases_text(obj)
        signature = class_signature(obj) or f"{name}"
        header = f"class {signature}" if not bases else f"class {signature}\n\nbases: {bases}"
        yield from fence(header, own_doc(obj))
        yield from member_lines(obj)
    elif inspect.isfunction(obj) or inspect.isfunction(inspect.unwrap(obj) if callable(obj) else None):
        yield f"### {anchor(qual)}`{name}` (function)"
        yield ""
        yield from fence(function_signature(obj, name), own_doc(obj))
    else:
        value, doc = source_of(module_name).assignments().get(name, ("", None))
        if len(value) > 300:
            value = value[:297] + "..."
        yield f"### {anchor(qual)}`{name}` (constant)"
        yield ""
        yield from fence(f"{name} = {value}" if value else name, doc or "")


def module_lines(module_name: str, summary: str, documented: set[str]) -> Iterator[str]:
    module = sys.modules[module_name]
    yield f"## {anchor(module_name)}`{module_name}`"
    yield ""
    yield f"{summary[0].upper()}{summary[1:]}."
    yield ""
    yield from fence(own_doc(module))
    links: list[str] = []
    for name in public_names(module, module_name):
        obj = getattr(module, name)
        home = home_of(obj, name, module_name, documented)
        if home is not None:
            real = name if home_is_constant(obj) else obj.__name__
            label = f"`{name}`" if real == name else f"`{name}` (= `{real}`)"
            links.append(f"[{label}](#{home}.{real})")
            continue
        yield from object_lines(module_name, name, obj)
    if links:
        yield f"Also here, documented where they are defined: {', '.join(links)}."
        yield ""


def home_is_constant(obj: Any) -> bool:
    return not (inspect.isclass(obj) or inspect.isfunction(obj))


def render() -> tuple[str, list[str]]:
    """The page, and the modules skipped because they cannot be imported here (with the reason)."""
    skipped: dict[str, str] = {}
    documented: set[str] = set()
    for module_name, _ in MODULES:
        try:
            importlib.import_module(module_name)
        except ImportError as exc:  # an optional framework that is not installed
            skipped[module_name] = " ".join(str(exc).split())
        else:
            documented.add(module_name)
    lines = [
        "<!-- Generated from the docstrings by scripts/gen_api_docs.py: do not edit by hand. -->",
        f"<!-- Regenerate with `{COMMAND}`; tests/test_api_docs.py fails when this page is out of date. -->",
        "",
        "# API reference",
        "",
        "Every public name of the `gradmix` library, module by module: its signature as written in the source and its",
        "docstring. The experiment kit (`gradmix_kit`, the `gradmix` command) is documented in [the CLI page](cli.md).",
        "",
        "| module | what it is for |",
        "|---|---|",
    ]
    for module_name, summary in MODULES:
        state = " (not importable here: see below)" if module_name in skipped else ""
        lines.append(f"| [`{module_name}`](#{module_name}) | {summary}{state} |")
    lines += [
        "",
        "Building blocks of the modules above, not documented name by name: "
        + ", ".join(f"`{name}`" for name in INTERNAL)
        + ".",
        "",
    ]
    for module_name, summary in MODULES:
        if module_name in skipped:
            lines += [
                f"## {anchor(module_name)}`{module_name}`",
                "",
                f"{summary[0].upper()}{summary[1:]}. Not documented here: importing it failed when this page was "
                f"generated ({skipped[module_name]}). Install its extra and run `{COMMAND}`.",
                "",
            ]
            continue
        lines += list(module_lines(module_name, summary, documented))
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n", sorted(f"{name}: {why}" for name, why in skipped.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(OUT), help="where to write the page (default docs/api.md)")
    parser.add_argument("--check", action="store_true", help="exit 1 if --out differs from the generated page")
    args = parser.parse_args(argv)
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))
    text, skipped = render()
    for note in skipped:
        print(f"gen_api_docs: skipped {note}", file=sys.stderr)
    out = Path(args.out)
    if args.check:
        current = out.read_text(encoding="utf-8") if out.is_file() else ""
        if current != text:
            print(f"{out} is out of date: run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
