"""Two real gloo processes under torchrun: disjoint examples per global batch, identical weights everywhere."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "workers" / "ddp_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
@pytest.mark.parametrize("strategy", ["ddp", "sync_gradients"])
def test_two_gloo_ranks_get_disjoint_batches_and_identical_weights(tmp_path: Path, strategy: str) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(WORKER), str(out), "pike", strategy]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
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
