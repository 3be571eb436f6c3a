"""Trackers (issue 12 parts 2, 3): logging.trackers as a list, TensorBoard event files and the
offline wandb record log read back after a real run (scalars, the null-threshold and recall@k
curves, null odds histograms, the run's config and summary); the curves' numbers against
qa_dist.metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import small_run_overrides
from tensorboard_log import scalar_steps, tensorboard_events
from wandb_log import config, history, history_keys, summary

from qa_dist.config import load_config
from qa_dist.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


# --- configuration -----------------------------------------------------------------------------


def test_trackers_is_a_list_of_known_names():
    assert load_config(None, []).logging.trackers == []
    both = load_config(None, ["logging.trackers=[wandb,tensorboard]"]).logging
    assert both.trackers == ["wandb", "tensorboard"]
    assert load_config(None, ["logging.trackers=tensorboard"]).logging.trackers == ["tensorboard"]
    with pytest.raises(ConfigError, match=r"logging.trackers\[1\]: 'mlflow' is not one of 'wandb', 'tensorboard'"):
        load_config(None, ["logging.trackers=[tensorboard,mlflow]"])
    with pytest.raises(ConfigError, match="logging.trackers: expected a list"):
        load_config(None, ["logging.trackers={a: 1}"])


def test_wandb_is_on_with_a_project_or_when_listed():
    from qa_dist.config import LoggingConfig
    from qa_dist.train.tracking import wandb_wanted

    assert not wandb_wanted(LoggingConfig(wandb_mode="offline"))
    assert wandb_wanted(LoggingConfig(wandb_project="p", wandb_mode="offline"))  # as before trackers existed
    assert wandb_wanted(LoggingConfig(trackers=["wandb"], wandb_mode="offline"))
    assert not wandb_wanted(LoggingConfig(trackers=["tensorboard"], wandb_mode="offline"))
    assert not wandb_wanted(LoggingConfig(trackers=["wandb"], wandb_mode="disabled"))


def test_keep_best_syntax():
    from qa_dist.train.best import parse_keep_best

    assert load_config(None, ["train.keep_best=eval/f1", "data.eval=dev.json"]).train.keep_best == "eval/f1"
    # Without data.eval only a custom evaluator (passed to train) can give the metric: the config
    # alone is valid; qa-dist launch and train without such an evaluator refuse it.
    alone = load_config(None, ["train.keep_best=eval/f1"])
    with pytest.raises(ConfigError, match=r"^train.keep_best: 'eval/f1' needs data.eval"):
        alone.check_keep_best()
    assert parse_keep_best("eval/f1") == ("max", "eval/f1")
    assert parse_keep_best("min:eval/loss") == ("min", "eval/loss")
    assert parse_keep_best("max:eval/F1") == ("max", "eval/F1")
    for bad in ("f1", "best:eval/f1", "eval/"):
        with pytest.raises(ConfigError, match="train.keep_best"):
            load_config(None, [f"train.keep_best={bad}", "data.eval=dev.json"])


def test_qa_dist_config_takes_a_list_override():
    done = subprocess.run(
        [sys.executable, "-m", "qa_dist", "config", "logging.trackers=[wandb,tensorboard]"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "trackers:\n  - wandb\n  - tensorboard" in done.stdout


# --- the curves --------------------------------------------------------------------------------


def _v2_examples():
    texts = [["Paris"], [], ["the Loire"], [], ["1998"], ["blue"]]
    return [
        {"id": str(i), "question": f"q{i}", "context": "c", "answers": {"text": t}, "is_impossible": not t}
        for i, t in enumerate(texts)
    ]


def test_null_threshold_curve_is_score_of_the_thresholded_answers():
    from qa_dist.eval.diagnostics import null_threshold_curve
    from qa_dist.metrics import score, tune_threshold

    examples = _v2_examples()
    spans = {"0": "Paris", "1": "Lyon", "2": "Loire", "3": "x", "4": "1999", "5": "blue sky"}
    odds = {"0": -2.0, "1": 1.5, "2": 0.5, "3": -1.0, "4": 0.5, "5": 3.0}
    curve = null_threshold_curve(examples, spans, odds, "squad_v2")
    assert curve.xs[0] < min(odds.values()) and curve.xs[1:] == sorted(set(odds.values()))
    for i, t in enumerate(curve.xs):
        applied = {q: ("" if odds[q] > t else spans[q]) for q in spans}
        expected = score(examples, applied, metric="squad_v2")
        assert curve.ys["EM"][i] == pytest.approx(expected["exact"])
        assert curve.ys["F1"][i] == pytest.approx(expected["f1"])
    tuned = tune_threshold(examples, spans, odds, metric="squad_v2")
    assert max(curve.ys["F1"]) == pytest.approx(tuned["f1"])
    # Subsampled to about ``points`` thresholds, ends included.
    few = null_threshold_curve(examples, spans, odds, "squad_v2", points=2)
    assert few.xs[1:] == [-2.0, 3.0]


def test_null_threshold_curve_cmrc_keys():
    from qa_dist.eval.diagnostics import null_threshold_curve
    from qa_dist.metrics import score

    examples = [
        {"id": "a", "question": "q", "context": "c", "answers": {"text": ["北京"]}},
        {"id": "b", "question": "q", "context": "c", "answers": {"text": []}, "is_impossible": True},
    ]
    spans, odds = {"a": "北京市", "b": "上海"}, {"a": 0.0, "b": 1.0}
    curve = null_threshold_curve(examples, spans, odds, "cmrc")
    top = score(examples, spans, metric="cmrc")
    assert curve.ys["F1"][-1] == pytest.approx(top["F1"]) and curve.ys["EM"][-1] == pytest.approx(top["EM"])


def test_recall_at_k_from_gold_ranks():
    from qa_dist.eval.diagnostics import diagnostics, recall_at_k

    assert recall_at_k([1, 3, 3], 4, 4) == [25.0, 25.0, 75.0, 75.0]
    examples = [
        {"id": "1", "question": "q1", "answers": {"text": ["Paris"]}},
        {"id": "2", "question": "q2", "answers": {"text": ["the Loire"]}},
        {"id": "3", "question": "q3", "answers": {"text": []}},
    ]
    nbest = {
        "1": [{"text": "Paris", "probability": 0.9}, {"text": "x", "probability": 0.1}],
        "2": [{"text": "Seine", "probability": 0.8}, {"text": "Loire", "probability": 0.2}],
        "3": [{"text": "Lyon", "probability": 0.6}, {"text": "", "probability": 0.4}],
    }
    metrics, _ = diagnostics(examples, {"1": "Paris", "2": "Seine", "3": "Lyon"}, nbest, "squad_v2")
    assert metrics["recall_at_k"] == [50.0, 100.0]
    assert metrics["recall_at_k"][0] == metrics["gold_top1"] and metrics["recall_at_k"][-1] == metrics["gold_in_nbest"]


# --- a real run --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_model):
    """8 steps on one process, evaluated every 4, logged to wandb (offline) and TensorBoard."""
    pytest.importorskip("tensorboard")
    root = tmp_path_factory.mktemp("tracked")
    run_dir = root / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "qa_dist",
            "train",
            "--config",
            str(REPO / "configs" / "runs" / "cpu_sample_en.yaml"),
            *small_run_overrides(
                tiny_model,
                run_dir,
                root / "cache",
                "train.max_steps=8",
                "eval.every=4",
                "train.keep_best=eval/f1",
                "logging.trackers=[wandb,tensorboard]",
            ),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return run_dir, done


@pytest.mark.slow
def test_tensorboard_gets_what_wandb_gets(tracked_run):
    run_dir, _ = tracked_run
    events = tensorboard_events(run_dir / "tensorboard")
    tags = events.Tags()
    assert scalar_steps(events, "loss") == [2, 4, 6, 8]
    assert scalar_steps(events, "eval/f1") == [4, 8] and scalar_steps(events, "eval/exact") == [4, 8]
    assert {"eval/gold_top1", "eval/gold_in_nbest", "eval/NoAns_f1"} <= set(tags["scalars"])
    assert {"eval/null_odds_answerable", "eval/null_odds_unanswerable"} <= set(tags["histograms"])
    histogram = events.Histograms("eval/null_odds_unanswerable")
    assert [h.step for h in histogram] == [4, 8] and histogram[0].histogram_value.num == 54
    assert {"config/text_summary", "sample_predictions/text_summary", "summary/text_summary"} <= set(tags["tensors"])
    (best,) = events.Scalars("summary/best_eval_f1")
    f1 = {e.step: e.value for e in events.Scalars("eval/f1")}
    assert best.value == pytest.approx(max(f1.values())) and f1[best.step] == pytest.approx(best.value)


@pytest.mark.slow
def test_wandb_gets_the_curves_histograms_config_and_summary(tracked_run):
    run_dir, done = tracked_run
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    keys = history_keys(log)
    for name in ("eval/null_threshold_EM_table", "eval/null_threshold_F1_table", "eval/gold_recall_at_k_table"):
        assert f"{name}/_type" in keys, name
    assert {"eval/null_odds_answerable/_type", "sample_predictions/_type", "confident_wrong/_type"} <= keys
    cfg = config(log)
    assert {"_wandb/visualize/eval/null_threshold_F1", "_wandb/visualize/eval/gold_recall_at_k"} <= set(cfg)
    assert cfg["run"] == {"world_size": 1, "distributed_type": "NO", "effective_batch_size": 8, "parameters": 1010370}
    assert cfg["train"]["keep_best"] == "eval/f1"
    # The curve's table: one row per threshold, EM and F1 in percent, the last at the highest odds.
    rows = history(log)
    (path,) = [row["eval/null_threshold_F1_table/path"] for row in rows if row["_step"] == 8]
    table = json.loads((log.parent / "files" / path).read_text())
    assert table["columns"] == ["null threshold", "EM", "F1"] and 2 <= len(table["data"]) <= 51
    thresholds = [row[0] for row in table["data"]]
    assert thresholds == sorted(thresholds)
    metrics = json.loads((run_dir / "eval" / "step_8" / "metrics.json").read_text())["raw"]
    assert max(row[2] for row in table["data"]) == pytest.approx(metrics["best_f1"])  # the official search's best
    f1 = {row["_step"]: row["eval/f1"] for row in rows if "eval/f1" in row}
    assert list(f1) == [4, 8]
    end = summary(log)
    best_step = max(f1, key=lambda s: (f1[s], -s))
    assert end["best_eval_f1"] == pytest.approx(f1[best_step]) and end["best_eval_f1_step"] == best_step
    assert end["final_eval_f1"] == pytest.approx(f1[8]) and end["final_eval_f1_step"] == 8
    assert end["model_dir"] == str(run_dir / "model") and end["best_model_dir"] == str(run_dir / "best")
    # The same, printed on rank zero.
    table_text = done.stderr[done.stderr.index("== run summary") :]
    assert f"best eval F1          {f1[best_step]:.2f} at step {best_step}" in table_text
    assert f"model                 {run_dir / 'model'}" in table_text


def test_the_evaluator_returns_its_tables_and_holds_no_tracker():
    import inspect

    from qa_dist.eval import evaluator

    assert "tracker" not in inspect.signature(evaluator.GatheredEvaluator.__init__).parameters
    assert "tracker" not in inspect.signature(evaluator.evaluate).parameters
    assert "log_table" not in inspect.getsource(evaluator)
