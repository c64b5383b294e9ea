"""The HF Trainer integration end to end: examples/hf_trainer.py (a random-init GPT-2 on three domains) run in
subprocesses; a run stopped after a checkpoint (or killed with SIGKILL) and resumed must log exactly the weights
and losses of an uninterrupted run, with gradient (pike) and loss-only (odm) methods, with gradient accumulation
and with GPT-2's dropout 0.1 on (issue 22 item 9: building the data iterator after the Trainer restored the RNG
drew from it, and a resumed run's dropout masks differed from step 21 on). A used output folder is refused unless
the run resumes or overwrites, and a folder another process owns is refused (items 1 and 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import kill_after_checkpoint, read_metrics

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("datasets")

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "hf_trainer.py"
STEPS = 30
TIMEOUT = 300
DROPOUT = "0.1"  # GPT-2's default: dropout draws from the RNG the Trainer checkpoints and restores


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# gradmix_v1: its weights move within these few steps, so equal weights after a resume prove something (the default
# keeps the even split on this tiny run until its statistics tell the domains apart)
PIKE_VARIANT = ("--pike-variant", "gradmix_v1")


def _cmd(out: Path, *extra: str) -> list[str]:
    args = ["--out", str(out), "--steps", str(STEPS), "--dropout", DROPOUT, *PIKE_VARIANT, *extra]
    return [sys.executable, str(EXAMPLE), *args]


def _run(out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(_cmd(out, *extra), capture_output=True, text=True, timeout=TIMEOUT, env=_env(), cwd=ROOT)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(extra)} exited with {done.returncode}:\n{done.stderr[-4000:]}")
    return done


def _assert_same_weights(reference: list[dict], resumed: list[dict]) -> None:
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))  # no duplicated or missing step
    for a, b in zip(reference, resumed):
        assert a["weights"] == b["weights"], (a["step"], a["weights"], b["weights"])  # exactly, not approximately
        assert a["train_loss"] == b["train_loss"], a["step"]


_REFERENCES: dict[tuple[str, int], list[dict]] = {}


def _reference(tmp_path_factory, method: str, accum: int) -> list[dict]:
    """An uninterrupted run (once per configuration and session; in this process, to save a start-up: the stopped
    and resumed runs it is compared with are separate processes)."""
    key = (method, accum)
    if key not in _REFERENCES:
        out = tmp_path_factory.mktemp(f"ref_{method}_{accum}")
        _example_module().main(
            [
                "--out",
                str(out),
                "--steps",
                str(STEPS),
                "--method",
                method,
                "--grad-accum",
                str(accum),
                "--dropout",
                DROPOUT,
                *PIKE_VARIANT,
            ]
        )
        records = read_metrics(out)
        for field in ("step", "weights", "train_loss", "weight_entropy", "effective_domains", "max_weight"):
            assert all(field in r for r in records), field
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
        # the KPIs reached the Trainer's loggers (its log history, saved with every checkpoint)
        history = json.loads((out / "checkpoint-30" / "trainer_state.json").read_text())["log_history"]
        logged = [h for h in history if "gradmix/weights/code" in h]  # the writers' names (gradmix.writers)
        assert [h["step"] for h in logged] == list(range(1, STEPS + 1))
        assert logged[-1]["gradmix/weights/code"] == pytest.approx(records[-1]["weights"]["code"])
        assert {
            "gradmix/weight_entropy",
            "gradmix/effective_domains",
            "gradmix/max_weight",
            "gradmix/train_loss/legal",
            "loss",
        } <= set(logged[-1])
        _REFERENCES[key] = records
    return _REFERENCES[key]


@pytest.mark.parametrize("method,accum", [("pike", 1), ("pike", 2), ("odm", 2)])
def test_stop_and_resume_logs_the_weights_of_an_uninterrupted_run(tmp_path, tmp_path_factory, method, accum):
    reference = _reference(tmp_path_factory, method, accum)
    if method == "pike":  # the mix really changed while training (else the comparison would prove little)
        assert len({json.dumps(r["weights"]) for r in reference}) >= 4
    out = tmp_path / "run"
    stopped = _run(out, "--method", method, "--grad-accum", str(accum), "--stop-at", "20")
    assert "stopping right after the checkpoint at step 20" in stopped.stdout
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 21))
    assert not (out / "checkpoint-30").exists()
    resumed = _run(out, "--method", method, "--grad-accum", str(accum), "--resume")
    assert "checkpoint-20" in resumed.stdout
    _assert_same_weights(reference, read_metrics(out))


def test_sigkill_and_resume_logs_the_weights_of_an_uninterrupted_run(tmp_path, tmp_path_factory):
    reference = _reference(tmp_path_factory, "pike", 1)
    out = tmp_path / "run"
    kill_after_checkpoint(
        _cmd(out, "--step-delay", "0.1"),
        out / "checkpoint-10" / "gradmix_state.pt",
        env=_env(),
        cwd=ROOT,
        past=0.35,  # a few steps past the checkpoint
        timeout=TIMEOUT,
    )
    written = [r["step"] for r in read_metrics(out)]
    assert 10 <= len(written) < STEPS, written  # killed mid-run, after checkpoint 10
    resumed = _run(out, "--resume")
    assert "resume from" in resumed.stdout and "scratch" not in resumed.stdout
    _assert_same_weights(reference, read_metrics(out))


def _example_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gradmix_hf_trainer_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(EXAMPLE.parent))  # the example imports its sibling _trainer_callbacks, as when run
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    return module


def test_resume_of_another_run_is_a_clear_error(tmp_path):
    """In-process (no subprocess start-up): a run of 10 steps, then resumes with other domains / another method."""
    example = _example_module()
    out = tmp_path / "run"
    example.main(["--out", str(out), "--steps", "10"])
    assert (out / "checkpoint-10" / "gradmix_state.pt").is_file()
    with pytest.raises(ValueError, match=r"checkpoint-10.*other domains"):
        example.main(["--out", str(out), "--steps", "20", "--resume", "--domains", "code,docs,changelog"])
    with pytest.raises(ValueError, match=r"checkpoint-10.*method 'pike'.*'odm'"):
        example.main(["--out", str(out), "--steps", "20", "--resume", "--method", "odm"])
    # the refused resumes changed nothing: no step past the checkpoint was trained or logged
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 11))
    assert not (out / "checkpoint-20").exists()
    # a folder without gradmix state (another trainer's, or one a crash left half-written) is named in the error,
    # and resume_from_checkpoint=True passes over it
    (out / "checkpoint-10" / "gradmix_state.pt").unlink()
    trainer = _small_trainer(example, out)
    with pytest.raises(ValueError, match=r"checkpoint-10.*holds no gradmix state"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-10"))
    with pytest.raises(ValueError, match=r"no complete checkpoint"):
        trainer.train(resume_from_checkpoint=True)


def _small_trainer(example, out: Path):
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from gradmix.integrations.hf import MixingTrainer

    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=None, eos_token_id=None)
    )
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=20,
        per_device_train_batch_size=16,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    return MixingTrainer(model=model, args=args, domains=example.load_domains(["code", "docs", "legal"]), method="pike")


def test_a_used_output_dir_needs_resume_or_overwrite_and_a_live_owner_is_refused(tmp_path):
    """The Trainer used to drop the old rows of a reused output_dir and write checkpoints beside the old run's."""
    from gradmix.runlock import RunDirError

    example = _example_module()
    out = tmp_path / "run"
    example.main(["--out", str(out), "--steps", "20"])
    before = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(
        RunDirError,
        match=r"holds a started or finished run \(metrics.jsonl, checkpoint-10, "
        r"checkpoint-20\): pass train\(resume_from_checkpoint=...\) to continue it "
        r"or MixingTrainer\(overwrite=True\) to replace it",
    ):
        example.main(["--out", str(out), "--steps", "10"])
    assert (out / "metrics.jsonl").read_bytes() == before
    example.main(["--out", str(out), "--steps", "10", "--overwrite"])
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 11))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-10"]  # the old run's 20 is gone

    code = (
        "import sys, time; from gradmix.runlock import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
        "print('locked', flush=True); time.sleep(600)"
    )
    owner = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=rf"is in use by pid {owner.pid} on host"):
            example.main(["--out", str(out), "--steps", "20", "--resume"])
    finally:
        owner.kill()
        owner.communicate(timeout=60)
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 11))
