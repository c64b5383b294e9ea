"""The library apart from the experiment kit: what `import gradmix` loads, what the library may import, and
methods registered by the user."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import pkgutil
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

import gradmix
from gradmix.methods.base import MixingMethod

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "src" / "gradmix"
KIT = ROOT / "src" / "gradmix_kit"
HEAVY = ("tqdm", "matplotlib", "tokenizers", "sklearn", "scipy", "transformers", "datasets", "gradmix_kit")


def _loaded_after(code: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def _top_level(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


def test_import_gradmix_loads_no_optional_dependency_and_not_the_kit():
    loaded = _top_level(_loaded_after("import gradmix"))
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    third_party = {m for m in loaded - set(sys.stdlib_module_names) if not m.startswith("_")} - {"gradmix"}
    assert third_party <= {"numpy", "torch"}, sorted(third_party)


def test_the_whole_library_needs_nothing_beyond_torch_and_numpy():
    # torch itself may import optional packages when they are installed (torch.hub imports tqdm): measure against
    # a process that imports only torch and numpy.
    baseline = _top_level(_loaded_after("import torch, numpy"))
    # every module of the library (integrations with other frameworks excepted: they import their framework)
    code = (
        "import gradmix, importlib, pkgutil\n"
        + "for info in pkgutil.walk_packages(gradmix.__path__, prefix='gradmix.'):\n"
        + "    if '.integrations' not in info.name:\n"
        + "        importlib.import_module(info.name)\n"
        + "gradmix.Mixer, gradmix.MixtureSampler\n"
        + "from gradmix.methods import method_class\n"
        + "[method_class(n) for n in gradmix.available_methods()]\n"
    )
    extra = _top_level(_loaded_after(code)) - baseline - set(sys.stdlib_module_names) - {"gradmix"}
    assert not {m for m in extra if not m.startswith("_")}, sorted(extra)
    assert "gradmix_kit" not in _top_level(_loaded_after(code))


def _module_name(path: Path) -> str:
    """``src/gradmix/probe/micro.py`` -> ``gradmix.probe.micro`` (a package's ``__init__`` is the package)."""
    parts = path.relative_to(ROOT / "src").with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names taken from it) for every import in the file, function-level ones and ``import_module("...")``
    calls included; relative imports are resolved against the file's package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                module = node.module or ""
            else:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            found.append((module, [alias.name for alias in node.names]))
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", None) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.args[0].value, []))
    return found


def _imported_modules(path: Path) -> set[str]:
    """Every module the file imports; ``from package import name`` also counts as importing ``package.name``."""
    names: set[str] = set()
    for module, taken in _imports(path):
        names.add(module)
        names.update(f"{module}.{name}" for name in taken if name != "*")
    return names


def test_the_library_never_imports_the_kit():
    files = sorted(LIBRARY.rglob("*.py"))
    assert files
    offenders = {
        str(f.relative_to(ROOT)): sorted(m for m in _imported_modules(f) if m.split(".")[0] == "gradmix_kit")
        for f in files
    }
    assert not {k: v for k, v in offenders.items() if v}
    # and no textual reference either (a string passed to importlib, a lazy import the AST walk could miss)
    assert not [str(f) for f in files if "gradmix_kit" in f.read_text(encoding="utf-8")]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_library_module_imports_another_modules_private_names():
    """A name with a leading underscore is its module's own: another module that needs it gets a public name in a
    shared module instead (``from gradmix.x import _y`` and ``import gradmix._x`` are refused)."""
    offenders = []
    for f in sorted(LIBRARY.rglob("*.py")):
        for module, taken in _imports(f):
            if module.split(".")[0] != "gradmix":
                continue
            private = [part for part in module.split(".") if _private(part)]
            private += [name for name in taken if _private(name)]
            if private:
                offenders.append(f"{f.relative_to(ROOT)}: from {module} import {', '.join(private)}")
    assert not offenders, offenders


PROBE = LIBRARY / "probe"


