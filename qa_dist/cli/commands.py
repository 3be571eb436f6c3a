"""What each ``qa-dist`` command does: parse its flags into config keys, call the stage, print.

Each command imports what it runs inside its function: ``qa-dist config --keys`` and ``--help``
must not pay seconds for torch, transformers and accelerate."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import yaml


def cmd_prepare(args: argparse.Namespace) -> int:
    from qa_dist.config import load_config, resolved_config_record
    from qa_dist.features.prepare import prepare_features
    from qa_dist.models import check_window_fits, load_tokenizer
    from qa_dist.runtime.dist import current_context
    from qa_dist.runtime.report import reporter_for

    config = load_config(args.config, args.overrides)
    check_window_fits(config.model, config.data.max_length)
    dist = current_context(init=True)
    report = reporter_for(dist.rank, progress=not args.quiet)
    tokenizer = load_tokenizer(config.model)
    started = time.perf_counter()
    prepared = prepare_features(config.data, tokenizer, dist, report=report)
    written = report.write_text(*resolved_config_record(config))
    for split in prepared.values():
        m = split.entry.manifest
        state = "built" if split.entry.built_here else "verified (warm)"
        report.line(
            f"{split.role:5s} {state}: {split.source}\n"
            f"      key      {split.entry.key}\n"
            f"      path     {split.entry.path}\n"
            f"      examples {split.num_examples:,}   windows {split.num_features:,}   time {split.seconds:.2f} s\n"
            f"      data     {m.get('validation', '')}",
            stdout=True,
        )
    report.line(f"resolved config: {written}   total {time.perf_counter() - started:.2f} s", stdout=True)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from qa_dist.config import load_config
    from qa_dist.errors import ConfigError
    from qa_dist.models import check_window_fits
    from qa_dist.train import EXIT_PREEMPTED, train

    if not args.config:
        raise ConfigError("qa-dist train needs --config RUN.yaml (the recipes are in configs/runs/)")
    config = load_config(args.config, args.overrides)
    check_window_fits(config.model, config.data.max_length)
    result = train(config)
    if result.preempted:
        print(
            f"qa-dist: preempted at step {result.steps}: checkpoint written; continue with resume=auto "
            f"(exit code {EXIT_PREEMPTED})",
            file=sys.stderr,
        )
        return EXIT_PREEMPTED
    return 0


def _read_json_mapping(path: str, what: str) -> dict:

    from qa_dist.errors import DataError

    try:
        # utf-8-sig: a byte-order mark is accepted, as in data files (Windows editors write one)
        with open(path, encoding="utf-8-sig") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: {what} file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: {what} file is not valid JSON ({e})") from None
    except RecursionError:
        raise DataError(f"{path}: {what} file is JSON nested too deeply to read") from None
    except ValueError:  # an integer longer than Python converts (sys.get_int_max_str_digits)
        raise DataError(
            f"{path}: {what} file holds a number of more than {sys.get_int_max_str_digits()} digits"
        ) from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the {what} file ({e.strerror or e})") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: {what} must be a JSON object mapping question ids to values")
    return value


def _finite_number(value) -> bool:
    """A JSON number that is a finite float: not a bool, and an integer that fits one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond float's range (math.isfinite converts it)
        return False


