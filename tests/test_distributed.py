"""Two real gloo processes under torchrun: disjoint examples per global batch, identical weights everywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "workers" / "ddp_worker.py"


@pytest.mark.integration
@pytest.mark.parametrize("strategy", ["ddp", "sync_gradients"])
def test_two_gloo_ranks_get_disjoint_batches_and_identical_weights(tmp_path: Path, strategy: str) -> None:
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(WORKER),
        str(out),
        "pike",
        strategy,
    ]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}  # keep gloo on loopback: no other address is reachable here
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r0 = [json.loads(x) for x in Path(f"{out}.rank0.jsonl").read_text().splitlines()]
    r1 = [json.loads(x) for x in Path(f"{out}.rank1.jsonl").read_text().splitlines()]
    assert len(r0) == len(r1) == 12
    for a, b in zip(r0, r1):
        pa, pb = {tuple(p) for p in a["pairs"]}, {tuple(p) for p in b["pairs"]}
        assert len(pa) == len(a["pairs"]) == 4 and len(pb) == 4
        assert not pa & pb, f"step {a['step']}: ranks share examples {pa & pb}"
        assert a["weights"] == b["weights"]
        assert a["counts"] == b["counts"] and sum(a["counts"]) == 8
        assert a["param_checksum"] == pytest.approx(b["param_checksum"], rel=1e-6)
    assert len({tuple(r["weights"]) for r in r0}) > 2  # PiKE really moved the weights


AGREEMENT_WORKER = Path(__file__).parent / "workers" / "agreement_worker.py"


def _torchrun(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.integration
def test_ranks_that_disagree_fail_on_every_rank_naming_the_field_and_ranks(tmp_path: Path) -> None:
    """Issue 22 item 3: each case builds a Mixer on both ranks with rank 1 changed in one setting; every rank gets
    the same one-line error naming the field; rank 0's refused run folder stops rank 1 too."""
    out = tmp_path / "agree"
    used = Path(f"{out}.used_folder")
    used.mkdir()
    (used / "metrics.jsonl").write_text('{"step": 1}\n')
    res = _torchrun(str(AGREEMENT_WORKER), "agree", str(out))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r0 = json.loads(Path(f"{out}.rank0.json").read_text())
    r1 = json.loads(Path(f"{out}.rank1.json").read_text())
    assert r0["agree"] == r1["agree"] == r0["agree_again"] == r1["agree_again"] == "ok"
    fields = [
        "batch_size",
        "domain_names",
        "domain_sizes",
        "method",
        "initial_weights",
        "seed",
        "accumulation_steps",
        "method_params",
    ]
    for field in fields:
        assert r0[field] == r1[field], field  # the same error on every rank
        message = r0[field]
        assert message.startswith("RankMismatchError: Mixer: the 2 ranks disagree on "), message
        named = message.split("disagree on ", 1)[1].split(":", 1)[0].split(", ")
        assert field in named, (field, message)
        assert "on rank 0" in message and "on rank 1" in message, message
        assert "\n" not in message
    assert "batch_size is 8 on rank 0, 16 on rank 1" in r0["batch_size"]
    assert "first difference at index 2: 'd2' vs 'x'" in r0["domain_names"]
    assert (
        r0["used_folder"].startswith("RunDirError: run folder")
        and "holds a started or finished run" in r0["used_folder"]
    )
    assert r1["used_folder"].startswith("RunDirError: rank 0 stopped: run folder"), r1["used_folder"]


@pytest.mark.integration
def test_a_hung_rank_fails_its_peer_within_gradmix_timeout(tmp_path: Path) -> None:
    """Issue 22 item 10: with gradmix's process-group timeout (here GRADMIX_DIST_TIMEOUT=4 s) a collective whose
    peer hangs raises instead of waiting torch's 30 minutes."""
    from gradmix.distributed import DEFAULT_TIMEOUT_S, default_timeout

    assert DEFAULT_TIMEOUT_S < 1800 and default_timeout().total_seconds() == DEFAULT_TIMEOUT_S
    out = tmp_path / "hang"
    res = _torchrun(str(AGREEMENT_WORKER), "timeout", str(out), env={"GRADMIX_DIST_TIMEOUT": "4"}, timeout=240)
    result = json.loads(Path(f"{out}.rank0.json").read_text())  # rank 0 wrote it before torchrun ended rank 1
    assert result["error"] is not None, (result, res.stderr[-2000:])
    assert result["elapsed"] < 60, result


def test_exit_rank_writes_its_message_as_one_whole_line_before_leaving() -> None:
    """The message goes to stderr with its newline in one write (two ranks failing together once printed their lines
    run together), then the process ends with the given code without the interpreter's finalisation."""
    script = (
        "import sys\n"
        "from gradmix.distributed import exit_rank\n"
        "sys.stderr.write = lambda text, write=sys.stderr.write: write(f'<{text}>')\n"
        "exit_rank(3, wait_for_peers=False, message='rank 0: cannot start: bad input')\n"
        "print('not reached')\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 3
    assert res.stderr == "<rank 0: cannot start: bad input\n>"
    assert "not reached" not in res.stdout