def test_the_probe_package_never_imports_the_layers_above_it():
    """The probe sits below the core, the Mixer and the integrations: nothing in gradmix/probe/ imports them."""
    above = ("gradmix.controller", "gradmix.core", "gradmix.integrations")
    files = sorted(PROBE.rglob("*.py"))
    assert len(files) >= 5
    offenders = {
        str(f.relative_to(ROOT)): sorted(
            m for m in _imported_modules(f) if any(m == a or m.startswith(a + ".") for a in above)
        )
        for f in files
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_only_the_factory_knows_all_three_probes():
    """``make_probe`` (gradmix.probe.factory) is the one module that imports the fused and the sharded probe both
    (the package's ``__init__`` re-exports them); the Mixer asks the factory."""
    knows_both = {
        _module_name(f)
        for f in sorted(LIBRARY.rglob("*.py"))
        if {"gradmix.probe.fused", "gradmix.probe.sharded"} <= _imported_modules(f)
    }
    assert knows_both <= {"gradmix.probe.factory", "gradmix.probe"}, knows_both
    assert not (LIBRARY / "fused_probe.py").exists() and not (LIBRARY / "probe.py").exists()


def test_the_three_probes_implement_the_probe_protocol():
    """One ``Probe`` protocol: every probe satisfies it, and their ``backward`` signatures are one signature, so the
    Mixer's one call site serves all three."""
    import torch

    from gradmix.probe import FusedGradientProbe, GradientProbe, Probe, ShardedGradientProbe, make_probe

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    probes: list[Probe] = [GradientProbe(model), FusedGradientProbe(model), ShardedGradientProbe(model)]
    probes.append(make_probe(model))
    assert all(isinstance(p, Probe) for p in probes)
    assert not isinstance(object(), Probe)
    signature = inspect.signature(Probe.backward)
    for cls in (GradientProbe, FusedGradientProbe, ShardedGradientProbe):
        assert inspect.signature(cls.backward) == signature, cls.__name__


def test_the_kit_is_its_own_package_with_its_data():
    assert not (LIBRARY / "cli.py").exists() and not (LIBRARY / "corpora").exists()
    for name in ("analysis", "cli", "report", "corpora", "experiment", "clustering"):
        importlib.import_module(f"gradmix_kit.{name}")
    assert (KIT / "data" / "tiny" / "legal.txt").is_file()


def _all_error_classes() -> list[type]:
    found = []
    for package in ("gradmix", "gradmix_kit"):
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
            try:
                module = importlib.import_module(info.name)
            except ImportError:  # an optional dependency that is not installed
                continue
            found += [
                obj
                for _, obj in inspect.getmembers(module, inspect.isclass)
                if issubclass(obj, BaseException) and obj.__module__ == module.__name__
            ]
    return found


def test_no_error_class_is_a_stop_iteration():
    errors = _all_error_classes()
    assert len(errors) >= 8
    assert not [e for e in errors if issubclass(e, (StopIteration, StopAsyncIteration, GeneratorExit))]


# -- register_method --------------------------------------------------------------------------------------------


class FavourFirst(MixingMethod):
    """Test plug-in: half the mass on the first domain, the rest uniform."""

    name = "favour_first"

    def __init__(self, num_domains, *, share=0.5, **kwargs):
        super().__init__(num_domains, **kwargs)
        self.share = share
        self._weights = self._target()

    def _target(self):
        w = np.full(self.num_domains, (1 - self.share) / self.num_domains)
        w[0] += self.share
        return w

    def _update(self, stats):
        return self._target()


@pytest.fixture
def registered():
    gradmix.register_method("favour_first", FavourFirst)
    yield "favour_first"
    gradmix.unregister_method("favour_first")


def test_register_method_makes_a_method_usable_by_name(registered):
    assert registered in gradmix.available_methods()
    method = gradmix.make_method("Favour-First", 4, share=0.2)  # same name normalisation as the built-ins
    assert isinstance(method, FavourFirst) and method.weights[0] == pytest.approx(0.2 + 0.8 / 4)


def test_register_method_rejects_duplicates_and_non_methods(registered):
    with pytest.raises(ValueError, match=r"already exists.*overwrite=True"):
        gradmix.register_method("favour_first", FavourFirst)
    with pytest.raises(ValueError, match="already exists"):
        gradmix.register_method("pike", FavourFirst)  # built-in names are taken too
    gradmix.register_method("favour_first", FavourFirst, overwrite=True)
    with pytest.raises(TypeError, match="not a MixingMethod subclass"):
        gradmix.register_method("nope", cast(Any, object))  # deliberately not a MixingMethod subclass
    with pytest.raises(TypeError, match="not a MixingMethod subclass"):
        gradmix.register_method("nope", cast(Any, FavourFirst(3)))  # an instance, not the class
    with pytest.raises(ValueError, match="non-empty string"):
        gradmix.register_method("", FavourFirst)
    with pytest.raises(ValueError, match="no registered mixing method"):
        gradmix.unregister_method("uniform")


def test_a_registered_method_drives_a_mixer_by_name(registered, tiny_lm, loss_fn, make_domains):
    from gradmix import Mixer

    mixer = Mixer(make_domains(), registered, 12, model=tiny_lm, update_every=2, method_params={"share": 0.4})
    assert isinstance(mixer.method, FavourFirst)
    for batch in mixer.batches(3):
        mixer.backward(tiny_lm, batch, loss_fn)
        mixer.step()
    assert mixer.weights[0] == pytest.approx(0.4 + 0.6 / 3)


def test_a_registered_method_runs_from_a_gradmix_run_config(registered, tmp_path):
    from gradmix_kit.cli import main

    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                str(ROOT / "configs" / "smoke.toml"),
                "--out",
                str(out),
                "--method",
                registered,
                "--no-progress",
                "--set",
                "steps=4",
                "--set",
                "eval.continuation_items=0",
            ]
        )
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == registered
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["weights"]["changelog"] == pytest.approx(0.5 + 0.5 / 4)


