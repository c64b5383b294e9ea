"""The TRL integration end to end: examples/sft_trl.py (TRL's SFTTrainer through ``MixingSFTTrainer``, a random-init
tiny Llama on three instruction sources, gradient accumulation 2, SFTConfig's default gradient checkpointing,
attention dropout 0.1) run in subprocesses and in this process. A run stopped after a checkpoint (or killed with
SIGKILL) and resumed must log exactly the weights and losses of an uninterrupted run, with a gradient method (PiKE), a
loss-only method (ODM) and DGA toward a held-out target set; the KPIs reach the Trainer's log history; gradient
accumulation and gradient checkpointing change no number beyond float rounding; DGA moves the mix toward the source
its target set comes from; SFTTrainer's own evaluation still works; options that would change the training loss or
data behind the Mixer's back are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import kill_after_checkpoint, read_metrics

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("datasets")
pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "sft_trl.py"
STEPS = 20  # checkpoints every 5 steps
TIMEOUT = 300
SOURCES = ("explain", "continue", "code")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(EXAMPLE), "--out", str(out), "--steps", str(STEPS), *extra]


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(_cmd(out, *extra), capture_output=True, text=True, timeout=TIMEOUT, env=_env(), cwd=ROOT)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(extra)} exited with {done.returncode}:\n{done.stderr[-4000:]}")
    return done


def _assert_sameread_metrics(reference: list[dict], resumed: list[dict]) -> None:
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))  # no duplicated or missing step
    for a, b in zip(reference, resumed):
        assert a["weights"] == b["weights"], (a["step"], a["weights"], b["weights"])  # exactly, not approximately
        assert a["train_loss"] == b["train_loss"], a["step"]
        assert a["tokens"] == b["tokens"], a["step"]
        assert a.get("update_terms") == b.get("update_terms"), a["step"]


def _example_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gradmix_sft_trl_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(EXAMPLE.parent))  # the example imports its sibling _trainer_callbacks, as when run
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    return module


_EXAMPLE = None


def _example():
    global _EXAMPLE
    if _EXAMPLE is None:
        _EXAMPLE = _example_module()
    return _EXAMPLE


_REFERENCES: dict[tuple[str, ...], list[dict]] = {}


def _reference(tmp_path_factory, *flags: str) -> list[dict]:
    """An uninterrupted run (once per configuration and session; in this process, to save a start-up: the stopped
    and resumed runs it is compared with are separate processes). Checks what every run must have written."""
    if flags not in _REFERENCES:
        out = tmp_path_factory.mktemp("ref")
        _example().main(["--out", str(out), "--steps", str(STEPS), *flags])
        records = read_metrics(out)
        for field in ("step", "weights", "train_loss", "tokens", "weight_entropy", "effective_domains", "max_weight"):
            assert all(field in r for r in records), field
        assert all(set(r["weights"]) == set(SOURCES) for r in records)
        assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in (10, 15, 20, 5)]
        assert all((out / f"checkpoint-{s}" / "gradmix_state.pt").is_file() for s in (5, 10, 15, 20))
        # the KPIs reached the Trainer's loggers (its log history, saved with every checkpoint)
        history = json.loads((out / "checkpoint-20" / "trainer_state.json").read_text())["log_history"]
        logged = [h for h in history if "gradmix/weights/explain" in h]  # the writers' names (gradmix.writers)
        assert [h["step"] for h in logged] == list(range(1, STEPS + 1))
        for h, r in zip(logged, records):
            for name in SOURCES:
                assert h[f"gradmix/weights/{name}"] == pytest.approx(r["weights"][name])
                assert h[f"gradmix/train_loss/{name}"] == pytest.approx(r["train_loss"][name])
        assert {"gradmix/weight_entropy", "gradmix/effective_domains", "gradmix/max_weight", "loss"} <= set(logged[-1])
        # the Trainer's logged loss is the step's mean per-example loss over the whole global batch (both micro-batches)
        _REFERENCES[flags] = records
    return _REFERENCES[flags]


# -- runs -------------------------------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("method", ["pike", "odm", "dga"])
def test_stop_and_resume_logs_the_records_of_an_uninterrupted_run(tmp_path, tmp_path_factory, method):
    # PiKE as gradmix_v1, whose weights move within these 20 steps (the default keeps the even split on this tiny run
    # until its statistics tell the sources apart), so equal records after a resume prove something
    flags = ("--method", method, *(("--pike-variant", "gradmix_v1") if method == "pike" else ()))
    reference = _reference(tmp_path_factory, *flags)
    if method != "odm":  # the mix really changed while training (else the comparison would prove little)
        assert len({json.dumps(r["weights"]) for r in reference}) >= 4
    out = tmp_path / "run"
    stopped = _run(out, *flags, "--stop-at", "10")
    assert "stopping right after the checkpoint at step 10" in stopped.stdout
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 11))
    assert not (out / "checkpoint-15").exists()
    resumed = _run(out, *flags, "--resume")
    assert "resume from" in resumed.stdout and "checkpoint-10" in resumed.stdout
    _assert_sameread_metrics(reference, read_metrics(out))


@pytest.mark.integration
def test_sigkill_and_resume_logs_the_records_of_an_uninterrupted_run(tmp_path, tmp_path_factory):
    reference = _reference(tmp_path_factory, "--method", "pike")
    out = tmp_path / "run"
    kill_after_checkpoint(
        _cmd(out, "--step-delay", "0.2"),
        out / "checkpoint-5" / "gradmix_state.pt",
        env=_env(),
        cwd=ROOT,
        past=0.5,  # a few steps past the checkpoint
        timeout=TIMEOUT,
    )
    written = [r["step"] for r in read_metrics(out)]
    assert 5 <= len(written) < STEPS, written  # killed mid-run, after checkpoint 5
    resumed = _run(out, "--resume")
    assert "resume from" in resumed.stdout and "scratch" not in resumed.stdout
    _assert_sameread_metrics(reference, read_metrics(out))


@pytest.mark.integration
def test_dga_moves_the_mix_toward_the_source_of_its_target_set(tmp_path_factory):
    """The target set is held-out ``explain`` pairs: DGA's alignment term ranks ``explain`` first and its weight
    ends the largest, above uniform; PiKE on the same data ends elsewhere (the target set, not the data, did it)."""
    dga = _reference(tmp_path_factory, "--method", "dga")
    last = dga[-1]
    alignment = last["update_terms"]["alignment"]
    assert max(alignment, key=alignment.get) == "explain", alignment
    assert max(last["weights"], key=last["weights"].get) == "explain", last["weights"]
    assert last["weights"]["explain"] > 0.38
    pike = _reference(tmp_path_factory, "--method", "pike")[-1]["weights"]
    assert pike["explain"] < last["weights"]["explain"] - 0.05, (pike, last["weights"])


@pytest.mark.integration
def test_uniform_holds_the_mix_and_fair_pike_moves_it(tmp_path_factory):
    """The remaining methods of the example: uniform keeps 1/3 each at every step (and its records still carry the
    losses of every source); Fair-PiKE, a gradient method, changes the mix."""
    uniform = _reference(tmp_path_factory, "--method", "uniform")
    assert all(r["weights"] == {name: 1 / 3 for name in SOURCES} for r in uniform)
    assert all(set(r["train_loss"]) == set(SOURCES) for r in uniform)
    fair = _reference(tmp_path_factory, "--method", "fair_pike")
    assert len({json.dumps(r["weights"]) for r in fair}) >= 4
    assert max(abs(w - 1 / 3) for w in fair[-1]["weights"].values()) > 0.01


@pytest.mark.integration
def test_gradient_accumulation_gives_the_run_of_one_batch(tmp_path):
    """Gradient accumulation 2 (two micro-batches of 8, each padded on its own) against one batch of 16 per step,
    dropout off: the same examples, tokens, weights and losses at every step, up to float rounding."""
    example = _example()
    one, two = tmp_path / "accum1", tmp_path / "accum2"
    variant = ["--pike-variant", "gradmix_v1"]  # its weights move within these steps (see the resume test)
    example.main(["--out", str(one), "--steps", str(STEPS), "--grad-accum", "1", "--dropout", "0", *variant])
    example.main(["--out", str(two), "--steps", str(STEPS), "--grad-accum", "2", "--dropout", "0", *variant])
    a, b = read_metrics(one), read_metrics(two)
    assert len({json.dumps(r["weights"]) for r in a}) >= 4
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"], x["step"]  # the same examples were drawn
        for name in SOURCES:
            assert y["weights"][name] == pytest.approx(x["weights"][name], abs=1e-5), x["step"]
            assert y["train_loss"][name] == pytest.approx(x["train_loss"][name], rel=1e-5), x["step"]


@pytest.mark.integration
def test_gradient_checkpointing_changes_no_number(tmp_path, tmp_path_factory):
    """SFTConfig turns gradient checkpointing on by default; the recomputed forward must not disturb the probe (its
    hooks) or the dropout masks: the run without it logs the same records."""
    reference = _reference(tmp_path_factory, "--method", "pike")  # gradient checkpointing on
    out = tmp_path / "nogc"
    example = _example()
    trainer = example.main(["--out", str(out), "--steps", str(STEPS), "--no-gradient-checkpointing"])
    assert not trainer.args.gradient_checkpointing
    records = read_metrics(out)
    for x, y in zip(reference, records):
        for name in SOURCES:
            assert y["weights"][name] == pytest.approx(x["weights"][name], rel=1e-6), x["step"]
            assert y["train_loss"][name] == pytest.approx(x["train_loss"][name], rel=1e-6), x["step"]


@pytest.mark.integration
def test_evaluate_is_sfttrainers_own_on_raw_prompt_completion_data(tmp_path):
    """eval_dataset goes through SFTTrainer's preparation (tokenize, EOS, completion-only labels): its loss on raw
    prompt/completion pairs equals gradmix's token-mean loss on the same pairs tokenized by the example."""
    import datasets
    import torch

    from gradmix.integrations.trl import SFTCollate
    from gradmix.sft import causal_lm_loss

    example = _example()
    trainer = example.main(["--out", str(tmp_path / "run"), "--steps", "4", "--no-gradient-checkpointing"])
    assert trainer.completion_only_loss is True  # SFTTrainer's default for prompt-completion data
    pairs = example.explain_pairs()[::8][:8]
    raw = datasets.Dataset.from_dict(
        {"prompt": [example.prompt_text(q) for q, _ in pairs], "completion": [a for _, a in pairs]}
    )
    trainer.args.per_device_eval_batch_size = len(pairs)  # one batch: its loss is the token mean
    result = trainer.evaluate(raw)
    tokenizer = trainer.processing_class
    batch = SFTCollate(tokenizer.pad_token_id, example.MAX_LENGTH)([example.sft_example(tokenizer, *p) for p in pairs])
    trainer.model.eval()
    with torch.no_grad():
        expected = float(causal_lm_loss(trainer.model, batch, reduction="token").mean())
    full = dict(batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
    with torch.no_grad():
        with_prompt = float(causal_lm_loss(trainer.model, full, reduction="token").mean())
    assert result["eval_loss"] == pytest.approx(expected, rel=1e-4)
    assert abs(with_prompt - expected) > 1e-3  # the comparison can tell completion-only from whole-sequence loss


@pytest.mark.integration
def test_packing_packs_each_source_apart(tmp_path):
    """SFTConfig(packing=True): each source's examples packed into rows of at most max_length tokens (never mixing
    sources), position_ids restarting per example; a few steps train with finite per-source losses."""
    import math

    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig

    from gradmix.integrations.trl import MixingSFTTrainer
    from gradmix.sources import ExampleDomain

    example = _example()
    tokenizer, sources, _ = example.load_sources()
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=160,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
    )
    args = SFTConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        max_length=160,
        packing=True,
        per_device_train_batch_size=6,
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = MixingSFTTrainer(
        model=model, args=args, processing_class=tokenizer, domains=sources, method="pike", mixer_options={"seed": 1}
    )
    packed = trainer.mixer.domains
    assert packed.names == list(SOURCES)
    sizes = dict(zip(packed.names, packed.sizes))
    for index, name in enumerate(SOURCES):
        assert sizes[name] < len(sources[name])  # rows hold several examples each
        domain = packed.domains[index]
        assert isinstance(domain, ExampleDomain)
        row = domain.examples(np.array([0]))[0]  # the source's first examples, in order, only them
        members = sources[name][: len(row["seq_lens"])]
        assert row["input_ids"].tolist() == [t for e in members for t in e["input_ids"]]
        assert row["seq_lens"].tolist() == [len(e["input_ids"]) for e in members]
    batch = next(iter(trainer.get_train_dataloader()))
    assert {"position_ids", "seq_lens"} <= set(batch)
    assert batch["input_ids"].shape[1] <= 160
    assert int((batch["position_ids"] == 0).sum()) > batch["input_ids"].shape[0]  # restarts inside rows
    trainer.train()
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(v) for r in records for v in r["train_loss"].values())


