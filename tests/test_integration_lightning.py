"""Lightning (Trainer(accelerator="cpu", devices=2, strategy="ddp"), gloo): examples/lightning_ddp.py end to end.

Each run is the example script in a subprocess; Lightning's "ddp" strategy starts the second rank by running the
script again (no spawn), which is why the tests drive a script rather than a Trainer inside pytest.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lightning")
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "lightning_ddp.py"
sys.path.insert(0, str(Path(__file__).parent / "workers"))
from process_tree import run_until_step_then_kill  # noqa: E402

ENV = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
ENV.pop("MASTER_PORT", None)
STEPS = 20


def command(*args: str) -> list[str]:
    # gradmix_v1: its weights move within these few steps, so equal weights after a resume prove something (the
    # default keeps this tiny run's mix uniform: its statistics differ by less than their noise)
    return [sys.executable, str(EXAMPLE), *args, "--pike-variant", "gradmix_v1"]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(command(*args), capture_output=True, text=True, timeout=300, env=ENV)
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("*.ckpt"))


def assert_same_weights(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, len(a) + 1))
    for x, y in zip(a, b):
        assert x["weights"] == y["weights"], x["step"]
        assert x["requested_weights"] == y["requested_weights"], x["step"]
        assert x["train_loss"] == y["train_loss"], x["step"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("lightning") / "full"
    run("--out", str(out), "--steps", str(STEPS), "--trace")
    return out, rows(out)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lightning") / "stopped"
    run("--out", str(out), "--steps", str(STEPS), "--stop-at", "10")
    return out


def test_uninterrupted_run_ranks_logs_and_checkpoints(uninterrupted) -> None:
    out, records = uninterrupted
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert len({tuple(r["requested_weights"].values()) for r in records}) >= 3  # PiKE moved the mix
    assert checkpoints(out) == ["step-000010.ckpt", "step-000020.ckpt"]
    r0 = [json.loads(x) for x in (out / "trace.rank0.jsonl").read_text().splitlines()]
    r1 = [json.loads(x) for x in (out / "trace.rank1.jsonl").read_text().splitlines()]
    assert len(r0) == len(r1) == STEPS
    for a, b in zip(r0, r1):
        assert a["weights"] == b["weights"]  # every rank steps the same mix
        assert a["params"] == pytest.approx(b["params"], rel=1e-9)  # DDP-equivalent gradient averaging
    # the Mixer's weights and KPIs reached Lightning's logger
    with open(out / "logs" / "version_0" / "metrics.csv") as fh:
        logged = list(csv.DictReader(fh))
    for name in ("code", "docs", "legal"):
        assert f"gradmix/requested_weights/{name}" in logged[0] and f"gradmix/train_loss/{name}" in logged[0]
        assert f"gradmix/weights/{name}" in logged[0] and f"gradmix/weight/{name}" not in logged[0]
    last = [row for row in logged if row.get("gradmix/requested_weights/code")][-1]
    wanted = records[-1]["requested_weights"]["code"]
    assert float(last["gradmix/requested_weights/code"]) == pytest.approx(wanted, rel=1e-6)
    assert float(last["gradmix/effective_domains"]) == pytest.approx(records[-1]["effective_domains"], rel=1e-6)


def test_stop_at_and_resume_equals_uninterrupted(uninterrupted, stopped, tmp_path) -> None:
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    assert [r["step"] for r in rows(out)] == list(range(1, 11))
    assert checkpoints(out) == ["step-000010.ckpt"]
    run("--out", str(out), "--steps", str(STEPS), "--resume")
    assert_same_weights(rows(out), uninterrupted[1])


def test_sigkill_and_resume_equals_uninterrupted(uninterrupted, tmp_path) -> None:
    out = tmp_path / "killed"
    last = run_until_step_then_kill(command("--out", str(out), "--steps", "1000"), out / "metrics.jsonl", 11, ENV)
    assert 11 <= last < 20
    assert checkpoints(out) == ["step-000010.ckpt"]
    run("--out", str(out), "--steps", str(STEPS), "--resume")
    assert_same_weights(rows(out), uninterrupted[1])


def test_resume_with_other_domains_is_a_clear_error(stopped, tmp_path) -> None:
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    res = run("--out", str(out), "--steps", str(STEPS), "--resume", "--domains", "code,docs,changelog", check=False)
    assert res.returncode != 0
    assert "other domains" in res.stderr, res.stderr[-3000:]
    assert [r["step"] for r in rows(out)] == list(range(1, 11))


def test_resume_on_one_device_reshards(uninterrupted, stopped, tmp_path) -> None:
    """Documented re-sharding: a 2-rank checkpoint resumed on 1 device draws the same global batches; weights are
    equal until the next update (whose DDP statistics pool per-rank parts, so they follow the world size)."""
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    res = run("--out", str(out), "--steps", str(STEPS), "--resume", "--devices", "1")
    assert "checkpointed with 2 ranks on 1" in res.stderr
    resumed, full = rows(out), uninterrupted[1]
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for x, y in zip(resumed[:14], full[:14]):
        assert x["requested_weights"] == y["requested_weights"]
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
    for r in resumed[14:]:
        w = np.array(list(r["requested_weights"].values()))
        assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-9


def test_callback_refuses_a_used_run_dir_unless_resumed_or_overwritten(tmp_path) -> None:
    """Issue 22 items 1 and 2, in process on one device: a second fit on a used run_dir used to append to the old
    metrics.jsonl (steps 1, 2, 3, 1, 2, 3); now it is refused unless it resumes or overwrites, and a folder another
    process owns is refused at setup."""
    import lightning.pytorch as L
    import torch

    sys.path.insert(0, str(ROOT / "examples"))
    from _tiny_gpt import TinyGPT, byte_domains, per_example_loss

    from gradmix.integrations.lightning import MixingCallback, MixingModuleMixin
    from gradmix.runlock import LOCK_NAME, RunDirError

    class Lit(MixingModuleMixin, L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyGPT()

        def training_step(self, batch, batch_idx):
            losses = per_example_loss(self.net, batch)
            self.mixing_observe(batch, losses.detach())
            return losses.mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    def fit(**options) -> None:
        callback = MixingCallback(byte_domains(), "uniform", 4, run_dir=run_dir, log_every=1, **options)
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=3,
            callbacks=[callback],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            num_sanity_val_steps=0,
        )
        trainer.fit(Lit())

    run_dir = tmp_path / "run"
    fit()
    assert [r["step"] for r in rows(run_dir)] == [1, 2, 3]
    assert not (run_dir / LOCK_NAME).exists()  # released at teardown
    with pytest.raises(
        RunDirError,
        match=r"holds a started or finished run \(metrics.jsonl\): pass "
        r"trainer.fit\(ckpt_path=...\) to continue it or "
        r"MixingCallback\(overwrite=True\) to replace it",
    ):
        fit()
    assert [r["step"] for r in rows(run_dir)] == [1, 2, 3]
    fit(overwrite=True)
    assert [r["step"] for r in rows(run_dir)] == [1, 2, 3]

    code = (
        "import sys, time; from gradmix.runlock import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
        "print('locked', flush=True); time.sleep(600)"
    )
    owner = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=rf"is in use by pid {owner.pid} on host"):
            fit(overwrite=True)
    finally:
        owner.kill()
        owner.communicate(timeout=60)
    assert [r["step"] for r in rows(run_dir)] == [1, 2, 3]
