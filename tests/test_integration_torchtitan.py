"""torchtitan: gradmix.integrations.torchtitan's MixingDataLoader in-process, and examples/torchtitan_mix.py end to end
(torchtitan's CheckpointManager, optimizer / LR-scheduler containers and loss around an FSDP2 model; 2 gloo ranks
under torchrun on loopback).
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
import torch

pytest.importorskip("torchtitan")
from torchtitan.components.dataloader import BaseDataLoader

from conftest import _tiny_lm_class, kill_after_checkpoint, make_toy_domains
from gradmix import Mixer
from gradmix.integrations.torchtitan import IGNORE_INDEX, MixingDataLoader

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "torchtitan_mix.py"
sys.path.insert(0, str(ROOT / "examples"))  # _tiny_gpt, the examples' domains
ENV = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
STEPS = 20


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    # ODM updating every 2 steps: its weights move from the 4th update (step 8) on, so equal rows after a resume at
    # step 10 prove something
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(EXAMPLE)]
    return [*cmd, "--update-every", "2", *args]


def run(*args: str, nproc: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(torchrun(*args, nproc=nproc), capture_output=True, text=True, timeout=300, env=ENV)
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def traces(out: Path) -> tuple[list[dict], list[dict]]:
    return tuple(  # type: ignore[return-value]
        [json.loads(x) for x in (out / f"trace.rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)
    )


def assert_same_rows(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, len(a) + 1))
    for x, y in zip(a, b):
        assert x["weights"] == y["weights"], x["step"]
        assert x["requested_weights"] == y["requested_weights"], x["step"]
        assert x["train_loss"] == y["train_loss"], x["step"]


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoint").iterdir())


# -- in-process ---------------------------------------------------------------------------------------------------


def sum_loss(pred: torch.Tensor, labels: torch.Tensor, global_valid_tokens: torch.Tensor | None = None, **_: object):
    """A loss in torchtitan's convention: token losses summed, divided by the global token count; (loss, metrics)."""
    loss = torch.nn.functional.cross_entropy(
        pred.flatten(0, 1).float(), labels.flatten(0, 1), reduction="sum", ignore_index=IGNORE_INDEX
    )
    return (loss if global_valid_tokens is None else loss / global_valid_tokens), {}


def train(loader: MixingDataLoader, steps: int, *, explicit: bool = True, seed: int = 0) -> None:
    torch.manual_seed(seed)
    model = _tiny_lm_class()()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss_fn = loader.observing(sum_loss)
    batches = iter(loader)
    for _ in range(steps):
        micro = [next(batches) for _ in range(loader.mixer.accumulation_steps)]
        tokens = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in micro)
        for input_dict, labels in micro:
            loss, _ = loss_fn(model(input_dict["input"]), labels, torch.tensor(tokens))
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if explicit:
            loader.step()


def odm_mixer(**kwargs) -> Mixer:
    return Mixer(make_toy_domains(), "odm", batch_size=6, update_every=1, log_every=1, seed=0, **kwargs)


def test_the_adapter_is_a_torchtitan_dataloader() -> None:
    """Built the way torchtitan's trainer builds its dataloader (Config.build with the trainer's arguments); it is a
    BaseDataLoader (a Stateful); it yields ({"input": ids[:, :-1]}, ids[:, 1:]); ``import gradmix`` imports no
    torchtitan."""
    calls = []

    def factory(**kwargs):
        calls.append(kwargs)
        return odm_mixer(accumulation_steps=2)

    loader = MixingDataLoader.Config(mixer_factory=factory).build(
        dp_world_size=1, dp_rank=0, tokenizer=None, seq_len=6, local_batch_size=3, snapshot_every_n_steps=10
    )
    assert isinstance(loader, BaseDataLoader) and isinstance(loader, MixingDataLoader)
    assert calls == []  # the Mixer is built on first use (after bind_model, for gradient methods)
    input_dict, labels = next(iter(loader))
    assert calls == [{"dp_rank": 0, "dp_world_size": 1, "model": None}]
    assert set(input_dict) == {"input"} and input_dict["input"].shape == labels.shape == (3, 6)
    assert input_dict["input"].dtype == labels.dtype == torch.long
    with pytest.raises(RuntimeError, match="middle of an optimizer step"):
        loader.state_dict()
    code = "import sys, gradmix, gradmix.integrations; print('torchtitan' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert res.stdout.strip() == "False", res.stderr


