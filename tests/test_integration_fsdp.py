"""torchrun + FSDP2 (fully_shard, gloo on CPU): examples/torchrun_fsdp.py end to end and the sharded probe's numbers.

Every run is a real `torchrun --standalone --nproc_per_node N` subprocess on loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "torchrun_fsdp.py"
STATS_WORKER = Path(__file__).parent / "workers" / "fsdp_stats_worker.py"
sys.path.insert(0, str(Path(__file__).parent / "workers"))
from process_tree import run_until_step_then_kill  # noqa: E402

ENV = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
STEPS = 20


def torchrun(script: Path, *args: str, nproc: int = 2) -> list[str]:
    # the example with gradmix_v1: its weights move within these few steps, so equal weights after a resume prove
    # something (the default keeps this tiny run's mix uniform: its statistics differ by less than their noise)
    extra = ["--pike-variant", "gradmix_v1"] if script == EXAMPLE else []
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        str(script),
        *args,
        *extra,
    ]


def run(*args: str, nproc: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(torchrun(EXAMPLE, *args, nproc=nproc), capture_output=True, text=True, timeout=300, env=ENV)
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, len(a) + 1))
    for x, y in zip(a, b):
        assert x["weights"] == y["weights"], x["step"]
        assert x["requested_weights"] == y["requested_weights"], x["step"]
        assert x["train_loss"] == y["train_loss"], x["step"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("fsdp") / "full"
    run("--out", str(out), "--steps", str(STEPS), "--trace")
    return out, rows(out)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """A run stopped (as if killed) right after its step-10 checkpoint."""
    out = tmp_path_factory.mktemp("fsdp") / "stopped"
    run("--out", str(out), "--steps", str(STEPS), "--stop-at", "10")
    return out


def fork(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_uninterrupted_run_every_rank_same_weights(uninterrupted) -> None:
    out, records = uninterrupted
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        w = np.array(list(r["requested_weights"].values()))
        assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-9
    assert len({tuple(r["requested_weights"].values()) for r in records}) >= 3  # PiKE moved the mix (steps 5, 10..)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000010", "step-000020"]
    r0 = [json.loads(x) for x in (out / "trace.rank0.jsonl").read_text().splitlines()]
    r1 = [json.loads(x) for x in (out / "trace.rank1.jsonl").read_text().splitlines()]
    assert len(r0) == len(r1) == STEPS
    for a, b in zip(r0, r1):
        assert a["weights"] == b["weights"]  # bit for bit: the statistics are all-reduced scalars
        assert a["stats"] == b["stats"]
        assert not {tuple(p) for p in a["batch"]} & {tuple(p) for p in b["batch"]}  # disjoint shares
    assert sum(a["stats"] is not None for a in r0) == STEPS // 5  # measured on the update steps only


def test_stop_at_and_resume_equals_uninterrupted(uninterrupted, stopped, tmp_path) -> None:
    out = fork(stopped, tmp_path / "run")
    assert [r["step"] for r in rows(out)] == list(range(1, 11))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000010"]
    res = run("--out", str(out), "--steps", str(STEPS), "--resume")
    assert "resumed from" in res.stdout and "at step 10" in res.stdout
    assert_same_weights(rows(out), uninterrupted[1])


def test_sigkill_and_resume_equals_uninterrupted(uninterrupted, tmp_path) -> None:
    out = tmp_path / "killed"
    last = run_until_step_then_kill(
        torchrun(EXAMPLE, "--out", str(out), "--steps", "1000"), out / "metrics.jsonl", 11, ENV
    )
    assert 11 <= last < 20
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000010"]
    assert (out / "checkpoints" / "step-000010" / "COMPLETE").is_file()
    run("--out", str(out), "--steps", str(STEPS), "--resume")
    assert_same_weights(rows(out), uninterrupted[1])  # the killed run's rows after step 10 were dropped


@pytest.fixture(scope="module")
def dga_uninterrupted(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("fsdp") / "dga"
    run("--out", str(out), "--steps", str(STEPS), "--method", "dga", "--trace")
    return out, rows(out)


def test_dga_run_every_rank_same_weights(dga_uninterrupted) -> None:
    """--method dga: DGA toward the changelog domain, alignments from the local gradient shards (Adam-preconditioned
    with the sharded optimizer state), reduced as scalars: the same weights on every rank, bit for bit."""
    out, records = dga_uninterrupted
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert len({tuple(r["requested_weights"].values()) for r in records}) >= 3  # DGA moved the mix (steps 5, 10..)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000010", "step-000020"]
    r0 = [json.loads(x) for x in (out / "trace.rank0.jsonl").read_text().splitlines()]
    r1 = [json.loads(x) for x in (out / "trace.rank1.jsonl").read_text().splitlines()]
    assert len(r0) == len(r1) == STEPS
    for a, b in zip(r0, r1):
        assert a["weights"] == b["weights"] and a["stats"] == b["stats"]
    measured = [a["stats"] for a in r0 if a["stats"] is not None]
    assert len(measured) == STEPS // 5
    for stats in measured:
        assert np.all(np.isfinite(stats["target_alignment"])) and np.isfinite(stats["target_loss"])


def test_dga_sigkill_and_resume_equals_uninterrupted(dga_uninterrupted, tmp_path) -> None:
    out = tmp_path / "killed"
    last = run_until_step_then_kill(
        torchrun(EXAMPLE, "--out", str(out), "--steps", "1000", "--method", "dga"), out / "metrics.jsonl", 11, ENV
    )
    assert 11 <= last < 20
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000010"]
    res = run("--out", str(out), "--steps", str(STEPS), "--method", "dga", "--resume")
    assert "resumed from" in res.stdout and "at step 10" in res.stdout
    assert_same_weights(rows(out), dga_uninterrupted[1])


def test_resume_with_other_domains_is_a_clear_error(stopped, tmp_path) -> None:
    out = fork(stopped, tmp_path / "run")
    res = run("--out", str(out), "--steps", str(STEPS), "--resume", "--domains", "code,docs,changelog", check=False)
    assert res.returncode != 0
    assert "cannot resume" in res.stderr and "other domains" in res.stderr and "gradmix.ckpt" in res.stderr
    assert [r["step"] for r in rows(out)] == list(range(1, 11))  # nothing changed


def test_resume_on_another_world_size_reshards(uninterrupted, stopped, tmp_path) -> None:
    """Documented re-sharding: DCP re-shards the model, the sampler keeps the global batches, and the sharded
    probe's global parts do not depend on the world size: one process continues with the same weights (bit for bit
    until the next update, then up to float rounding)."""
    out = fork(stopped, tmp_path / "run")
    res = run("--out", str(out), "--steps", str(STEPS), "--resume", nproc=1)
    assert "(1 ranks)" in res.stdout
    resumed, full = rows(out), uninterrupted[1]
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for x, y in zip(resumed[:14], full[:14]):
        assert x["requested_weights"] == y["requested_weights"]
    for x, y in zip(resumed[14:], full[14:]):
        np.testing.assert_allclose(
            list(x["requested_weights"].values()), list(y["requested_weights"].values()), rtol=0, atol=1e-6
        )


def check_statistics(base: Path, names: set[str], ranks: int) -> dict[str, float]:
    """The stats worker's FSDP statistics vs its one-process reference: within 1e-5 relative, identical on every
    rank (DGA's weights too). Returns the largest relative difference per statistic."""
    results = json.loads(Path(f"{base}.json").read_text())
    assert set(results) == names
    worst: dict[str, float] = {}
    for name, r in results.items():
        fsdp, ref = r["fsdp"], r["reference"]
        assert fsdp["examples"] == ref["examples"] == ([9.0, 4.0, 3.0] if name == "target_adam" else [9.0, 5.0, 2.0])
        keys = ["grad_sq_norm", "grad_var", "gram", "loss_sums"]
        if name.startswith("target"):
            keys += ["target_alignment", "target_loss", "dga_weights"]
        else:
            assert "target_alignment" not in fsdp and fsdp["dga_weights"] is None
        for key in keys:
            a, b = np.asarray(fsdp[key], dtype=float), np.asarray(ref[key], dtype=float)
            assert np.all(np.isfinite(a)), (name, key, a)
            rel = float(np.abs(a - b).max() / np.abs(b).max())
            assert rel < 1e-5, (name, key, rel)
            worst[key] = max(worst.get(key, 0.0), rel)
        assert r["grad_max_rel_diff"] < 1e-5  # the training gradient (the target's backward left no trace in it)
        if r["global_batch_is_one_process_batch"] is not None:
            assert r["global_batch_is_one_process_batch"]
        for rank in range(ranks):  # identical on every rank, DGA's weights included
            assert json.loads(Path(f"{base}.{name}.rank{rank}.json").read_text()) == fsdp
    return worst


def test_sharded_probe_statistics_equal_one_process(tmp_path) -> None:
    """ShardedGradientProbe on a fully_shard-ed model (2 ranks) vs the plain GradientProbe in one process (float64,
    full parameters) over the same global batch: two parts per domain, per-sample parts, two accumulated
    micro-batches, DGA's target alignment (plain; Adam-preconditioned over two micro-batches with a scaling
    backward_fn); the FSDP training gradient too."""
    base = tmp_path / "stats"
    res = subprocess.run(torchrun(STATS_WORKER, str(base)), capture_output=True, text=True, timeout=300, env=ENV)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    worst = check_statistics(base, {"single", "per_sample", "accumulated", "target", "target_adam"}, 2)
    print("max relative difference to one process:", worst)


def test_hsdp_statistics_equal_one_process(tmp_path) -> None:
    """HSDP: a 2 x 2 (replicate, shard) mesh on 4 ranks; the shard sums are reduced over all ranks and divided by
    the 2 replicas. Same comparison as above."""
    base = tmp_path / "hsdp"
    cmd = torchrun(STATS_WORKER, str(base), "2x2", "accumulated,target_adam", nproc=4)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    worst = check_statistics(base, {"accumulated", "target_adam"}, 4)
    print("max relative difference to one process (HSDP 2x2):", worst)


def test_unsupported_meshes_are_one_line_errors(tmp_path) -> None:
    """A 1-D mesh whose parameters are replicated, or a 2-D mesh that shards on both dimensions (tensor
    parallelism), is refused naming the mesh shape and what is supported; a 2-D fully_shard (HSDP) is accepted."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from gradmix.probe import ShardedGradientProbe

    def distributed(mesh, placements) -> nn.Module:
        model = nn.Linear(4, 2)
        for name, p in list(model.named_parameters()):
            chosen = placements if p.dim() == 2 else [Replicate()] * len(placements)
            setattr(model, name, nn.Parameter(distribute_tensor(p.detach(), mesh, chosen)))
        return model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(NotImplementedError, match=r"mesh of shape \(1,\) with placements \(Replicate\(\),\)"):
            ShardedGradientProbe(distributed(init_device_mesh("cpu", (1,)), [Replicate()]))
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("replicate", "shard"))
        with pytest.raises(NotImplementedError, match=r"shape \(1, 1\).*supported: FSDP on one 1-D mesh") as info:
            ShardedGradientProbe(distributed(mesh, [Shard(0), Shard(1)]))
        assert "\n" not in str(info.value) and "HSDP on one 2-D (replicate, shard) mesh" in str(info.value)
        model = nn.Linear(4, 2)
        fully_shard(model, mesh=mesh)
        probe = ShardedGradientProbe(model, preconditioner=torch.optim.AdamW(model.parameters()))
        assert type(probe.rebind(model)) is ShardedGradientProbe  # settings() rebuild it (no sync_gradients)
    finally:
        dist.destroy_process_group()
