"""The HF Trainer with sharding: FSDP2 through accelerate's plugin, FSDP1 and DeepSpeed.

accelerate builds FSDP only for accelerator devices: on CPU it drops the plugin and wraps the model in DDP without a
word, so examples/hf_trainer_fsdp.py is a GPU script, and what CPU can check is checked here:

* on CPU, ``TrainingArguments(fsdp=...)`` under torchrun is gradmix's one-line error on every rank (not an unsharded
  run that looks sharded);
* the MixingTrainer's own ``training_step`` on a model sharded with ``fully_shard`` (what accelerate's FSDP2 plugin
  does when ``train()`` starts on GPUs; done by hand here, 2 gloo ranks) rebuilds its probe as a
  ``ShardedGradientProbe`` and logs the statistics of a one-process probe over the same global batch (1e-5 relative),
  identical on both ranks;
* gradient methods under FSDP1 or DeepSpeed are refused in one line naming what to use (``sharding_refusal``).

When launched by torchrun (``python -m torch.distributed.run ... tests/test_integration_hf_fsdp.py OUT``) this file is
that 2-rank worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "hf_trainer_fsdp.py"
ENV = {
    **os.environ,
    "MASTER_ADDR": "127.0.0.1",
    "GLOO_SOCKET_IFNAME": "lo",
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
}
ENV.pop("MASTER_PORT", None)
TIMEOUT = 300
BATCH = 12  # global examples of the measured step


def torchrun(script: Path, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(script)]


def _example_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gradmix_hf_trainer_fsdp_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    if str(EXAMPLE.parent) not in sys.path:
        sys.path.insert(0, str(EXAMPLE.parent))  # the example imports its siblings, as when run
    spec.loader.exec_module(module)
    return module


# -- tests ----------------------------------------------------------------------------------------------------------

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("datasets")
pytestmark = pytest.mark.integration


def refusal_lines(res: subprocess.CompletedProcess) -> list[str]:
    """The ranks' one-line "cannot start" errors of a failed 2-rank run. Every rank raises it, but torchrun stops the
    other ranks as soon as one exits, so under load only the first may get to print: at least one line, each from
    rank 0 or 1 and whole (``exit_rank(message=...)`` writes it at once; two ranks' lines once ran together)."""
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if "cannot start:" in line]
    assert lines and {line.split(":")[0] for line in lines} <= {"rank 0", "rank 1"}, res.stderr[-3000:]
    assert all(line.count("cannot start:") == 1 for line in lines), lines
    return lines


def test_fsdp_on_cpu_is_a_one_line_error(tmp_path) -> None:
    """accelerate would train this unsharded (DDP) on CPU; gradmix says so and stops before touching --out."""
    out = tmp_path / "run"
    cmd = [*torchrun(EXAMPLE), "--out", str(out), "--steps", "20"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=ENV, cwd=ROOT)
    for line in refusal_lines(res):
        assert "TrainingArguments(fsdp=...) but accelerate did not enable FSDP" in line
        assert "run on GPUs (examples/hf_trainer_fsdp.py) or drop fsdp=... to train with DDP" in line
    assert not (out / "metrics.jsonl").exists() and not list(out.glob("checkpoint-*"))


