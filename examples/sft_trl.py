"""TRL's SFTTrainer on three instruction sources whose mix changes while it trains: a random-init tiny Llama, PiKE.

    python examples/sft_trl.py --out runs/sft --steps 20                  # a run, checkpoint every 5 steps
    python examples/sft_trl.py --out runs/sft --steps 20 --stop-at 10     # ... "killed" right after checkpoint 10
    python examples/sft_trl.py --out runs/sft --steps 20 --resume         # continues from the newest checkpoint
    python examples/sft_trl.py --out runs/sft --steps 20 --method dga     # DGA toward held-out "explain" examples

The three sources are instruction / response pairs built from text on this machine, nothing downloaded:
``explain`` asks what a standard-library function does and answers with the first sentence of its docstring
(``inspect.getdoc`` of installed Python modules), ``continue`` asks to continue a sentence of the Python tutorial and
``code`` to complete a line of standard-library code (both from the repo's tiny corpus, src/gradmix_kit/data/tiny).
Every 8th ``explain`` pair is held out as the DGA target set. A byte-level BPE tokenizer is trained on the pairs
(``tokenizers``) and wrapped as a ``PreTrainedTokenizerFast``; prompts are masked (labels -100), so each example's
loss is its mean token loss over the response and the end-of-text token. The model is a ``LlamaForCausalLM`` built
from a config (2 layers, hidden size 48; attention dropout ``--dropout``, default 0.1), trained by
``MixingSFTTrainer`` with gradient accumulation 2 and SFTConfig's default gradient checkpointing.

Everything is deterministic (seeds, CPU, no dataloader workers; the Trainer restores the RNG that dropout draws
from), so the weights and loss rows in ``OUT/metrics.jsonl`` of a stopped-and-resumed run equal an uninterrupted
run's exactly. A second run on a used ``--out`` is refused unless ``--resume`` or ``--overwrite`` says what to do.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tokenizer and model are built here: never ask the hub
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL pings its usage unless told not to

import argparse
import importlib
import inspect
import warnings
from pathlib import Path

import numpy as np
import torch
from _trainer_callbacks import SlowDown, StopAt
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig

from gradmix.distributed import default_timeout
from gradmix.integrations.hf import last_checkpoint
from gradmix.integrations.trl import MixingSFTTrainer
from gradmix.methods.pike import PiKE

TINY = Path(__file__).resolve().parents[1] / "src" / "gradmix_kit" / "data" / "tiny"
MODULES = (  # standard-library modules whose functions' docstrings make the "explain" source
    "base64 bisect calendar collections copy csv datetime difflib fnmatch fractions functools glob heapq html "
    "ipaddress itertools json operator os.path pathlib random re shutil statistics string textwrap urllib.parse"
)
END, PAD = "<|endoftext|>", "<|pad|>"
MAX_LENGTH = 64  # SFTConfig(max_length=...): longer examples are cut (keep_start)
SAVE_STEPS = 5


def _words(text: str, limit: int) -> str:
    return " ".join(text.split()[:limit])


def _documents(name: str) -> list[str]:
    text = (TINY / f"{name}.txt").read_text(encoding="utf-8")
    return [doc.strip() for doc in text.split("\n<|doc|>\n") if doc.strip()]


def explain_pairs() -> list[tuple[str, str]]:
    """'What does json.dumps do?' -> the first sentence of its docstring."""
    pairs = []
    for module_name in MODULES.split():
        module = importlib.import_module(module_name)
        for name in sorted(dir(module)):
            obj = getattr(module, name)
            doc = inspect.getdoc(obj) if not name.startswith("_") and callable(obj) else None
            if not doc:
                continue
            first = " ".join(doc.split("\n\n")[0].split()).split(". ")[0].rstrip(".")
            if len(first.split()) >= 3 and not first.startswith(name + "("):
                pairs.append((f"What does {module_name}.{name} do?", _words(first, 24) + "."))
    return pairs


def continue_pairs() -> list[tuple[str, str]]:
    """'Continue the text: <six words of a tutorial sentence>' -> its next (up to) twelve words."""
    pairs = []
    for doc in _documents("docs"):
        for sentence in " ".join(doc.split()).split(". "):
            words = sentence.split()
            if len(words) >= 10 and not any(ch in sentence for ch in "<>{}$|=()"):
                pairs.append((f"Continue the text: {' '.join(words[:6])}", " ".join(words[6:18])))
    return pairs


def code_pairs() -> list[tuple[str, str]]:
    """'Complete the Python line: <its first half>' -> the rest of a standard-library source line."""
    pairs = []
    for doc in _documents("code"):
        for line in doc.splitlines():
            words = line.strip().split(" ")
            if len(words) >= 4 and not line.strip().startswith("#"):
                half = len(words) // 2
                pairs.append((f"Complete the Python line: {' '.join(words[:half])}", " ".join(words[half:])))
    return pairs


def prompt_text(instruction: str) -> str:
    return f"### Instruction:\n{instruction}\n### Response:\n"


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocabulary 1024) trained on the sources' text; deterministic, nothing loaded."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        min_frequency=2,
        special_tokens=[END, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=END, pad_token=PAD)


def sft_example(tokenizer: PreTrainedTokenizerFast, instruction: str, response: str) -> dict[str, list[int]]:
    """Prompt and response tokenized apart and joined, the end-of-text id last; labels -100 on the prompt."""
    prompt = tokenizer(prompt_text(instruction), add_special_tokens=False)["input_ids"]
    answer = [*tokenizer(response, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}


def load_sources() -> tuple[PreTrainedTokenizerFast, dict[str, list[dict]], list[dict]]:
    """The tokenizer, {source: SFT examples}, and the DGA target set (every 8th ``explain`` pair, held out)."""
    explain = explain_pairs()
    pairs = {
        "explain": [p for i, p in enumerate(explain) if i % 8],
        "continue": continue_pairs(),
        "code": code_pairs(),
    }
    held_out = explain[::8]
    texts = [prompt_text(q) + a for source in pairs.values() for q, a in source]
    tokenizer = build_tokenizer(texts)
    sources = {name: [sft_example(tokenizer, q, a) for q, a in items] for name, items in pairs.items()}
    target = [sft_example(tokenizer, q, a) for q, a in held_out]
    return tokenizer, sources, target


def main(argv: list[str] | None = None) -> MixingSFTTrainer:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output dir: Trainer checkpoints and metrics.jsonl")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--stop-at", type=int, default=None, help="exit right after the checkpoint at this step")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    parser.add_argument("--overwrite", action="store_true", help="start over, deleting the run already in --out")
    parser.add_argument("--method", default="pike", help="uniform, pike, fair_pike, dga (toward the target), odm, ...")
    parser.add_argument(
        "--pike-variant",
        default="gradmix",
        choices=PiKE.variants,
        help="PiKE's variant (the resume tests use gradmix_v1, whose weights move within a few steps here; the default "
        "keeps the even split until its statistics tell the sources apart)",
    )
    parser.add_argument("--grad-accum", type=int, default=2, help="gradient_accumulation_steps")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per optimizer step (all processes)")
    parser.add_argument("--update-every", type=int, default=2, help="steps between weight updates")
    parser.add_argument("--dropout", type=float, default=0.1, help="Llama's attention dropout")
    parser.add_argument("--no-gradient-checkpointing", action="store_true", help="turn SFTConfig's default off")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for this tiny model)")
    parser.add_argument("--step-delay", type=float, default=0.0, help="sleep this long after every step (tests)")
    args = parser.parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    if args.batch_size % (args.grad_accum * world_size):
        parser.error("--batch-size must be divisible by --grad-accum x the number of processes")
    warnings.filterwarnings("ignore", category=UserWarning, module="gradmix")  # keep the demo's output short

    torch.set_num_threads(args.threads)
    tokenizer, sources, target = load_sources()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_LENGTH,
        attention_dropout=args.dropout,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        use_cache=False,
    )
    model = LlamaForCausalLM(config)

    per_device = args.batch_size // (args.grad_accum * world_size)
    sft_args = SFTConfig(
        output_dir=args.out,
        max_steps=args.steps,
        max_length=MAX_LENGTH,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=args.grad_accum,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        learning_rate=3e-3,
        warmup_steps=0,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        bf16=False,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        log_level="error",
        ddp_timeout=int(default_timeout().total_seconds()),
    )
    resume = last_checkpoint(args.out) if args.resume else None
    if args.resume and resume is None:
        print(f"no complete checkpoint in {args.out}: starting over", flush=True)  # killed before the first one
    mixer_options: dict = {"update_every": args.update_every}
    if args.method in ("dga", "doge"):
        mixer_options["target"] = target
    method_params: dict[str, object] = {"min_weight": 0.05} if args.method in ("pike", "fair_pike") else {}
    if args.method == "pike":
        method_params["variant"] = args.pike_variant
    trainer = MixingSFTTrainer(
        model=model,
        args=sft_args,
        processing_class=tokenizer,
        domains=sources,
        method=args.method,
        method_params=method_params,
        mixer_options=mixer_options,
        overwrite=args.overwrite or (args.resume and resume is None),
    )
    if args.stop_at is not None:
        trainer.add_callback(StopAt(args.stop_at))
    if args.step_delay > 0:
        trainer.add_callback(SlowDown(args.step_delay))

    sizes = {name: len(examples) for name, examples in sources.items()}
    print(
        f"sources {sizes} examples (target {len(target)}); vocabulary {len(tokenizer)}; method {args.method}; "
        f"resume from {resume or 'scratch'}",
        flush=True,
    )
    trainer.train(resume_from_checkpoint=resume)
    names = trainer.mixer.domains.names
    print("final weights", dict(zip(names, np.round(trainer.mixer.weights, 4).tolist())), flush=True)
    return trainer


if __name__ == "__main__":
    main()
