"""The ``qa-dist`` argument parser. Flag defaults and choices come from the config tree
(``qa_dist.config``), where they are stated once."""

from __future__ import annotations

import argparse
import math
import typing

from qa_dist.cli import commands as c
from qa_dist.config import DataConfig, EvalConfig, LaunchConfig


def _at_least(low: int):
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _finite_float(text: str) -> float:
    """An argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _choices(section: type, name: str) -> tuple[str, ...]:
    """The values a config field's ``Literal`` type allows: argparse choices stated once, in config.py."""
    return typing.get_args(typing.get_type_hints(section)[name])


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="run config YAML (see configs/runs/)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides of config keys, e.g. data.max_length=256 train.lr=3e-5",
    )


def _launch_default(key: str) -> str:
    """The default of a ``launch.*`` key as its flag's help shows it: stated once, in the config."""
    return f"{key}, default {getattr(LaunchConfig(), key.split('.', 1)[1])!r}"


def _add_launch(sub) -> None:
    p = sub.add_parser("launch", help="print and run the accelerate launch line of a run, or submit it to Slurm")
    _add_config_args(p)
    flag = {attr: f for attr, (f, _) in c.LAUNCH_FLAGS.items()}
    key = {attr: _launch_default(k) for attr, (_, k) in c.LAUNCH_FLAGS.items()}
    p.add_argument(
        flag["strategy"],
        choices=_choices(LaunchConfig, "strategy"),
        help=f"parallelism; auto picks the cheapest that fits in memory ({key['strategy']})",
    )
    p.add_argument(
        flag["gpus_per_node"],
        type=_at_least(1),
        help="processes per node (unset: the visible GPUs, 2 on CPU); required with --slurm where no GPU is visible "
        f"({key['gpus_per_node']})",
    )
    p.add_argument(flag["nodes"], type=_at_least(1), help=f"machines ({key['nodes']})")
    p.add_argument(
        flag["cpu"],
        action="store_const",
        const=True,
        help=f"CPU processes with gloo; automatic without GPUs ({key['cpu']})",
    )
    p.add_argument(
        flag["gpu_memory_gib"],
        type=_positive_float,
        help="memory per GPU for --strategy auto; 0: this machine's GPU; required where no GPU is visible "
        f"({key['gpu_memory_gib']})",
    )
    p.add_argument("--slurm", action="store_true", help="render slurm/train.sbatch for the run and submit it")
    p.add_argument(flag["partition"], help=f"Slurm partition ({key['partition']})")
    p.add_argument(flag["time"], help=f"Slurm time limit, e.g. 24:00:00 ({key['time']})")
    p.add_argument(flag["account"], help=f"Slurm account ({key['account']})")
    p.add_argument(
        flag["exclusive"],
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"whole nodes for the Slurm job ({key['exclusive']})",
    )
    p.add_argument(
        flag["cpus_per_task"],
        type=_at_least(1),
        help=f"CPUs of the one Slurm task per node (unset: 4 per GPU process) ({key['cpus_per_task']})",
    )
    p.add_argument("--dry-run", action="store_true", help="print the line or the script, run nothing")
    p.add_argument(
        flag["machine_rank"],
        type=_at_least(0),
        help=f"this machine's rank when started by hand ({key['machine_rank']})",
    )
    p.add_argument(flag["head"], help=f"head node address when started by hand ({key['head']})")
    p.add_argument(flag["port"], type=_at_least(1), help=f"rendezvous port on the head node ({key['port']})")
    p.add_argument("--no-check", action="store_true", help="skip the environment checks")
    p.set_defaults(func=c.cmd_launch)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="answer questions with a trained model (no gold answers needed)")
    p.add_argument("--model", "-m", required=True, help="model directory (e.g. RUN_DIR/model) or hub name")
    p.add_argument("--data", help="SQuAD-format questions to answer (answers optional)")
    p.add_argument("--question", help="one question (with --context)")
    p.add_argument("--context", help="the passage that answers --question")
    p.add_argument(
        "--output",
        "-o",
        help="directory for the prediction files (default ./predictions with --data; none for one question)",
    )
    p.add_argument("--allow-no-answer", action="store_true", help="SQuAD v2 style: answer empty when null wins")
    p.add_argument(
        "--null-threshold",
        type=_finite_float,
        help=f"null score minus span score above which no answer (default {EvalConfig.null_score_diff_threshold})",
    )
    p.add_argument(
        "--max-length",
        type=_at_least(8),
        help=f"window length in tokens (default: what the model directory records, else {DataConfig.max_length})",
    )
    p.add_argument(
        "--doc-stride",
        type=_at_least(0),
        help="overlap of consecutive windows in tokens (default: what the model directory records, else "
        f"{DataConfig.doc_stride})",
    )
    p.add_argument(
        "--n-best",
        type=_at_least(1),
        help=f"answers kept per question in nbest_predictions.json (default {EvalConfig.n_best_size})",
    )
    p.add_argument(
        "--max-answer-length",
        type=_at_least(1),
        help=f"longest answer in tokens (default {EvalConfig.max_answer_length})",
    )
    p.add_argument(
        "--batch-size",
        type=_at_least(1),
        help=f"windows per forward on each process (default {EvalConfig.per_device_batch_size})",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted data.*, eval.*, model.* overrides, e.g. eval.n_best_size=5 data.max_length=256 (a flag and "
        "an override of the same key: an error)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=c.cmd_predict)


def _add_run_commands(sub) -> None:
    p = sub.add_parser("prepare", help="build (or verify) the shared feature cache of a run config")
    _add_config_args(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=c.cmd_prepare)

    p = sub.add_parser(
        "train", help="train in whatever process group launched this (accelerate launch, torchrun, srun)"
    )
    _add_config_args(p)
    p.set_defaults(func=c.cmd_train)

    p = sub.add_parser(
        "evaluate",
        help="evaluate a model on data.eval in whatever process group launched this (model=DIR selects it)",
    )
    _add_config_args(p)
    p.add_argument("--output", "-o", help="directory for the prediction files (default RUN_DIR/eval/evaluate)")
    p.add_argument("--tune-threshold", action="store_true", help="SQuAD v2: also report at the best null threshold")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=c.cmd_evaluate)


def _add_tools(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on the shipped samples, offline, on 2 CPU processes")
    p.add_argument("--lang", choices=["en", "zh", "both"], default="both", help="which samples (default: both)")
    p.add_argument("--out", default="runs/demo", help="where the runs, cache and wandb files go (default: runs/demo)")
    p.add_argument("--processes", type=_at_least(1), default=2, help="training processes (default: 2)")
    p.set_defaults(func=c.cmd_demo)

    p = sub.add_parser("score", help="score a predictions file against data with gold answers")
    p.add_argument("--data", required=True, help="data with gold answers (any format qa-dist reads)")
    p.add_argument("--predictions", required=True, help="predictions.json: {question id: answer text}")
    p.add_argument("--na-probs", help="null_odds.json: {question id: no-answer score}")
    p.add_argument(
        "--metric",
        default=EvalConfig.metric,
        choices=_choices(EvalConfig, "metric"),
        help=f"metric family; auto: CMRC for Chinese, SQuAD v2 with unanswerables (default: {EvalConfig.metric})",
    )
    p.set_defaults(func=c.cmd_score)

    p = sub.add_parser("config", help="print the resolved run config (or every valid key)")
    _add_config_args(p)
    p.add_argument("--keys", action="store_true", help="list every valid dotted key")
    p.set_defaults(func=c.cmd_config)

    p = sub.add_parser("env", help="versions, GPUs, Slurm variables and the cache directory, for bug reports")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=c.cmd_env)


def build_parser() -> argparse.ArgumentParser:
    from qa_dist import __version__

    parser = argparse.ArgumentParser(prog="qa-dist", description="Distributed extractive QA training.")
    parser.add_argument("--version", action="version", version=f"qa-dist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_commands(sub)
    _add_predict(sub)
    _add_launch(sub)
    _add_tools(sub)
    return parser
