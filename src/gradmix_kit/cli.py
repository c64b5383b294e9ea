"""The ``gradmix`` command: run, compare, report, diagnose, export, cluster, methods."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradmix_kit.signals import RunInterrupted, StopSignals

__all__ = ["main"]


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``--set train.lr=0.001 --set mixing.method=pike`` -> nested dict (see ``parse_overrides``)."""
    from gradmix_kit.experiment.config import parse_overrides

    return parse_overrides(pairs)


def _default_out(cfg: dict[str, Any], kind: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg['name']}-{kind}-{stamp}"


def cmd_run(args: argparse.Namespace) -> int:
    from gradmix_kit.experiment.config import load_config
    from gradmix_kit.experiment.runner import run_experiment

    overrides = _overrides(args.set)
    if args.method:
        mixing = overrides.setdefault("mixing", {})
        if args.method != load_config(args.config)["mixing"]["method"]:
            mixing.setdefault("params", {})  # the file's method parameters do not carry over to another method
        mixing["method"] = args.method
    cfg = load_config(args.config, overrides)
    out = _out_folder(Path(args.out) if args.out else _default_out(cfg, cfg["mixing"]["method"]))
    with StopSignals() as stop:  # SIGTERM / SIGINT: checkpoint at the next step boundary, then one line
        summary = run_experiment(
            cfg, out, progress=not args.no_progress, resume=args.resume, stop=stop, overwrite=args.overwrite
        )
    print(f"run folder: {out}")
    line = (
        f"avg val loss {summary['avg_val_loss']:.4f}, worst {summary['worst_val_loss']:.4f} ({summary['worst_domain']})"
    )
    if "avg_val_accuracy" in summary:
        line += f", continuation accuracy {summary['avg_val_accuracy']:.3f}"
    if "target_val_loss" in summary:
        line += f", target loss {summary['target_val_loss']:.4f}"
    print(line)
    report = out / "report.html"
    if report.exists():
        print(f"report: {report}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from gradmix_kit.experiment.config import load_config
    from gradmix_kit.experiment.runner import run_comparison

    cfg = load_config(args.config, _overrides(args.set))
    methods = args.methods.split(",") if args.methods else cfg["compare"]["methods"]
    if not methods:
        raise SystemExit("no methods: pass --methods a,b,c or set compare.methods in the config")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(cfg["compare"]["seeds"])
    out = _out_folder(Path(args.out) if args.out else _default_out(cfg, "compare"))
    t0 = time.perf_counter()
    with StopSignals() as stop:
        report = run_comparison(
            cfg,
            methods,
            seeds,
            out,
            method_overrides=cfg["compare"]["overrides"],
            progress=not args.no_progress,
            resume=args.resume,
            stop=stop,
            overwrite=args.overwrite,
        )
    print(f"comparison of {', '.join(methods)} over seeds {seeds} took {time.perf_counter() - t0:.0f}s")
    md = out / "comparison.md"
    if md.exists():
        print(md.read_text())  # opens with the summary: which method to pick, beyond noise or not
    stats = out / "comparison_stats.json"
    if stats.exists():
        import json

        decision = json.loads(stats.read_text(encoding="utf-8")).get("decision") or []
        line = " ".join(str(d["recommendation"]) for d in decision if d.get("recommendation"))
        if line:
            print(f"Recommendation: {line}")
    print(f"report: {report}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from gradmix_kit.analysis import expand_run_dirs
    from gradmix_kit.report import write_report

    labels = [name for value in args.label for name in value.split(",")] if args.label else None
    runs = [Path(r) for r in args.runs] if labels else expand_run_dirs([Path(r) for r in args.runs])
    out = Path(args.out) if args.out else (Path(args.runs[0]) if len(args.runs) == 1 else Path("report"))
    path = write_report(runs, out, title=args.title, baseline=args.baseline, labels=labels)
    print(f"report: {path}")
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from gradmix_kit.experiment.config import load_config
    from gradmix_kit.experiment.runner import run_diagnosis

    cfg = load_config(args.config, _overrides(args.set))
    out = Path(args.out) if args.out else _default_out(cfg, "diagnose")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {args.checkpoint!r} does not exist")
    result = run_diagnosis(
        cfg, out, steps=args.steps, checkpoint=args.checkpoint, threshold=args.threshold, progress=not args.no_progress
    )

    def show(value: Any, digits: int = 3) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    def interval(key: str) -> str:
        bounds = result.get(key)
        return f" ({result.get('confidence', 0.9):.0%} interval {bounds[0]:.3f}-{bounds[1]:.3f})" if bounds else ""

    print(
        f"gradient conflict between {len(result['domains'])} domains, {result['usable_measurements']} usable of "
        f"{result['num_measurements']} measured steps: {result['verdict']}"
    )
    print(
        f"c = {show(result['c'])}{interval('c_interval')}, "
        f"c_bar = {show(result['c_bar'])}{interval('c_bar_interval')}, conflicting pairs: "
        f"{show(result['conflict_fraction'], 2)} (below -{result['threshold']:g}: "
        f"{show(result['conflict_fraction_threshold'], 2)})"
    )
    print(result["recommendation"])
    print(f"diagnosis: {out / 'diagnosis.json'}")
    page = out / "diagnosis.html"
    if page.exists():
        print(f"report: {page}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from gradmix_kit.export import ExportError, check_options, read_run, render

    check_options(args.format, args.weights)  # a typo is said before the run folder is read
    mix = read_run(args.run, update_every=args.update_every)
    if not mix.exact:
        print(f"gradmix: warning: {args.run}: the per-step weights are not exact: {mix.note}", file=sys.stderr)
    text = render(mix, args.format, args.weights)
    if args.out is None:
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    if out.is_dir():
        raise ExportError(f"--out {str(out)!r} is a folder; give a file name")
    from gradmix.checkpoint import atomic_write

    atomic_write(out, lambda fh: fh.write(text), mode="w")
    print(f"exported {args.format} ({args.weights if args.format != 'schedule' else 'schedule'}) to {out}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from gradmix.methods import available_methods, method_class

    for name in available_methods():
        try:
            cls = method_class(name)
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        except ValueError as exc:
            doc = f"(unavailable: {exc})"
        print(f"{name:14s} {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradmix", description="Adaptive online data mixing for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train one model with one mixing method; writes a run folder")
    p.add_argument("config", help="a .toml or .json experiment config (see configs/)")
    p.add_argument("--out", help="run folder (default runs/<name>-<method>-<time>)")
    p.add_argument("--method", help="override mixing.method")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint.pt")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in the run folder (without it, or --resume, a used folder is refused)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="run several methods x seeds on the same data; writes a report")
    p.add_argument("config")
    p.add_argument("--methods", help="comma-separated (default: compare.methods of the config)")
    p.add_argument("--seeds", help="comma-separated (default: compare.seeds of the config)")
    p.add_argument("--out")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the finished runs of --out, continue the ones cut short from their checkpoints",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the runs already in --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="HTML + PNG report of run folders or comparison folders")
    p.add_argument("runs", nargs="+")
    p.add_argument("--out")
    p.add_argument("--title")
    p.add_argument("--baseline", default="uniform")
    p.add_argument(
        "--label",
        "--labels",
        action="append",
        metavar="NAME[,NAME...]",
        help="one name per folder given, in order (comma-separated or repeated): tells apart runs of the same "
        "method and seed; a comparison folder's runs become NAME:method",
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("diagnose", help="do the domains' gradients conflict? (PiKE's assumption) -> diagnosis.json")
    p.add_argument("config", help="a .toml or .json experiment config: its model, data and probe settings are used")
    p.add_argument("--steps", type=int, default=30, help="measured steps (default 30)")
    p.add_argument("--checkpoint", help="probe this model checkpoint without training (default: train from scratch)")
    p.add_argument(
        "--threshold", type=float, default=0.1, help="a cosine below -THRESHOLD counts as clear conflict (default 0.1)"
    )
    p.add_argument("--out", help="output folder (default runs/<name>-diagnose-<time>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser(
        "export",
        help="write a run's learned mix (or its per-step schedule) for another engine or a fixed-mix gradmix run",
    )
    p.add_argument("run", help="a run folder written by `gradmix run` or a Mixer (its metrics.jsonl)")
    p.add_argument(
        "--format",
        required=True,
        metavar="FORMAT",
        help="recipe (JSON + provenance), schedule (per-step JSON), hf (interleave_datasets), megatron (--data-path "
        "blend, also NeMo), olmo (OLMo-core source mixture YAML), torchtitan (TOML), gradmix (config fragment)",
    )
    p.add_argument(
        "--weights",
        default="final",
        metavar="KIND",
        help="final (default: the method's mix at the end), average (token-weighted over the steps), or schedule "
        "(--format gradmix: the `schedule` method replaying the run step for step)",
    )
    p.add_argument("--out", metavar="FILE", help="write to FILE (default: standard output)")
    p.add_argument(
        "--update-every",
        type=int,
        metavar="N",
        help="the run's update interval, for a run folder without config.json (a Mixer's): places weight changes "
        "between logged rows exactly",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("methods", help="list the mixing methods")
    p.set_defaults(func=cmd_methods)

    try:
        from gradmix_kit.clustering import add_cluster_parser

        add_cluster_parser(sub)
    except ImportError:
        pass
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input (config, data, arguments), not a bug: one line, exit code 2, no traceback.

    Every kit error class derives from ValueError except the corpus ones (RuntimeError) and a missing optional
    model; the library's (WeightError, StatsError, DocumentSplitError, ...) are ValueErrors."""
    errors: list[type[BaseException]] = [ValueError, FileNotFoundError]
    from gradmix_kit.corpora.errors import CorpusError

    errors.append(CorpusError)
    from gradmix_kit.clustering.errors import ModelUnavailableError

    errors.append(ModelUnavailableError)
    return tuple(errors)


def _os_error(exc: OSError) -> str:
    """An OSError as one line naming the file: ``runs/x/config.json: Read-only file system``."""
    if exc.filename is not None and exc.strerror:
        names = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
        return f"{names}: {exc.strerror}"
    return " ".join((exc.strerror or str(exc) or type(exc).__name__).split())


def _out_folder(out: Path) -> Path:
    """``--out`` must be a folder (or not exist yet): a file there is a clear error, not ``FileExistsError``."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; give a folder for the run (it is created if missing)")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradmix`` command. Bad input ends with ``gradmix: error: <message>`` and exit code 2;
    anything unexpected keeps its traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # output piped into a reader that stopped early (`gradmix methods | head`)
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except RunInterrupted as exc:  # SIGTERM / SIGINT, handled at a step boundary (gradmix_kit.signals)
        hint = f"; continue with `gradmix {args.command} ... --resume`" if exc.checkpoint is not None else ""
        print(f"gradmix: {exc}{hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside a run's training (report, cluster, methods)
        print("gradmix: interrupted (SIGINT)", file=sys.stderr)
        return 130
    except _expected_errors() as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"gradmix: error: {message}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system said no (a read-only folder, a full disk): the file and the reason
        print(f"gradmix: error: {_os_error(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
