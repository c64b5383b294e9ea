"""Lightning with FSDP2 (ModelParallelStrategy + fully_shard, gloo on CPU): examples/lightning_fsdp.py end to end.

Every run is a real ``torchrun --standalone --nproc_per_node 2`` subprocess on loopback. The callback builds its Mixer
once configure_model has sharded the module, so gradient methods measure through the ShardedGradientProbe; the
Mixer's state travels in Lightning's sharded checkpoints (meta.pt beside the DCP shards). The strategies the callback
cannot drive (FSDP1's FSDPStrategy with a gradient method, DeepSpeed, tensor parallelism) are one-line errors, tested
in process (Lightning runs FSDPStrategy and DeepSpeed on CUDA only).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import kill_after_checkpoint, read_metrics

pytest.importorskip("lightning")
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "lightning_fsdp.py"
ENV = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
ENV.pop("MASTER_PORT", None)
STEPS = 20
TIMEOUT = 300


def command(*args: str, nproc: int = 2) -> list[str]:
    # gradmix_v1: its weights move within these few steps, so equal weights after a resume prove something
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        str(EXAMPLE),
        *args,
        "--pike-variant",
        "gradmix_v1",
    ]


def run(*args: str, nproc: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(command(*args, nproc=nproc), capture_output=True, text=True, timeout=TIMEOUT, env=ENV)
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def traces(out: Path, ranks: int = 2) -> list[list[dict]]:
    return [[json.loads(x) for x in (out / f"trace.rank{r}.jsonl").read_text().splitlines()] for r in range(ranks)]


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("*.ckpt") if (p / "COMPLETE").is_file())


def assert_same_weights(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, len(a) + 1))
    for x, y in zip(a, b):
        assert x["weights"] == y["weights"], x["step"]  # exactly, not approximately
        assert x["requested_weights"] == y["requested_weights"], x["step"]
        assert x["train_loss"] == y["train_loss"], x["step"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("litfsdp") / "full"
    run("--out", str(out), "--steps", str(STEPS), "--trace")
    return out, read_metrics(out)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """A run stopped (as if killed) right after its step-10 checkpoint."""
    out = tmp_path_factory.mktemp("litfsdp") / "stopped"
    run("--out", str(out), "--steps", str(STEPS), "--stop-at", "10")
    return out


def test_uninterrupted_run_sharded_and_every_rank_same_weights(uninterrupted) -> None:
    out, records = uninterrupted
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert len({tuple(r["requested_weights"].values()) for r in records}) >= 3  # PiKE moved the mix (steps 5, 10..)
    assert checkpoints(out) == ["step-000010.ckpt", "step-000020.ckpt"]
    folder = out / "checkpoints" / "step-000010.ckpt"
    assert (folder / "meta.pt").is_file() and len(list(folder.glob("*.distcp"))) == 2  # Lightning's sharded format
    r0, r1 = traces(out)
    assert len(r0) == len(r1) == STEPS
    for a, b in zip(r0, r1):
        assert a["sharded"] and a["probe"] == "ShardedGradientProbe"  # FSDP2 DTensors, measured from shards
        assert a["weights"] == b["weights"]  # bit for bit: the statistics are all-reduced scalars
        assert a["stats"] == b["stats"]
        assert not {tuple(p) for p in a["batch"]} & {tuple(p) for p in b["batch"]}  # disjoint shares
    assert sum(a["stats"] is not None for a in r0) == STEPS // 5  # measured on the update steps only


def test_stop_at_and_resume_equals_uninterrupted(uninterrupted, stopped, tmp_path) -> None:
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 11))
    assert checkpoints(out) == ["step-000010.ckpt"]
    res = run("--out", str(out), "--steps", str(STEPS), "--resume")
    assert "resumed from step-000010.ckpt; 20 steps on 2 ranks" in res.stdout
    assert_same_weights(read_metrics(out), uninterrupted[1])


def test_sigkill_after_checkpoint_and_resume_equals_uninterrupted(uninterrupted, tmp_path) -> None:
    out = tmp_path / "killed"
    kill_after_checkpoint(
        command("--out", str(out), "--steps", "1000"),
        out / "checkpoints" / "step-000010.ckpt" / "COMPLETE",
        env=ENV,
        cwd=ROOT,
        past=0.3,
        timeout=TIMEOUT,
        tree=True,  # torchrun and both ranks
    )
    written = [r["step"] for r in read_metrics(out)]
    assert 10 <= len(written) < 1000, written  # killed mid-run, after checkpoint 10
    run("--out", str(out), "--steps", str(STEPS), "--resume")
    assert_same_weights(read_metrics(out), uninterrupted[1])  # the killed run's rows after step 10 were dropped


def test_dga_toward_a_target_every_rank_same_weights(tmp_path) -> None:
    """--method dga: DGA toward the changelog domain, alignments from the local gradient shards, reduced as scalars."""
    out = tmp_path / "dga"
    run("--out", str(out), "--steps", "10", "--method", "dga", "--trace")
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, 11))
    assert len({tuple(r["requested_weights"].values()) for r in records}) >= 2  # DGA moved the mix at step 5
    r0, r1 = traces(out)
    for a, b in zip(r0, r1):
        assert a["weights"] == b["weights"] and a["stats"] == b["stats"]
    measured = [a["stats"] for a in r0 if a["stats"] is not None]
    assert len(measured) == 2
    for stats in measured:
        assert np.all(np.isfinite(stats["target_alignment"]))


def test_statistics_equal_a_one_process_probe_on_the_same_batch(tmp_path) -> None:
    """Step 1, measured (--update-every 1): the statistics each rank logged under FSDP2 equal the plain GradientProbe
    in this one process (float64, full parameters, the same initial model) over the same global batch - the ranks'
    shares interleaved as the sampler deals them (rank r takes global[r::2]) - within 1e-5 relative."""
    import torch

    sys.path.insert(0, str(ROOT / "examples"))
    from _tiny_gpt import TinyGPT, byte_domains, per_example_loss

    from gradmix.probe import GradientProbe

    out = tmp_path / "stats"
    run("--out", str(out), "--steps", "1", "--update-every", "1", "--trace")
    first = [trace[0] for trace in traces(out)]
    assert first[0]["stats"] is not None and first[0]["stats"] == first[1]["stats"]
    shares = [t["batch"] for t in first]
    pairs = [shares[r][i] for i in range(len(shares[0])) for r in range(2)]
    domains = byte_domains()
    batch = domains.gather(np.array([d for d, _ in pairs]), np.array([e for _, e in pairs]))
    torch.manual_seed(0)  # the example's initial model
    model = TinyGPT().double()
    reference = GradientProbe(model, num_splits=2).backward(
        batch, batch["domain"], 3, per_example_loss, measure=True, global_batch_size=len(pairs), final=True
    )
    for key in ("grad_sq_norm", "grad_var"):
        fsdp, ref = np.asarray(first[0]["stats"][key]), np.asarray(getattr(reference, key))
        assert np.all(np.isfinite(fsdp)), (key, fsdp)
        rel = float(np.abs(fsdp - ref).max() / np.abs(ref).max())
        assert rel < 1e-5, (key, rel, fsdp, ref)


# -- strategies the callback refuses (in process: no launch) --------------------------------------------------------


def _callback_and_module(method: str):
    import lightning.pytorch as L
    import torch

    sys.path.insert(0, str(ROOT / "examples"))
    from _tiny_gpt import TinyGPT, byte_domains

    from gradmix.integrations.lightning import MixingCallback, MixingModuleMixin

    class Lit(MixingModuleMixin, L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.net = TinyGPT()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    params = {"min_weight": 0.05} if method == "pike" else {}
    return MixingCallback(byte_domains(), method, 4, method_params=params), Lit()


def test_fsdp1_strategy_with_a_gradient_method_is_a_one_line_error() -> None:
    """Lightning's FSDPStrategy is FSDP1 (flat parameters; CUDA only, so a stand-in Trainer here): a gradient method
    is refused naming the strategy and what to use; a loss-only method is accepted."""
    from lightning.pytorch.strategies import FSDPStrategy

    trainer = SimpleNamespace(strategy=FSDPStrategy(), global_rank=0, world_size=1, accumulate_grad_batches=1)
    callback, module = _callback_and_module("pike")
    callback.setup(trainer, module, "fit")
    with pytest.raises(ValueError, match=r"method 'pike' needs gradient statistics, which FSDPStrategy") as info:
        callback.on_fit_start(trainer, module)
    assert "\n" not in str(info.value) and "ModelParallelStrategy with fully_shard" in str(info.value)
    callback.teardown(trainer, module, "fit")
    callback, module = _callback_and_module("odm")
    callback.setup(trainer, module, "fit")
    callback.on_fit_start(trainer, module)
    assert callback.mixer is not None and not callback.mixer.needs_gradients


def test_deepspeed_and_tensor_parallel_strategies_are_one_line_errors() -> None:
    from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy

    callback, module = _callback_and_module("pike")
    deepspeed = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # its __init__ needs deepspeed installed
    trainer = SimpleNamespace(strategy=deepspeed, global_rank=0, world_size=1)
    with pytest.raises(NotImplementedError, match=r"does not support DeepSpeedStrategy: DeepSpeed's engine") as info:
        callback.setup(trainer, module, "fit")
    assert "\n" not in str(info.value) and "examples/lightning_fsdp.py" in str(info.value)

    class TwoByTwo:  # the device mesh of ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=2)
        mesh_dim_names = ("data_parallel", "tensor_parallel")

        def __getitem__(self, name: str) -> SimpleNamespace:
            return SimpleNamespace(size=lambda: 2)

    class TensorParallel(ModelParallelStrategy):
        @property
        def device_mesh(self):
            return TwoByTwo()

        @property
        def world_size(self) -> int:
            return 4

    trainer = SimpleNamespace(strategy=TensorParallel(), global_rank=0, world_size=4)
    with pytest.raises(NotImplementedError, match=r"tensor_parallel_size=2 is not supported") as info:
        callback.setup(trainer, module, "fit")
    assert "data_parallel_size=4, tensor_parallel_size=1" in str(info.value) and "\n" not in str(info.value)