def test_training_step_under_fsdp2_measures_what_one_process_measures(tmp_path) -> None:
    """Two gloo ranks run MixingTrainer.training_step on a fully_shard-ed GPT-2 (the worker below); their statistics
    equal the plain GradientProbe's in this one process (float64, the same initial model) over the same global batch
    - the ranks' shares interleaved as the sampler deals them - within 1e-5 relative."""
    import torch

    from gradmix.integrations.hf import causal_lm_loss
    from gradmix.probe import GradientProbe

    res = subprocess.run(
        [*torchrun(Path(__file__)), str(tmp_path)], capture_output=True, text=True, timeout=TIMEOUT, env=ENV, cwd=ROOT
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["probe"] == "ShardedGradientProbe" and r["sharded"]
    assert ranks[0]["stats"] == ranks[1]["stats"]  # bit for bit: all-reduced scalars
    pairs = [ranks[r]["batch"][i] for i in range(len(ranks[0]["batch"])) for r in range(2)]
    assert len(pairs) == BATCH and len({tuple(p) for p in pairs}) == BATCH  # disjoint shares of one global batch
    example = _example_module()
    domains = example.load_domains(["code", "docs", "legal"])
    batch = domains.gather(np.array([d for d, _ in pairs]), np.array([e for _, e in pairs]))
    torch.manual_seed(0)  # the worker's initial model
    model = example.tiny_gpt2(0.0).double()
    reference = GradientProbe(model, num_splits=2).backward(
        batch, batch["domain"], 3, causal_lm_loss, measure=True, global_batch_size=BATCH, final=True
    )
    assert reference is not None
    for key in ("grad_sq_norm", "grad_var"):
        fsdp, ref = np.asarray(ranks[0]["stats"][key]), np.asarray(getattr(reference, key))
        assert np.all(np.isfinite(fsdp)), (key, fsdp)
        rel = float(np.abs(fsdp - ref).max() / np.abs(ref).max())
        assert rel < 1e-5, (key, rel, fsdp, ref)
    assert ranks[0]["loss"] == pytest.approx(float(reference.mean_loss), rel=1e-5)


@pytest.mark.parametrize(
    "deepspeed,fsdp_version,method,needs_gradients,wanted",
    [
        (True, None, "pike", True, r"method 'pike' needs gradient statistics, which DeepSpeed hides .* use FSDP2"),
        (False, 1, "dga", True, r"method 'dga' needs gradient statistics, which FSDP1 \(flat parameters\) hides"),
        (False, 2, "pike", True, None),
        (True, None, "odm", False, None),
        (False, 1, "odm", False, None),
    ],
)
def test_gradient_methods_under_fsdp1_or_deepspeed_are_one_line_errors(
    deepspeed, fsdp_version, method, needs_gradients, wanted
) -> None:
    """What MixingTrainer raises (as a ValueError, before training) for the Trainer's sharding; CPU cannot run FSDP1
    or DeepSpeed inside the Trainer, so the decision is tested directly."""
    import re

    from gradmix.integrations.hf import sharding_refusal

    found = sharding_refusal(method, needs_gradients, deepspeed=deepspeed, fsdp_version=fsdp_version)
    if wanted is None:
        assert found is None
    else:
        assert found is not None and re.search(wanted, found) and "\n" not in found, found
        assert "fsdp_config={'version': 2}" in found


# -- DeepSpeed (runs on CPU with gloo where deepspeed is installed) --------------------------------------------------


def _run_example(out: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [*torchrun(EXAMPLE), "--out", str(out), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=ENV, cwd=ROOT)
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _deepspeed_args(stage: str) -> list[str]:
    return ["--deepspeed", stage, "--method", "odm", "--update-every", "2", "--steps", "14"]


@pytest.fixture(scope="module", params=["2", "3"])
def deepspeed_uninterrupted(request, tmp_path_factory) -> tuple[str, list[dict]]:
    """An uninterrupted ODM run under DeepSpeed ZeRO-``stage`` (once per stage)."""
    pytest.importorskip("deepspeed")
    from conftest import read_metrics

    out = tmp_path_factory.mktemp(f"zero{request.param}") / "full"
    _run_example(out, *_deepspeed_args(request.param))
    return request.param, read_metrics(out)


def test_deepspeed_loss_only_method_resumes_exactly(tmp_path, deepspeed_uninterrupted) -> None:
    """ODM (loss-only) under DeepSpeed ZeRO-2/3: a run stopped right after its step-10 checkpoint (DeepSpeed's
    global_step10/ beside gradmix_state.pt) and resumed logs exactly the weights and losses of an uninterrupted run."""
    from conftest import read_metrics

    stage, full = deepspeed_uninterrupted
    out = tmp_path / "run"
    _run_example(out, *_deepspeed_args(stage), "--stop-at", "10")
    assert (out / "checkpoint-10" / "gradmix_state.pt").is_file()
    assert (out / "checkpoint-10" / "global_step10").is_dir()
    resumed = _run_example(out, *_deepspeed_args(stage), "--resume")
    assert "resume from" in resumed.stdout and "checkpoint-10" in resumed.stdout
    run = read_metrics(out)
    assert [r["step"] for r in run] == [r["step"] for r in full] == list(range(1, 15))
    assert len({json.dumps(r["weights"]) for r in full}) >= 3  # ODM moved the mix (from step 9 on)
    for a, b in zip(full, run):
        assert a["weights"] == b["weights"] and a["train_loss"] == b["train_loss"], a["step"]


def test_deepspeed_with_a_gradient_method_is_a_one_line_refusal(tmp_path) -> None:
    pytest.importorskip("deepspeed")
    res = _run_example(tmp_path / "run", "--deepspeed", "2", "--method", "pike", "--steps", "5", check=False)
    for line in refusal_lines(res):
        assert "method 'pike' needs gradient statistics, which DeepSpeed hides" in line


# -- the 2-rank worker (launched by the test above through torchrun) -------------------------------------------------


def _worker(out: Path) -> None:
    """MixingTrainer (use_cpu, 2 ranks: accelerate's DDP setting, no fsdp) on a GPT-2 sharded here with fully_shard
    per block and at the root, as accelerate's FSDP2 plugin shards it on GPUs; one measured training_step (PiKE,
    update_every=1) on the Trainer's own dataloader. Each rank writes OUT/rank{R}.json."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import TrainingArguments

    from gradmix.integrations.hf import MixingTrainer

    example = _example_module()
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    args = TrainingArguments(
        output_dir=str(out / "run"),
        max_steps=1,
        per_device_train_batch_size=BATCH // world,
        use_cpu=True,
        report_to="none",
        seed=0,
        disable_tqdm=True,
        log_level="error",
    )
    torch.manual_seed(0)
    model = example.tiny_gpt2(0.0)
    trainer = MixingTrainer(
        model=model,
        args=args,
        domains=example.load_domains(["code", "docs", "legal"]),
        method="pike",
        method_params={"min_weight": 0.05},
        mixer_options={"update_every": 1, "probe_params": {"num_splits": 2}},
    )
    mesh = init_device_mesh("cpu", (world,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.training_step(model, batch)
    measured = trainer.last_measurement
    assert measured is not None and measured.grad_sq_norm is not None and measured.grad_var is not None
    record = {
        "probe": type(trainer.mixer.probe).__name__,
        "sharded": all(type(p).__name__ == "DTensor" for p in model.parameters()),
        "stats": {"grad_sq_norm": measured.grad_sq_norm.tolist(), "grad_var": measured.grad_var.tolist()},
        "loss": float(loss),
        "batch": list(zip(batch["domain"].tolist(), batch["index"].tolist())),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    trainer.mixer.close()
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # skip gloo's teardown at interpreter exit


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