def cmd_score(args: argparse.Namespace) -> int:

    from qa_dist.data import load_examples
    from qa_dist.errors import DataError
    from qa_dist.metrics import score

    examples = load_examples(args.data)
    predictions = _read_json_mapping(args.predictions, "predictions")
    for qid, text in predictions.items():
        if text is not None and not isinstance(text, str):
            raise DataError(
                f"{args.predictions}: question {qid!r}: a prediction must be a string (empty for no "
                f"answer, null for no prediction), got {type(text).__name__}"
            )
    predictions = {qid: text for qid, text in predictions.items() if text is not None}  # null: missing
    na_probs = _read_json_mapping(args.na_probs, "null odds") if args.na_probs else None
    for qid, odds in (na_probs or {}).items():
        if not _finite_number(odds):
            got = repr(odds) if isinstance(odds, float) else type(odds).__name__
            got = "an integer too large for a float" if isinstance(odds, int) and not isinstance(odds, bool) else got
            raise DataError(f"{args.na_probs}: question {qid!r}: null odds must be a finite number, got {got}")
    try:
        result = score(examples, predictions, na_probs=na_probs, metric=args.metric)
    except DataError as e:
        raise DataError(f"{args.data}: {e}") from None
    # Predictions for questions the data does not have: often the wrong data file or split. (Keys
    # only when there are some: the output stays what the evaluator reports for the same data.)
    known = {ex["id"] for ex in examples}
    extra = [qid for qid in predictions if qid not in known]
    if extra:
        result["extra"], result["extra_ids"] = len(extra), extra[:5]
        logging.getLogger("qa_dist.score").warning(
            "%d predictions are for questions not in %s (first: %r); they are not scored",
            len(extra),
            args.data,
            extra[0],
        )
    print(json.dumps(result, indent=2, allow_nan=False))
    return 0


def _model_shorthand(overrides: list[str]) -> list[str]:
    """``model=DIR`` is short for ``model.name_or_path=DIR``."""
    return [f"model.name_or_path={o[6:]}" if o.startswith("model=") else o for o in overrides]


def _print_eval(metrics: dict, out_dir) -> None:

    print(json.dumps(metrics, indent=2, ensure_ascii=False))
    if out_dir is not None:
        print(f"prediction files: {out_dir}", file=sys.stderr)


def cmd_evaluate(args: argparse.Namespace) -> int:

    from qa_dist.config import load_config
    from qa_dist.eval.run import evaluate_run
    from qa_dist.models import check_window_fits

    overrides = _model_shorthand(args.overrides) + (["eval.tune_threshold=true"] if args.tune_threshold else [])
    config = load_config(args.config, overrides)
    check_window_fits(config.model, config.data.max_length)
    out_dir = Path(args.output) if args.output else Path(config.run_dir) / "eval" / "evaluate"
    result = evaluate_run(config, out_dir, progress=not args.quiet)
    if result is not None:
        _print_eval(result.metrics, out_dir)
    return 0


def _flag_values(args: argparse.Namespace, flags: dict[str, tuple[str, str]]) -> tuple[dict, dict[str, str]]:
    """The flags given (dotted key to value) and the flag behind each key, for messages."""
    values = {key: getattr(args, attr) for attr, (_, key) in flags.items() if getattr(args, attr) is not None}
    return values, {key: flag for flag, key in flags.values()}


PREDICT_FLAGS = {
    "max_length": ("--max-length", "data.max_length"),
    "doc_stride": ("--doc-stride", "data.doc_stride"),
    "n_best": ("--n-best", "eval.n_best_size"),
    "max_answer_length": ("--max-answer-length", "eval.max_answer_length"),
    "batch_size": ("--batch-size", "eval.per_device_batch_size"),
    "null_threshold": ("--null-threshold", "eval.null_score_diff_threshold"),
}
"""``qa-dist predict``'s flags: shorthands for config keys (giving both is an error)."""


def cmd_predict(args: argparse.Namespace) -> int:

    from qa_dist.data import load_examples
    from qa_dist.errors import ConfigError
    from qa_dist.eval.run import answer_of, predict_config, predict_run, question_example

    values, names = _flag_values(args, PREDICT_FLAGS)
    if args.allow_no_answer:
        values["eval.metric"] = "squad_v2"
        names["eval.metric"] = "--allow-no-answer"
    config = predict_config(args.model, args.overrides, values, names=names)
    if bool(args.data) == bool(args.question or args.context):
        raise ConfigError("give either --data FILE or both --question and --context")
    if args.data:
        examples = load_examples(args.data, labelled=False)
        out_dir = Path(args.output or "predictions")
    else:
        examples = [question_example(args.question or "", args.context or "")]
        out_dir = Path(args.output) if args.output else None
    result = predict_run(config, examples, out_dir, progress=not args.quiet and bool(args.data))
    if result is None:
        return 0
    if args.data:
        print(f"{len(result.predictions.answers):,} answers written to {out_dir}/predictions.json", file=sys.stderr)
        return 0
    print(json.dumps(answer_of(result), ensure_ascii=False))
    return 0


