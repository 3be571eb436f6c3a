"""Distributed evaluation: every rank scores its share of the windows and keeps span candidates;
the candidates (never logits) are gathered to rank zero, which decodes, scores and writes the
prediction files while the other ranks wait at one barrier."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from qa_dist.config import EvalConfig, RunConfig
from qa_dist.eval.candidates import Candidates, candidates_from_logits
from qa_dist.eval.diagnostics import (
    Curve,
    Table,
    diagnostics,
    null_odds_histograms,
    null_threshold_curve,
    prediction_probability,
)
from qa_dist.eval.hooks import PeriodicEvaluator
from qa_dist.eval.postprocess import Predictions, WindowOffsets, decode
from qa_dist.features.batches import FeatureColumns, eval_plan
from qa_dist.features.prepare import prepare_features
from qa_dist.metrics import null_answer_competes, resolve_metric, score, tune_threshold
from qa_dist.runtime.dist import DistContext
from qa_dist.runtime.fsutil import atomic_write
from qa_dist.runtime.preemption import check_stop
from qa_dist.runtime.report import SILENT, Reporter

Forward = Callable[[dict], torch.Tensor]
"""A batch of padded windows to ``[2, windows, length]`` start/end logits (on any device)."""


@dataclass
class EvalData:
    """The evaluation windows as every rank sees them (memory-mapped), and the examples."""

    features: pa.Table
    examples_table: pa.Table
    columns: FeatureColumns = field(init=False)
    offsets: WindowOffsets = field(init=False)
    cls_index: np.ndarray = field(init=False)
    window_example: np.ndarray = field(init=False)
    _examples: list[dict] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.columns = FeatureColumns.from_table(self.features)
        self.offsets = WindowOffsets.from_arrow(self.features.column("offset_mapping"))
        self.window_example = self.columns.scalars["example_index"].astype(np.int64)
        cls = self.columns.scalars.get("cls_index")
        self.cls_index = np.zeros(len(self.offsets), np.int64) if cls is None else cls.astype(np.int64)

    @property
    def examples(self) -> list[dict]:
        if self._examples is None:
            self._examples = self.examples_table.to_pylist()
        return self._examples


@torch.no_grad()
def rank_candidates(
    forward: Forward,
    data: EvalData,
    dist: DistContext,
    config: EvalConfig,
    pad_token_id: int,
    progress: bool = False,
) -> Candidates:
    """This rank's span candidates. Every rank calls this, with the same number of forwards."""
    plan = eval_plan(
        data.columns.lengths, batch_size=config.per_device_batch_size, world_size=dist.world_size, rank=dist.rank
    )
    parts = []
    if progress:
        plan = tqdm(plan, desc="evaluating", unit="batch", mininterval=0.5, file=sys.stderr)
    for windows, padding in plan:
        batch = data.columns.batch(windows, pad_token_id)
        logits = forward(batch)
        # In training: all ranks agree, batch by batch, whether one was signalled (preemption, or
        # the launcher ending the job because a rank died) and then stop together.
        check_stop(logits.device)
        if padding:  # a repeat that kept this rank in step with the others' collectives
            continue
        device = logits.device
        width = logits.shape[-1]
        parts.append(
            candidates_from_logits(
                windows,
                logits[0],
                logits[1],
                torch.from_numpy(data.offsets.context_mask(windows, width)).to(device),
                batch["attention_mask"].to(device),
                torch.from_numpy(data.cls_index[windows]).to(device),
                n_best=config.n_best_size,
                max_answer_length=config.max_answer_length,
            )
        )
    return Candidates.concat(parts) if parts else Candidates.empty(config.n_best_size)


def write_json(path: Path, value) -> None:
    """Whole or not at all: a reader never sees half a file."""
    atomic_write(path, json.dumps(value, ensure_ascii=False, indent=2))


def write_predictions(out_dir: Path, predictions: Predictions, with_null_odds: bool) -> None:
    write_json(out_dir / "predictions.json", predictions.answers)
    write_json(out_dir / "nbest_predictions.json", dict(predictions.nbest))
    if with_null_odds:
        write_json(out_dir / "null_odds.json", predictions.null_odds)