def test_step_is_explicit_or_implicit_and_state_round_trips() -> None:
    """``step()`` after the optimizer, or none: the next batch / checkpoint / close() runs the pending step; the
    same weights either way. The Stateful state restores a fresh loader that continues identically."""
    explicit, implicit = MixingDataLoader(mixer=odm_mixer()), MixingDataLoader(mixer=odm_mixer())
    train(explicit, 6)
    train(implicit, 6, explicit=False)
    implicit.close()  # the 6th step's record
    weights = [r["requested_weights"] for r in explicit.mixer.history]
    assert len(weights) == 6 and [r["requested_weights"] for r in implicit.mixer.history] == weights
    assert len({tuple(w.values()) for w in weights}) >= 3  # ODM moved the mix

    first = MixingDataLoader(mixer=odm_mixer())
    train(first, 3)
    saved = first.state_dict()
    assert set(saved) == {"dp_rank_0", "world_size"} and isinstance(saved["dp_rank_0"], bytes)
    train(first, 3, seed=1)
    second = MixingDataLoader(mixer=odm_mixer())
    second.load_state_dict(saved)
    assert second.mixer.step_count == 3
    train(second, 3, seed=1)
    assert [r["requested_weights"] for r in second.mixer.history][-3:] == [
        r["requested_weights"] for r in first.mixer.history
    ][-3:]
    with pytest.raises(ValueError, match="written by 4 data-parallel ranks, this run has 1"):
        second.load_state_dict({**saved, "world_size": 4})


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"local_batch_size is 4.*batch_size 6"):
        MixingDataLoader(mixer=odm_mixer(), local_batch_size=4)
    with pytest.raises(ValueError, match=r"seq_len is 32.*predict 6 tokens"):
        MixingDataLoader(mixer=odm_mixer(), seq_len=32)
    with pytest.raises(ValueError, match="exactly one of mixer"):
        MixingDataLoader()
    loader = MixingDataLoader(mixer=odm_mixer())
    next(iter(loader))  # drawn, but its loss never reached the Mixer
    with pytest.raises(RuntimeError, match=r"steers by the loss.*observing"):
        loader.step()
    torch.manual_seed(0)
    model = _tiny_lm_class()()
    pike = MixingDataLoader(mixer=Mixer(make_toy_domains(), "pike", batch_size=6, update_every=1, model=model))
    input_dict, labels = next(iter(pike))
    assert pike.measuring()
    with pytest.raises(RuntimeError, match=r"measures gradient statistics.*forward_backward"):
        pike.observing(sum_loss)(model(input_dict["input"]), labels)


def test_forward_backward_measures_without_calling_backward_itself() -> None:
    """A gradient method (PiKE) in one process: its measuring steps run through forward_backward, every backward
    through the given backward_fn; the returned loss is torchtitan's (summed token losses / global tokens)."""
    torch.manual_seed(0)
    model = _tiny_lm_class()()
    params = {"min_examples_per_domain": 0, "min_batch_per_domain": 0}  # act on this tiny batch
    mixer = Mixer(
        make_toy_domains(),
        "pike",
        batch_size=6,
        update_every=2,
        probe_every=2,
        log_every=1,
        model=model,
        method_params=params,
    )
    loader = MixingDataLoader(mixer=mixer)
    loss_fn = loader.observing(sum_loss)
    backwards = []

    def backward_fn(loss: torch.Tensor) -> None:
        backwards.append(float(loss.detach()))
        loss.backward()

    batches = iter(loader)
    for step in range(1, 5):
        input_dict, labels = next(batches)
        tokens = (labels != IGNORE_INDEX).sum()
        if loader.measuring():
            assert step % 2 == 0
            loss = loader.forward_backward(model, input_dict, labels, loss_fn, backward_fn=backward_fn)
            with torch.no_grad():
                expected, _ = sum_loss(model(input_dict["input"]), labels, tokens)
            torch.testing.assert_close(loss, expected)
        else:
            loss, _ = loss_fn(model(input_dict["input"]), labels, tokens)
            loss.backward()
        model.zero_grad()
        loader.step()
    assert backwards  # the probe's passes ran through backward_fn
    measured = [r for r in loader.mixer.history if r.get("update_terms")]
    assert [r["step"] for r in measured] == [2, 4]
    assert all(np.isfinite(list(r["update_terms"]["grad_sq_norm"].values())).all() for r in measured)


# -- torchrun, 2 gloo ranks ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("titan") / "full"
    run("--out", str(out), "--steps", str(STEPS), "--trace")
    return out, rows(out)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """A run stopped (as if killed) right after its step-10 checkpoint."""
    out = tmp_path_factory.mktemp("titan") / "stopped"
    run("--out", str(out), "--steps", str(STEPS), "--stop-at", "10")
    return out


def test_every_rank_same_weights_disjoint_shares_of_the_global_batch(uninterrupted) -> None:
    out, records = uninterrupted
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert len({tuple(r["requested_weights"].values()) for r in records}) >= 3  # ODM moved the mix
    assert checkpoints(out) == ["step-10", "step-20"]
    assert (out / "checkpoint" / "step-10" / ".metadata").is_file()
    r0, r1 = traces(out)
    assert len(r0) == len(r1) == STEPS
    for a, b in zip(r0, r1):
        assert a["weights"] == b["weights"]  # bit for bit on every rank
        assert len(a["batch"]) == len(b["batch"]) == 6  # 12 examples per step, 6 per rank
        assert not {tuple(p) for p in a["batch"]} & {tuple(p) for p in b["batch"]}  # disjoint shares
    # the shares are the global batch of one process's Mixer (same seed) split rank by rank: global[r::2]
    from _tiny_gpt import byte_domains

    single = Mixer(byte_domains(), "uniform", batch_size=12, seed=0)  # the same draws at uniform weights
    for step, batch in enumerate(single.batches(2)):  # the weights are uniform until the first update
        pairs = list(zip(batch["domain"].tolist(), batch["index"].tolist()))
        assert r0[step]["batch"] == [list(p) for p in pairs[0::2]]
        assert r1[step]["batch"] == [list(p) for p in pairs[1::2]]
        single.step()