def test_methods_declare_their_needs_as_class_attributes():
    from gradmix.methods import method_class

    needs_target = {n for n in gradmix.available_methods() if method_class(n).needs_target}
    assert needs_target == {"dga", "doge"}
    assert [n for n in gradmix.available_methods() if method_class(n).needs_target_counts] == ["importance"]
    assert {n for n in gradmix.available_methods() if method_class(n).needs_sizes} >= {"proportional", "temperature"}
    # the kit reads the attributes instead of lists of names
    runner = (KIT / "experiment" / "runner.py").read_text(encoding="utf-8")
    assert '"importance"' not in runner and '"dga"' not in runner


def test_one_data_dir_default_one_atomic_writer_one_document_reader():
    kit_files = {f.relative_to(KIT).as_posix(): f.read_text(encoding="utf-8") for f in KIT.rglob("*.py")}
    # the data folder: one constant and one environment variable, in one place
    assert [f for f, text in kit_files.items() if '"GRADMIX_DATA"' in text] == ["corpora/store.py"]
    assert [f for f, text in kit_files.items() if '".cache"' in text] == ["corpora/store.py"]
    # atomic file writes go through gradmix.checkpoint.atomic_write (corpora/fetch.py only moves whole unpacked
    # folders and downloaded packages into place)
    assert not [f for f, text in kit_files.items() if "mkstemp" in text or "os.fsync" in text]
    # documents are split by gradmix.sources.read_documents only
    assert not [f for f, text in kit_files.items() if 'split("\\n\\n")' in text or "DOC_SEPARATOR:" in text]


def test_the_data_dir_follows_the_environment(monkeypatch, tmp_path):
    from gradmix_kit.clustering import default_cache_dir
    from gradmix_kit.corpora import DEFAULT_DATA_DIR, default_data_dir, resolve_data_dir

    monkeypatch.setenv("GRADMIX_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path == resolve_data_dir(None)
    assert default_cache_dir() == tmp_path / "embeddings"
    assert resolve_data_dir("~/x") == Path("~/x").expanduser()
    monkeypatch.delenv("GRADMIX_DATA")
    assert default_data_dir() == DEFAULT_DATA_DIR.expanduser()
