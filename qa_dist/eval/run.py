"""``qa-dist evaluate`` and ``qa-dist predict``: evaluation outside training, in whatever process
group launched it (or one process). Each rank holds the whole fine-tuned model (a QA encoder fits
one device) and scores its share of the windows.

Prediction settings come from one place: ``predict_config`` (the config's defaults, the windows the
model was trained with when its directory records them, then the user's ``key=value`` overrides and
flags), so that ``qa-dist predict``, ``predict`` and ``predict_one`` agree."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from qa_dist.config import DataConfig, EvalConfig, ModelConfig, RunConfig, load_config
from qa_dist.data.schema import Example
from qa_dist.errors import ConfigError
from qa_dist.eval.evaluator import EvalData, EvalResult, Forward, evaluate
from qa_dist.features import build_eval_features
from qa_dist.features.prepare import examples_table, features_table, prepare_features
from qa_dist.models import WINDOWS_FILE, autocast_dtype, check_window_fits, load_qa_model, load_tokenizer, stack_logits
from qa_dist.runtime.dist import DistContext, current_context
from qa_dist.runtime.jsonfile import Damaged, read_json
from qa_dist.runtime.report import reporter_for

"""Written beside an exported model: ``{"max_length": .., "doc_stride": ..}``, the windows it was
trained on. ``predict`` and the pipeline use them unless told otherwise."""
WINDOW_KEYS = ("max_length", "doc_stride")
PREDICT_SECTIONS = ("data.", "eval.", "model.")
"""The config sections ``qa-dist predict`` takes overrides for."""
QUESTION_ID = "question"
"""The id of the one example ``question_example`` makes."""


def device_for(dist: DistContext) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def model_forward(model, device: torch.device, mixed_precision: str = "no") -> Forward:
    """Logits of a plain (unwrapped) model, under autocast on GPUs when asked."""
    dtype = autocast_dtype(mixed_precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype and device.type == "cuda" else nullcontext()

    @torch.no_grad()
    def forward(batch: dict) -> torch.Tensor:
        with autocast:
            out = model(**{k: v.to(device) for k, v in batch.items()})
        return stack_logits(out)

    return forward


def evaluate_run(config: RunConfig, out_dir: Path | None = None, progress: bool = True) -> EvalResult | None:
    """Evaluate ``config.model`` on ``config.data.eval``; rank zero returns the result."""
    if not config.data.eval:
        raise ConfigError("nothing to evaluate: set data.eval")
    dist = current_context(init=True)
    report = reporter_for(dist.rank, progress)
    tokenizer = load_tokenizer(config.model)
    entry = prepare_features(config.data, tokenizer, dist, roles=("eval",), report=report)["eval"].entry
    device = device_for(dist)
    model = load_qa_model(config.model).to(device).eval()
    return evaluate(
        model_forward(model, device, config.train.mixed_precision),
        EvalData(entry.table("features"), entry.table("examples")),
        dist,
        config.eval,
        out_dir or Path(config.run_dir) / "eval" / "evaluate",
        pad_token_id=tokenizer.pad_token_id or 0,
        report=report,
    )


def recorded_windows(model_path: str | Path) -> dict[str, int] | None:
    """The windows a model directory records (``qa_dist_windows.json``: ``max_length``,
    ``doc_stride``), or None where it records none (a hub name, an older export)."""
    path = Path(model_path) / WINDOWS_FILE
    try:
        if not path.is_file():
            return None
        value = read_json(path)
    except (OSError, Damaged) as e:
        raise ConfigError(f"{path}: cannot read the recorded windows ({e})") from None
    if not isinstance(value, dict) or not all(
        isinstance(value.get(k), int) and not isinstance(value.get(k), bool) for k in WINDOW_KEYS
    ):
        raise ConfigError(f'{path}: expected {{"max_length": int, "doc_stride": int}}, got {str(value)[:120]}')
    windows = {k: value[k] for k in WINDOW_KEYS}
    try:
        DataConfig(**windows)  # the config's own range checks
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return windows


def default_windows(model_path: str | Path | None = None) -> dict[str, int]:
    """``max_length`` and ``doc_stride`` to use with a model: what its directory records, else
    ``DataConfig``'s defaults."""
    recorded = recorded_windows(model_path) if model_path is not None else None
    return recorded or {k: getattr(DataConfig, k) for k in WINDOW_KEYS}


def _override_key(override: str) -> str:
    return override.partition("=")[0].strip()


