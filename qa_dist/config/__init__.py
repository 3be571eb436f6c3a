"""One typed config tree for every command.

Frozen dataclasses, loaded from YAML with ``yaml.safe_load``, overridden with dotted ``key=value``
pairs from the command line, validated strictly (unknown keys and wrong types are errors that list
the valid keys), and written back, resolved, into the run directory.
"""

from __future__ import annotations

from qa_dist.config.loading import (
    RESOLVED_CONFIG,
    config_to_dict,
    load_config,
    parse_overrides,
    resolved_config_record,
    resolved_config_yaml,
    safe_load_yaml,
    valid_keys,
)
from qa_dist.config.tree import (
    DataConfig,
    EvalConfig,
    LaunchConfig,
    LoggingConfig,
    ModelConfig,
    RunConfig,
    ScratchConfig,
    TrainConfig,
)

__all__ = [
    "DataConfig",
    "EvalConfig",
    "LaunchConfig",
    "LoggingConfig",
    "ModelConfig",
    "RESOLVED_CONFIG",
    "RunConfig",
    "ScratchConfig",
    "TrainConfig",
    "config_to_dict",
    "load_config",
    "parse_overrides",
    "resolved_config_record",
    "resolved_config_yaml",
    "safe_load_yaml",
    "valid_keys",
]
