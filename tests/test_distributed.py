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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(out), "pike", strategy]
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