# -- the pieces, without training -------------------------------------------------------------------------------------


def test_sft_collate_cuts_every_token_field_as_the_config_says():
    from gradmix.integrations.trl import SFTCollate

    examples = [
        {"input_ids": [1, 2, 3, 4, 5, 6], "labels": [-100, -100, 3, 4, 5, 6], "id": 7},
        {"input_ids": [8, 9], "labels": [-100, 9], "id": 8},
    ]
    start = SFTCollate(pad_token_id=99, max_length=4)(examples)
    assert start["input_ids"].tolist() == [[1, 2, 3, 4], [8, 9, 99, 99]]
    assert start["labels"].tolist() == [[-100, -100, 3, 4], [-100, 9, -100, -100]]
    assert start["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert start["id"].tolist() == [7, 8]
    end = SFTCollate(pad_token_id=0, max_length=3, truncation_mode="keep_end")(examples)
    assert end["input_ids"].tolist() == [[4, 5, 6], [8, 9, 0]]
    assert end["labels"].tolist() == [[4, 5, 6], [-100, 9, -100]]
    whole = SFTCollate()(examples)
    assert whole["input_ids"].shape == (2, 6)
    with pytest.raises(ValueError, match="truncation_mode"):
        SFTCollate(max_length=3, truncation_mode="middle")


def test_options_that_change_the_training_loss_or_data_are_refused(tmp_path):
    """Refused before anything is built (no model is even needed), each with a message that names the option."""
    from trl import SFTConfig

    from gradmix.integrations.trl import MixingSFTTrainer

    data = {"a": [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}] * 4}

    def config(**kwargs):
        return SFTConfig(output_dir=str(tmp_path / "run"), max_steps=2, use_cpu=True, report_to="none", **kwargs)

    cases = [
        ({"args": config(padding_free=True)}, "padding_free"),
        ({"args": config(loss_type="dft")}, "loss_type='dft'"),
        ({"args": config(label_smoothing_factor=0.1)}, "label_smoothing_factor"),
        ({"args": config(assistant_only_loss=True)}, "assistant_only_loss"),
        ({"args": config(), "compute_loss_func": lambda *a, **k: 0.0}, "compute_loss_func"),
        ({"args": config(), "train_dataset": data["a"]}, "train_dataset"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            MixingSFTTrainer(model=None, domains=data, **kwargs)
    raw = {"chat": [{"prompt": "hi", "completion": "there"}] * 4}
    with pytest.raises(ValueError, match=r"domain 'chat'.*tokenized SFT examples.*\['completion', 'prompt'\]"):
        MixingSFTTrainer(model=None, args=config(), domains=raw)
    with pytest.raises(ValueError, match="packing=True needs max_length"):
        MixingSFTTrainer(model=None, args=config(packing=True, max_length=None), domains=data)
    assert not (tmp_path / "run").exists()  # nothing was built: no run folder, no lock


def test_an_moe_router_loss_is_refused_and_the_run_folder_released(tmp_path):
    """An MoE model whose router auxiliary loss SFTTrainer would add: refused once the trainer exists (the flag is
    SFTTrainer's), with the Mixer's lock on the folder released, so a corrected trainer can use it at once."""
    from tokenizers import Tokenizer, models
    from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast
    from trl import SFTConfig

    from gradmix.integrations.trl import MixingSFTTrainer

    words = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<eos>": 2, "<pad>": 3}, unk_token="a"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<eos>", pad_token="<pad>")
    config = MixtralConfig(
        vocab_size=4,
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=2,
        num_experts_per_tok=1,
    )
    assert config.router_aux_loss_coef > 0
    data = {"a": [{"input_ids": [0, 1, 2], "labels": [-100, 1, 2]}] * 4}
    out = tmp_path / "run"

    def config_for(**kwargs):
        return SFTConfig(output_dir=str(out), max_steps=1, use_cpu=True, report_to="none", bf16=False, **kwargs)

    with pytest.raises(ValueError, match=r"router auxiliary loss.*router_aux_loss_coef=0.0"):
        MixingSFTTrainer(model=MixtralForCausalLM(config), args=config_for(), processing_class=tokenizer, domains=data)
    trainer = MixingSFTTrainer(
        model=MixtralForCausalLM(config),
        args=config_for(router_aux_loss_coef=0.0),
        processing_class=tokenizer,
        domains=data,
    )
    assert not trainer.aux_loss_enabled