def test_stop_at_and_resume_equals_uninterrupted(uninterrupted, stopped, tmp_path) -> None:
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    assert [r["step"] for r in rows(out)] == list(range(1, 11))
    assert checkpoints(out) == ["step-10"]
    res = run("--out", str(out), "--steps", str(STEPS), "--resume")
    assert "resumed from" in res.stdout and "at step 10" in res.stdout
    assert_same_rows(rows(out), uninterrupted[1])


def test_sigkill_after_checkpoint_and_resume_equals_uninterrupted(uninterrupted, tmp_path) -> None:
    out = tmp_path / "killed"
    marker = out / "checkpoint" / "step-10" / ".metadata"  # DCP writes it last; torchtitan resumes only with it
    cmd = torchrun("--out", str(out), "--steps", "1000")
    kill_after_checkpoint(cmd, marker, env=ENV, cwd=ROOT, past=0.5, timeout=240, tree=True)
    assert rows(out)[-1]["step"] >= 10
    res = run("--out", str(out), "--steps", str(STEPS), "--resume")
    assert "at step 10" in res.stdout or "at step 20" in res.stdout
    assert_same_rows(rows(out), uninterrupted[1])  # the killed run's rows after its checkpoint were dropped


def test_resume_on_another_world_size_is_a_clear_error(stopped, tmp_path) -> None:
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    res = run("--out", str(out), "--steps", str(STEPS), "--resume", nproc=1, check=False)
    assert res.returncode != 0
    assert "cannot resume" in res.stderr and "written by 2 data-parallel ranks, this run has 1" in res.stderr
    assert [r["step"] for r in rows(out)] == list(range(1, 11))  # nothing changed


def test_gradient_method_through_the_sharded_probe(tmp_path) -> None:
    """PiKE under FSDP2 with torchtitan's disabled gradient division: the measuring steps run through the
    ShardedGradientProbe (every rank the same weights, bit for bit), and its statistics equal those of the same
    model with FSDP's default averaging (the division is switched back for the probe's passes)."""
    pike = ["--method", "pike", "--pike-variant", "gradmix_v1", "--trace"]
    titan, default = tmp_path / "titan", tmp_path / "default"
    run("--out", str(titan), "--steps", "6", *pike)
    run("--out", str(default), "--steps", "6", *pike, "--fsdp-division", "default")
    r0, r1 = traces(titan)
    assert [a["measured"] for a in r0] == [False, True] * 3
    for a, b in zip(r0, r1):
        assert a["weights"] == b["weights"]
    records, reference = rows(titan), rows(default)
    assert len({tuple(r["requested_weights"].values()) for r in records}) >= 2  # PiKE moved the mix
    for x, y in zip(records, reference):
        np.testing.assert_allclose(
            list(x["requested_weights"].values()), list(y["requested_weights"].values()), rtol=1e-4
        )
        if x["step"] == 2:  # the first measurement, same parameters: the statistics agree to float rounding
            assert set(x["update_terms"]) == set(y["update_terms"]) >= {"grad_sq_norm", "variance_2b"}
            for key, values in x["update_terms"].items():
                if isinstance(values, dict):
                    np.testing.assert_allclose(list(values.values()), list(y["update_terms"][key].values()), rtol=1e-5)


def test_dga_target_batches_run_through_forward_backward() -> None:
    """DGA in one process: the target batch goes through the same per-example loss (torchtitan's) as the training
    parts; a target drawn from d0's token range pulls the mix toward d0."""
    torch.manual_seed(0)
    model = _tiny_lm_class()()
    target = torch.as_tensor(np.random.default_rng(1).integers(0, 12, size=(20, 7)))  # d0's tokens
    mixer = Mixer(
        make_toy_domains(), "dga", batch_size=6, update_every=2, probe_every=2, log_every=1, model=model, target=target
    )
    loader = MixingDataLoader(mixer=mixer)
    loss_fn = loader.observing(sum_loss)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batches = iter(loader)
    for _ in range(6):
        input_dict, labels = next(batches)
        if loader.measuring():
            loader.forward_backward(model, input_dict, labels, loss_fn)
        else:
            loss, _ = loss_fn(model(input_dict["input"]), labels, (labels != IGNORE_INDEX).sum())
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loader.step()
    weights = [list(r["requested_weights"].values()) for r in mixer.history if r.get("update_terms")]
    assert len(weights) == 3 and weights[0][0] < weights[1][0] < weights[2][0]
    assert weights[2][0] == max(weights[2])
