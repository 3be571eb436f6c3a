"""Run by torchrun in the multi-process tests: every rank prepares the features of a config and
reports what it saw (whether it tokenized, and a hash of the features it memory-mapped)."""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import time

import torch.distributed as dist

import qa_dist.features.windows
from qa_dist.config import load_config
from qa_dist.features.prepare import prepare_features
from qa_dist.models import load_tokenizer
from qa_dist.runtime.dist import current_context

parser = argparse.ArgumentParser()
parser.add_argument("--config")
parser.add_argument("--out")
parser.add_argument("--pg-timeout", type=float, default=60.0)
parser.add_argument("--slow-build", type=float, default=0.0, help="seconds the builder sleeps before tokenizing")
parser.add_argument("--simulate-nodes", action="store_true", help="each rank acts as local rank 0 of its own node")
parser.add_argument(
    "--per-rank-cache",
    action="store_true",
    help="each rank gets its own cache dir (node-local disks)",
)
parser.add_argument("overrides", nargs="*")
args = parser.parse_args()

if args.simulate_nodes:
    os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"] = "0", "1"
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.pg_timeout))
ctx = current_context()
assert ctx.world_size == 2 == dist.get_world_size(), ctx

calls = {"tokenize": 0}
original = qa_dist.features.windows.tokenize_texts


def counting_tokenize(backend, texts, offsets=True):
    calls["tokenize"] += 1
    if args.slow_build:
        time.sleep(args.slow_build)
    return original(backend, texts, offsets)


qa_dist.features.windows.tokenize_texts = counting_tokenize  # the name the window builder calls
overrides = list(args.overrides)
if args.per_rank_cache:
    overrides.append(f"data.cache_dir={args.out}/cache-rank{ctx.rank}")
config = load_config(args.config, overrides)
started = time.monotonic()
prepared = prepare_features(config.data, load_tokenizer(config.model), ctx)
report = {
    "rank": ctx.rank,
    "tokenize_calls": calls["tokenize"],
    "seconds": time.monotonic() - started,
}
for role, split in prepared.items():
    table = split.entry.table("features")
    digest = hashlib.sha256()
    for name in table.column_names:
        digest.update(json.dumps(table.column(name).to_pylist()).encode())
    report[role] = {
        "key": split.entry.key,
        "built_here": split.entry.built_here,
        "rows": table.num_rows,
        "sha256": digest.hexdigest(),
        "path": str(split.entry.path),
    }
with open(os.path.join(args.out, f"rank{ctx.rank}.json"), "w") as f:
    json.dump(report, f)
dist.destroy_process_group()