def predict_config(
    model: str,
    overrides: Sequence[str] = (),
    values: Mapping[str, Any] | None = None,
    *,
    names: Mapping[str, str] | None = None,
) -> RunConfig:
    """The settings ``qa-dist predict`` runs with: the config's defaults; the model's recorded
    windows unless ``data.max_length`` or ``data.doc_stride`` is given; the dotted ``key=value``
    ``overrides`` (``data.*``, ``eval.*``, ``model.*``); then ``values`` (dotted key to a typed
    value, as the command's flags give them). ``eval.metric`` defaults to ``squad``: always answer
    (``squad_v2`` lets the null answer win). A key given both as an override and in ``values`` is an
    error; ``names`` gives the flag behind a key, for messages. ``data.max_length`` is checked
    against the model's positions."""
    values, names = dict(values or {}), dict(names or {})
    for override in overrides:
        key = _override_key(override)
        if not key.startswith(PREDICT_SECTIONS) or key == "model.name_or_path":
            raise ConfigError(
                f"override {key!r}: qa-dist predict takes data.*, eval.* and model.* keys (the model: --model)"
            )
        if key in values:
            raise ConfigError(f"{names.get(key, key)} and the override {override!r} set the same key: give one")
    given = {_override_key(o) for o in overrides} | set(values)
    config = load_config(None, list(overrides))
    sections: dict[str, dict[str, Any]] = {"model": {"name_or_path": model}}
    if not given & {f"data.{k}" for k in WINDOW_KEYS}:
        windows = recorded_windows(model)
        if windows:
            sections["data"] = dict(windows)
    if "eval.metric" not in given:
        sections["eval"] = {"metric": "squad"}
    for key, value in values.items():
        section, _, name = key.partition(".")
        sections.setdefault(section, {})[name] = value
    try:
        # one replace per section: max_length and doc_stride are checked together
        config = dataclasses.replace(
            config, **{s: dataclasses.replace(getattr(config, s), **fields) for s, fields in sections.items()}
        )
    except TypeError as e:
        raise ConfigError(str(e)) from None
    except ConfigError as e:
        message = str(e)
        for key, name in names.items():
            message = message.replace(f"{key.partition('.')[2]} (", f"{name} (")
        raise ConfigError(message) from None
    check_window_fits(config.model, config.data.max_length, key=names.get("data.max_length", "data.max_length"))
    return config


def question_example(question: str, context: str, id: str = QUESTION_ID) -> Example:
    """One unlabelled example from a question and its context (both not empty)."""
    if not (isinstance(question, str) and isinstance(context, str) and question.strip() and context.strip()):
        raise ConfigError("--question and --context must both be given and not empty")
    return {
        "id": id,
        "title": "",
        "context": context,
        "question": question,
        "answers": {"text": [], "answer_start": []},
        "is_impossible": False,
    }


def predict(
    model_path: str | ModelConfig,
    examples: Sequence[Example],
    out_dir: Path | None,
    *,
    max_length: int | None = None,
    doc_stride: int | None = None,
    config: EvalConfig | None = None,
    progress: bool = False,
) -> EvalResult | None:
    """Predict answers to ``examples`` (gold answers not needed); rank zero returns the result.
    Windows: ``max_length``/``doc_stride`` where given, else what the model directory records
    (``qa_dist_windows.json``), else ``DataConfig``'s defaults."""
    model_config = model_path if isinstance(model_path, ModelConfig) else ModelConfig(name_or_path=model_path)
    if max_length is None or doc_stride is None:
        windows = default_windows(model_config.name_or_path)
        max_length = windows["max_length"] if max_length is None else max_length
        doc_stride = windows["doc_stride"] if doc_stride is None else doc_stride
    config = config or EvalConfig()
    dist = current_context(init=True)
    report = reporter_for(dist.rank, progress)
    tokenizer = load_tokenizer(model_config)
    device = device_for(dist)
    model = load_qa_model(model_config).to(device).eval()
    features = build_eval_features(examples, tokenizer, max_length, doc_stride)
    return evaluate(
        model_forward(model, device),
        EvalData(features_table(features), examples_table(list(examples))),
        dist,
        config,
        out_dir,
        pad_token_id=tokenizer.pad_token_id or 0,
        labelled=False,
        report=report,
    )


def predict_run(
    config: RunConfig, examples: Sequence[Example], out_dir: Path | None, progress: bool = False
) -> EvalResult | None:
    """``predict`` with the settings of a ``predict_config``."""
    return predict(
        config.model,
        examples,
        out_dir,
        max_length=config.data.max_length,
        doc_stride=config.data.doc_stride,
        config=config.eval,
        progress=progress,
    )


def answer_of(result: EvalResult, example_id: str = QUESTION_ID) -> dict:
    """One question's answer as ``qa-dist predict --question`` prints it: ``answer``, ``score`` (the
    answer's probability), character ``start``/``end`` (-1 for no answer), and ``null_odds`` where the
    null answer competed."""
    predictions = result.predictions
    answer = predictions.answers[example_id]
    best = next((x for x in predictions.nbest[example_id] if x["text"] == answer), None)
    out = {"answer": answer, "score": best["probability"] if best else 0.0}
    out.update({"start": best["start"], "end": best["end"]} if best and answer else {"start": -1, "end": -1})
    if example_id in predictions.null_odds:
        out["null_odds"] = predictions.null_odds[example_id]
    return out


def predict_one(question: str, context: str, model: str | RunConfig, out_dir: Path | None = None) -> dict | None:
    """Answer one question about ``context`` with ``model`` (a model path or hub name, or a
    ``predict_config``): the ``answer_of`` dict on rank zero, None on the other ranks."""
    config = model if isinstance(model, RunConfig) else predict_config(model)
    result = predict_run(config, [question_example(question, context)], out_dir)
    return answer_of(result) if result is not None else None
