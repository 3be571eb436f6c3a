"""Evaluation: rank-local span candidates, their gather, rank-zero post-processing and files."""

from qa_dist.eval.candidates import Candidates, candidates_from_logits
from qa_dist.eval.postprocess import Predictions, WindowOffsets, decode, postprocess

__all__ = ["Candidates", "Predictions", "WindowOffsets", "candidates_from_logits", "decode", "postprocess"]