LAUNCH_FLAGS: dict[str, tuple[str, str]] = {
    "strategy": ("--strategy", "launch.strategy"),
    "nodes": ("--nodes", "launch.nodes"),
    "gpus_per_node": ("--gpus-per-node", "launch.gpus_per_node"),
    "cpu": ("--cpu", "launch.cpu"),
    "gpu_memory_gib": ("--gpu-memory-gib", "launch.gpu_memory_gib"),
    "partition": ("--partition", "launch.partition"),
    "time": ("--time", "launch.time"),
    "account": ("--account", "launch.account"),
    "exclusive": ("--exclusive", "launch.exclusive"),
    "cpus_per_task": ("--cpus-per-task", "launch.cpus_per_task"),
    "machine_rank": ("--machine-rank", "launch.machine_rank"),
    "head": ("--head", "launch.head"),
    "port": ("--port", "launch.port"),
}
"""``qa-dist launch``'s flags: each is a shorthand for one ``launch.*`` key (giving both is an error).
Their defaults and documentation are the config's (``LaunchConfig``)."""


def _named_by_flag(error: Exception, given: dict[str, str]) -> str:
    """An error about a ``launch.*`` key that a flag set, said with the flag's name."""
    message = str(error)
    for key, flag in given.items():
        message = message.replace(f"{key}:", f"{flag} ({key}):")
    return message


def cmd_launch(args: argparse.Namespace) -> int:
    import shlex

    from qa_dist.config import load_config
    from qa_dist.errors import ConfigError
    from qa_dist.launch import LaunchPlan

    if not args.config:
        raise ConfigError("qa-dist launch needs --config RUN.yaml (the recipes are in configs/runs/)")
    values, names = _flag_values(args, LAUNCH_FLAGS)
    given = {key: names[key] for key in values}  # messages name a flag only where one set the key
    for override in args.overrides:
        key = override.partition("=")[0].strip()
        if key in values:
            raise ConfigError(f"{names[key]} and the override {override!r} set the same key: give one")
    # JSON is YAML: each flag's value reads back as what argparse made of it ("24:00:00" stays a string).
    overrides = [*args.overrides, *(f"{key}={json.dumps(value)}" for key, value in values.items())]
    try:
        config = load_config(args.config, overrides)
        plan = LaunchPlan.build(
            config, args.config, overrides, slurm=args.slurm, check=not args.no_check, names=given, report=_stderr
        ).write_configs()
    except ConfigError as e:
        raise ConfigError(_named_by_flag(e, given)) from None
    print(f"launch configs: {plan.plan.launch_dir}", file=sys.stderr)
    if args.slurm:
        if args.dry_run:
            from qa_dist.launch.slurm import how_to_submit, job_name

            paths = plan.write_scripts()
            for name, text in plan.scripts().items():
                print(f"# ===== {paths[name]} =====\n{text}", end="")
            for line in [
                f"scripts written: {', '.join(map(str, paths.values()))}",
                *how_to_submit(paths, config.run_dir, job_name(config.run_dir)),
            ]:
                _stderr(line)
            return 0
        plan.submit(report=print)
        return 0
    # As it runs (qa-dist sets it when it runs the line): copied, the line keeps the working directory off sys.path.
    print("PYTHONSAFEPATH=1 " + shlex.join(plan.line()), flush=True)
    if args.dry_run:
        return 0
    return plan.run()


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def cmd_demo(args: argparse.Namespace) -> int:

    from qa_dist.demo import run_demo

    languages = ["en", "zh"] if args.lang == "both" else [args.lang]
    return run_demo(Path(args.out), languages, processes=args.processes)


def cmd_env(args: argparse.Namespace) -> int:
    from qa_dist.env import environment_report, format_report

    report = environment_report()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from qa_dist.config import config_to_dict, load_config, valid_keys

    if args.keys:
        print("\n".join(valid_keys()))
        return 0
    print(
        yaml.safe_dump(config_to_dict(load_config(args.config, args.overrides)), sort_keys=False),
        end="",
    )
    return 0