def _numbers(prefix: str, values: dict) -> dict:
    return {f"{prefix}{k}": v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


COLUMNS = ["id", "question", "predicted", "probability", "gold"]


def finish_on_main(
    data: EvalData,
    gathered: Candidates,
    config: EvalConfig,
    out_dir: Path | None,
    *,
    labelled: bool = True,
) -> tuple[dict, Predictions, dict]:
    """Rank zero: decode, score, diagnose, write the files (unless ``out_dir`` is None); returns the
    result (``metric``, ``raw`` / ``tuned`` / ``diagnostics`` with gold answers, timings), the
    predictions, and what a dashboard shows besides scalars (``dashboard``: Tables, Curves,
    Histograms by name, for the caller to hand to its tracker)."""
    examples = data.examples
    metric = resolve_metric(examples, config.metric)
    version_2 = null_answer_competes(examples, metric)
    started = time.perf_counter()
    predictions = decode(
        gathered,
        data.offsets,
        data.window_example,
        [ex["id"] for ex in examples],
        [ex["context"] for ex in examples],
        n_best_size=config.n_best_size,
        version_2_with_negative=version_2,
        null_score_diff_threshold=config.null_score_diff_threshold,
    )
    seconds = time.perf_counter() - started
    if out_dir is not None:
        write_predictions(out_dir, predictions, with_null_odds=version_2)
    result: dict = {"metric": metric, "postprocess_seconds": seconds, "questions": len(examples)}
    dashboard: dict = {}
    if labelled:
        result["raw"] = score(
            examples, predictions.answers, na_probs=predictions.null_odds if version_2 else None, metric=metric
        )
        if config.tune_threshold and version_2:
            result["tuned"] = tune_threshold(examples, predictions.span_answers, predictions.null_odds, metric=metric)
        diag, wrong = diagnostics(examples, predictions.answers, predictions.nbest, metric)
        result["diagnostics"] = diag
        dashboard["confident_wrong"] = Table(COLUMNS, wrong)
        recall = diag["recall_at_k"]
        dashboard["eval/gold_recall_at_k"] = Curve(
            "k", list(range(1, len(recall) + 1)), {"recall": recall}, "gold answer within the first k of the n best (%)"
        )
        if version_2:
            dashboard["eval/null_threshold"] = null_threshold_curve(
                examples, predictions.span_answers, predictions.null_odds, metric
            )
            for name, histogram in null_odds_histograms(examples, predictions.null_odds).items():
                dashboard[f"eval/null_odds_{name}"] = histogram
        rows = [
            [
                ex["id"],
                ex["question"],
                predictions.answers[ex["id"]],
                prediction_probability(predictions.nbest[ex["id"]], predictions.answers[ex["id"]]),
                " | ".join(ex["answers"]["text"]) or "(unanswerable)",
            ]
            for ex in examples[:8]
        ]
        dashboard["sample_predictions"] = Table(COLUMNS, rows)
    return result, predictions, dashboard


@dataclass(frozen=True)
class EvalResult:
    """What rank zero gets from one evaluation."""

    metrics: dict
    """As in metrics.json: ``metric``, ``raw`` / ``tuned`` / ``diagnostics`` with gold answers, timings."""
    predictions: Predictions
    dashboard: dict = field(default_factory=dict)
    """Tables, Curves and Histograms by name (qa_dist.eval.diagnostics), for a tracker to show."""


def flat_metrics(result: dict) -> dict:
    """``eval/...`` scalars for a tracker."""
    flat = _numbers("eval/", {k: v for k, v in result.items() if not isinstance(v, dict)})
    for section in ("raw", "tuned", "diagnostics"):
        if section in result:
            flat.update(_numbers("eval/tuned_" if section == "tuned" else "eval/", result[section]))
    return flat


def evaluate(
    forward: Forward,
    data: EvalData,
    dist: DistContext,
    config: EvalConfig,
    out_dir: Path | None,
    *,
    pad_token_id: int,
    labelled: bool = True,
    report: Reporter = SILENT,
) -> EvalResult | None:
    """One evaluation. Every rank calls this; rank zero returns the result, the others None.
    ``report``: this rank's reporter (rank zero's shows the progress)."""
    started = time.perf_counter()
    local = rank_candidates(forward, data, dist, config, pad_token_id, progress=report.shows_progress)
    forward_seconds = time.perf_counter() - started
    # The only transfer of the evaluation: span candidates, to rank zero.
    parts = dist.gather_to_main(local)
    result = None
    if parts is not None:
        gathered = Candidates.concat(parts)
        metrics, predictions, dashboard = finish_on_main(data, gathered, config, out_dir, labelled=labelled)
        metrics["forward_seconds"] = forward_seconds
        metrics["gathered_bytes_per_window"] = gathered.nbytes / max(len(gathered), 1)
        if out_dir is not None:
            write_json(out_dir / "metrics.json", metrics)
        result = EvalResult(metrics, predictions, dashboard)
    # Rank zero post-processes while the others wait here, once.
    dist.barrier()
    return result


class GatheredEvaluator(PeriodicEvaluator):
    """The training loop's evaluator: the full gathered evaluation of ``data.eval`` every
    ``eval.every`` steps and at the end, files under ``run_dir/eval/step_N``. It holds no tracker:
    ``run`` returns the ``eval/`` scalars and the dashboard's tables, curves and histograms, which
    the loop hands to its tracker."""

    def __init__(
        self,
        config: RunConfig,
        tokenizer,
        dist: DistContext,
        forward: Callable[[object, dict], torch.Tensor],
        report: Reporter = SILENT,
    ) -> None:
        super().__init__(config.eval.every)
        self.config, self.tokenizer, self.dist = config, tokenizer, dist
        self.forward, self.report = forward, report
        self.data: EvalData | None = None

    def run(self, step: int, model) -> dict | None:
        if self.data is None:  # every rank opens the shared cache entry, once
            entry = prepare_features(self.config.data, self.tokenizer, self.dist, roles=("eval",))["eval"].entry
            self.data = EvalData(entry.table("features"), entry.table("examples"))
        result = evaluate(
            lambda batch: self.forward(model, batch),
            self.data,
            self.dist,
            self.config.eval,
            Path(self.config.run_dir) / "eval" / f"step_{step}",
            pad_token_id=self.tokenizer.pad_token_id or 0,
            report=self.report,
        )
        return {**flat_metrics(result.metrics), **result.dashboard} if result is not None else None
