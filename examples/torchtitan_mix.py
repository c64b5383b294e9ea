"""gradmix as torchtitan's dataloader (CPU, gloo, FSDP2): a Mixer mixes three byte-level domains for a tiny GPT.

    torchrun --standalone --nproc_per_node 2 examples/torchtitan_mix.py --out runs/titan --steps 30
    torchrun --standalone --nproc_per_node 2 examples/torchtitan_mix.py --out runs/titan --steps 30 --resume
    torchrun --standalone --nproc_per_node 2 examples/torchtitan_mix.py --out runs/titan-pike --method pike

Needs torchtitan (``pip install 'gradmix[torchtitan]'``). torchtitan's ``Trainer`` and its models (the llama3 debug
model included) need ``triton`` and a CUDA device (on a CPU-only machine ``import torchtitan.trainer`` fails with
``ModuleNotFoundError: No module named 'triton'``, and the trainer picks the device ``cuda`` when no accelerator is
found), so this example runs torchtitan's own components - ``MixingDataLoader`` built through its ``Config.build``
with the arguments the trainer passes, ``CheckpointManager``, ``OptimizersContainer``, ``LRSchedulersContainer``,
``CrossEntropyLoss``, ``clip_grad_norm_``, ``disable_fsdp_gradient_division`` - in a loop that mirrors
``Trainer.train_step`` (zero_grad; fetch the step's micro-batches; the global count of labelled tokens; forward,
loss / global tokens, backward; clip; optimizer and LR-scheduler step; ``checkpointer.save(step)``), with
``examples/_tiny_gpt.py``'s model ``fully_shard``-ed over the 2 ranks. The gradmix calls are the ones a ``Trainer``
subclass makes (``gradmix.integrations.torchtitan``): the loss wrapped by ``dataloader.observing``,
``dataloader.forward_backward`` on the steps a gradient method measures, ``dataloader.step()`` after the optimizer.

Checkpoints: torchtitan's ``CheckpointManager`` every 10 steps (``OUT/checkpoint/step-N``, torch.distributed.checkpoint:
model and optimizer shards, LR schedulers, the train state and the dataloader's state, i.e. the Mixer's, per rank;
DCP writes ``.metadata`` last, and the manager only resumes from folders that have it). ``--resume`` continues from
the newest one exactly (same batches, same weights; ``metrics.jsonl`` is cut back to its step). ``--stop-at M``
leaves right after the checkpoint of step M as if killed. Metrics: ``OUT/metrics.jsonl`` (rank 0). A used ``--out``
without ``--resume`` is refused on every rank.

``--method pike`` (a gradient method): on its measuring steps (every 5 steps) the micro-batches run through the
Mixer's ``ShardedGradientProbe`` (statistics from the local gradient shards, reduced as scalars), each pass calling
torchtitan's loss; torchtitan's disabled FSDP gradient division is switched back to FSDP's averaging for those passes
(``--fsdp-division default`` keeps FSDP's averaging everywhere and multiplies torchtitan's loss by the number of ranks
instead: the same gradients, and, bit for bit here, the same statistics and weights). On gloo, torchtitan's division
factor of 1 needs plain-sum collectives (``set_force_sum_reduction_for_comms``: gloo has no PREMUL_SUM; NCCL does).
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _tiny_gpt import DATA_DIR, DEFAULT_DOMAINS, WINDOW, TinyGPT, byte_domains
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from gradmix import Mixer
from gradmix.distributed import exit_rank, init_process_group
from gradmix.methods.pike import PiKE

CHECKPOINT_EVERY = 10
LR_HORIZON = 1000  # the LR schedule's length: fixed, so a run's --steps does not change its learning rates


class TrainState:
    """torchtitan's trainer checkpoints itself as ``train_state`` (``step``, ``ntokens_seen``); so does this loop."""

    def __init__(self) -> None:
        self.step = 0
        self.ntokens_seen = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.ntokens_seen = int(state["step"]), int(state["ntokens_seen"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="run folder: checkpoint/ and metrics.jsonl")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--stop-at", type=int, default=None, help="exit right after the checkpoint of this step")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--method", default="odm", help="a gradmix method: odm (loss-only, default), pike, ...")
    parser.add_argument("--domains", default=",".join(DEFAULT_DOMAINS))
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    parser.add_argument("--batch-size", type=int, default=12, help="global examples per step")
    parser.add_argument("--accumulation-steps", type=int, default=1)
    parser.add_argument("--update-every", type=int, default=5)
    parser.add_argument(
        "--pike-variant",
        default="gradmix",
        choices=PiKE.variants,
        help="--method pike: PiKE's variant (the tests use gradmix_v1, whose weights move within a few steps here)",
    )
    parser.add_argument(
        "--fsdp-division",
        default="torchtitan",
        choices=["torchtitan", "default"],
        help="torchtitan: FSDP's gradient division disabled, the loss divided by the global token count (torchtitan's "
        "parallelize); default: FSDP's averaging kept, the loss multiplied by the ranks (the same gradients; tests "
        "compare the probe's statistics of the two)",
    )
    parser.add_argument("--trace", action="store_true", help="each rank writes OUT/trace.rank{R}.jsonl (tests)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    try:
        from torchtitan.components.checkpoint import CheckpointManager
        from torchtitan.components.loss import IGNORE_INDEX, CrossEntropyLoss
        from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig
        from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer
        from torchtitan.distributed.fsdp import disable_fsdp_gradient_division
        from torchtitan.distributed.utils import clip_grad_norm_

        from gradmix.integrations.torchtitan import MixingDataLoader, titan_batch
    except ImportError as exc:
        exit_rank(2, wait_for_peers=False, message=f"cannot start: {exc} (pip install 'gradmix[torchtitan]')")

    init_process_group("gloo")  # torch's, with gradmix's timeout
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # every rank builds the same full model, then keeps its shards
    model = TinyGPT()
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if args.fsdp_division == "torchtitan":
        disable_fsdp_gradient_division(model)  # as torchtitan's parallelize does: the loss / global token count
        for module in model.modules():  # gloo has no PREMUL_SUM (NCCL's way to a factor of 1): plain sums
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)
    warnings.filterwarnings("ignore", message=".*returned a view tensor")

    optimizers = OptimizersContainer(
        OptimizersContainer.Config(
            param_groups=[ParamGroupConfig(pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 3e-3})],
            implementation="for-loop",
        ),
        model_parts=[model],
    )
    lr_schedulers = LRSchedulersContainer.Config(warmup_steps=2, total_steps=LR_HORIZON).build(
        optimizers=optimizers, training_steps=LR_HORIZON
    )

    domains = byte_domains(args.domains.split(","), args.data_dir)
    trace_rows: list[tuple[int, int]] = []

    def convert(batch):  # torchtitan's (input_dict, labels), and the examples drawn for the trace
        trace_rows.extend(zip(batch["domain"].tolist(), batch["index"].tolist()))
        return titan_batch(batch)

    def make_mixer(*, dp_rank: int, dp_world_size: int, model: torch.nn.Module | None) -> Mixer:
        return Mixer(
            domains,
            args.method,
            batch_size=args.batch_size,
            method_params={"min_weight": 0.05, "variant": args.pike_variant} if args.method == "pike" else None,
            model=model,
            probe_params={"num_splits": 2},
            accumulation_steps=args.accumulation_steps,
            update_every=args.update_every,
            probe_every=args.update_every,  # gradient methods: measure on the update steps only
            log_every=1,
            seed=0,
            run_dir=out,
            resume=args.resume,
            rank=dp_rank,
            world_size=dp_world_size,
        )

    micro_batch = args.batch_size // (world * args.accumulation_steps)
    # built as torchtitan's trainer builds its dataloader: config.dataloader.build(...)
    dataloader = MixingDataLoader.Config(mixer_factory=make_mixer).build(
        dp_world_size=world,
        dp_rank=rank,
        tokenizer=None,
        seq_len=WINDOW,
        local_batch_size=micro_batch,
        snapshot_every_n_steps=CHECKPOINT_EVERY * args.accumulation_steps,
    )
    dataloader.convert = convert
    dataloader.bind_model(model)  # gradient methods: the probe of the sharded model
    try:  # a used --out without --resume, or ranks that disagree: the same one-line error on every rank
        mixer = dataloader.mixer
    except ValueError as exc:
        exit_rank(2, wait_for_peers=False, message=f"rank {rank}: cannot start: {exc}")
    loss_fn = dataloader.observing(CrossEntropyLoss.Config().build())

    state = TrainState()
    checkpointer = CheckpointManager(
        CheckpointManager.Config(
            enable=True,
            folder="checkpoint",
            interval=CHECKPOINT_EVERY,
            keep_latest_k=0,
            last_save_model_only=False,
            initial_load_model_only=False,
        ),
        dataloader=dataloader,
        model_parts=[model],
        optimizers=optimizers,
        lr_schedulers=lr_schedulers,
        states={"train_state": state},
        sd_adapter=None,
        base_folder=str(out),
    )
    try:
        loaded = checkpointer.load()  # as Trainer.train(): the newest checkpoint in OUT/checkpoint, if any
    except ValueError as exc:
        exit_rank(2, wait_for_peers=False, message=f"rank {rank}: cannot resume: {exc}")
    if loaded and rank == 0:
        print(f"resumed from {out / 'checkpoint' / f'step-{state.step}'} at step {state.step} ({world} ranks)")
    if state.step != mixer.step_count:
        raise SystemExit(f"train state at step {state.step}, the Mixer at {mixer.step_count}")

    trace = open(out / f"trace.rank{rank}.jsonl", "a") if args.trace else None  # noqa: SIM115 (closed by exit)
    data_iterator = iter(dataloader)
    while state.step < args.steps:
        state.step += 1
        optimizers.zero_grad()
        trace_rows.clear()
        try:
            micro_batches = [next(data_iterator) for _ in range(args.accumulation_steps)]
        except StopIteration:
            if rank == 0:
                print(f"ran out of data; step {state.step} was canceled")
            state.step -= 1
            break
        local_tokens = sum(((labels != IGNORE_INDEX).sum() for _, labels in micro_batches), torch.tensor(0))
        global_tokens = local_tokens.clone()
        dist.all_reduce(global_tokens)
        measuring = dataloader.measuring()
        for input_dict, labels in micro_batches:
            if measuring:  # the probe's passes, each through torchtitan's loss and backward
                dataloader.forward_backward(
                    model,
                    input_dict,
                    labels,
                    loss_fn,
                    global_valid_tokens=global_tokens,
                    fsdp_divide_factor=1.0 if args.fsdp_division == "torchtitan" else None,
                )
            else:  # torchtitan's forward / backward (the wrapped loss observes the per-example losses)
                pred = model(input_dict["input"])
                loss, _ = loss_fn(pred, labels, global_tokens)
                (loss if args.fsdp_division == "torchtitan" else loss * world).backward()
            state.ntokens_seen += labels.numel()
        clip_grad_norm_(list(model.parameters()), 1.0, foreach=True)
        optimizers.step()
        lr_schedulers.step()
        weights = dataloader.step()  # the Mixer's step: its update when due, the metrics record
        if trace is not None:
            record = {"step": state.step, "weights": weights.tolist(), "measured": measuring, "batch": trace_rows}
            trace.write(json.dumps(record) + "\n")
            trace.flush()
        checkpointer.save(state.step, last_step=state.step == args.steps)
        if args.stop_at is not None and state.step == args.stop_at:
            exit_rank(0, wait_for_peers=False)  # as if killed right after the checkpoint
    dataloader.close()  # flushes the Mixer's writers and releases the run folder's lock
    checkpointer.close()
    if rank == 0:
        print(f"done: {mixer.step_count} steps, weights {dict(zip(mixer.names, mixer.weights.round(4).tolist()))}")
    exit_rank()


if __name__ == "__main__":
    main()
