"""Launched by torchrun (2 processes, gloo): a Mixer with PiKE under DistributedDataParallel.

Each rank writes OUT.rank{r}.jsonl: per step its (domain, index) pairs, the weights and the global domain counts.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from resume_worker import TinyLM, domains, per_example_loss

from gradmix import Mixer


def main() -> None:
    out = sys.argv[1]
    method = sys.argv[2] if len(sys.argv) > 2 else "pike"
    sync = len(sys.argv) > 3 and sys.argv[3] == "sync_gradients"
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    # a DDP-wrapped model, or a plain module whose gradients the probe averages itself
    model = TinyLM() if sync else torch.nn.parallel.DistributedDataParallel(TinyLM())
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    params = {"min_weight": 0.05, **({"variant": "gradmix_v1"} if method == "pike" else {})}  # v1's weights move here
    mixer = Mixer(
        domains(),
        method,
        8,
        method_params=params,
        model=model,
        update_every=2,
        seed=3,
        log_every=1000,
        probe_params={"sync_gradients": sync},
    )
    assert mixer.world_size == 2 and mixer.rank == rank
    with open(f"{out}.rank{rank}.jsonl", "w") as fh:
        for batch in mixer.batches(12):
            measured = mixer.backward(model, batch, per_example_loss)  # the step's global measurement
            opt.step()
            opt.zero_grad()
            counts = measured.examples.tolist()
            mixer.step()
            pairs = list(zip(batch["domain"].tolist(), batch["index"].tolist()))
            snapshot = [p.detach().clone() for p in model.parameters()]
            checksum = float(sum(p.double().sum() for p in snapshot))
            fh.write(
                json.dumps(
                    {
                        "step": mixer.step_count,
                        "pairs": pairs,
                        "counts": counts,
                        "weights": mixer.weights.tolist(),
                        "param_checksum": checksum,
                    }
                )
                + "\n"
            )
    # every rank past its last collective, the group destroyed; then leave without the interpreter's finalisation:
    # there a gloo worker thread that still releases a collective's tensor made in Python (gradmix's statistics) needs
    # the GIL, CPython ends the thread and std::terminate aborts the rank ("terminate called without an active
    # exception", SIGABRT; 5 of 128 runs of this worker without os._exit, more under load). A torch fault,
    # reproduced without gradmix: docs/bad_inputs.md, "gloo: SIGABRT at interpreter exit".
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
