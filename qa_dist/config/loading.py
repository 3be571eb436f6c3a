"""Loading the config tree: YAML through ``yaml.safe_load`` with aliases refused, dotted
``key=value`` overrides, strict types (unknown keys and wrong types are errors that list the valid
keys), and the resolved config written back into the run directory."""

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from qa_dist.config.tree import RunConfig, shown
from qa_dist.errors import ConfigError


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases: a run config never needs them, and nested aliases
    expand exponentially (a few hundred bytes of YAML become gigabytes: the "billion laughs")."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"YAML aliases (*{event.anchor}) are not allowed in a run config", event.start_mark
            )
        return super().compose_node(parent, index)


def safe_load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with aliases refused; what every config and override goes through."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


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


class _Number:
    """A number read from an override, with the text it was read from: a text field takes the text
    (``launch.account=012345`` stays 012345, not YAML's octal 5349; ``launch.time=24:00:00`` stays a
    time, not YAML's sexagesimal 86400), any other field the number."""

    def __init__(self, text: str, number: int | float) -> None:
        self.text, self.number = text, number

    def __repr__(self) -> str:
        return self.text


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``hint``; return it converted where YAML is lax."""
    origin = typing.get_origin(hint)
    if isinstance(value, _Number) and origin not in (typing.Union, types.UnionType):
        value = value.text if hint is str else value.number
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
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {shown(value)}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):  # one name: logging.trackers=tensorboard
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {shown(value)}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}: {shown(value)} is not one of {', '.join(map(repr, choices))}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            # PyYAML reads "3e-5" (no dot) as a string; users write learning rates that way.
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{key}: {shown(value)} is not a finite number")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if key.startswith("launch."):
                # What lands in a launch line or an #SBATCH line: YAML's number may not be what was
                # written (an unquoted 24:00:00 is 86400, 012345 is 5349).
                raise ConfigError(f"{key}: {_shown_number(value)} was read as a number; write it quoted ('...')")
            return str(value)
    raise ConfigError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {shown(value)}")


TRAINER_NAMES = {
    "learning_rate": "train.lr",
    "num_train_epochs": "train.epochs",
    "per_device_train_batch_size": "train.per_device_batch_size",
    "per_device_eval_batch_size": "eval.per_device_batch_size",
    "max_seq_length": "data.max_length",
    "output_dir": "run_dir",
    "model_name_or_path": "model.name_or_path",
    "max_answer_length": "eval.max_answer_length",
    "n_best_size": "eval.n_best_size",
    "eval_steps": "eval.every",
    "save_steps": "train.checkpoint_every",
    "logging_steps": "logging.log_every",
}
"""The Hugging Face Trainer's / run_qa.py's names for keys qa-dist spells otherwise."""


def _unknown_key_message(cls: type, prefix: str, name: str) -> str:
    """One line: the key, the closest valid one (or the Trainer name's qa-dist key), and the keys of
    its section, not every key of the tree."""
    names = [f.name for f in dataclasses.fields(cls)]
    guess = TRAINER_NAMES.get(name)
    if guess is None:
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        guess = prefix + close[0] if close else None
    hint = f"; did you mean {guess!r}?" if guess else ""
    section = f"keys of {prefix[:-1]}" if prefix else "sections and keys"
    return (
        f"unknown config key {shown(prefix + name)}{hint} ({section}: {', '.join(names)}; "
        "qa-dist config --keys lists every key)"
    )


def _shown_number(value: int | float) -> str:
    return shown(value) if len(str(value)) < 40 else "a long number"


def _build(cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names, key=str)
    if unknown:
        raise ConfigError(_unknown_key_message(cls, prefix, str(unknown[0])))
    kwargs = {}
    for name, value in values.items():
        hint, key = hints[name], prefix + name
        if dataclasses.is_dataclass(hint):
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of {hint.__name__} keys, got {shown(value)}")
            kwargs[name] = _build(hint, value, key + ".")
        else:
            kwargs[name] = _coerce(value, hint, key)
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a range or cross-field check of __post_init__, which names the field only
        raise ConfigError(f"{prefix}{e}") from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {shown(dotted)}: {shown(part)} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key=value`` strings; values are read as YAML scalars (``null``, ``true``, numbers)."""
    pairs = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"override {shown(item)} is not of the form key=value (qa-dist config --keys lists every key)"
            )
        try:
            value = safe_load_yaml(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = _Number(raw.strip(), value)
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
            loaded = safe_load_yaml(text)
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


RESOLVED_CONFIG = "config.yaml"
"""Under the run directory: the resolved config, every key with defaults included."""


def resolved_config_yaml(config: RunConfig) -> str:
    """The resolved config as YAML (every key, defaults included), as ``qa-dist config`` prints it."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def resolved_config_record(config: RunConfig, run_dir: str | Path | None = None) -> tuple[Path, str]:
    """Where the resolved config goes (``<run_dir>/config.yaml``) and its text, for a reporter to write."""
    return Path(run_dir if run_dir is not None else config.run_dir) / RESOLVED_CONFIG, resolved_config_yaml(config)
