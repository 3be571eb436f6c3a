"""Errors that the CLI turns into one clear message and exit code 2 (no traceback)."""

from __future__ import annotations


class QaDistError(Exception):
    """Base class for user-facing errors: bad input, bad configuration."""


class DataError(QaDistError, ValueError):
    """A data file (or record in it) is malformed; the message names the file and the record."""


class ConfigError(QaDistError, ValueError):
    """A run configuration is invalid; the message names the key and lists the valid ones."""


class AgreedError(ConfigError):
    """Raised on every rank at once, after the ranks agreed on it: only global rank zero prints it
    (one line, not one per rank); the others exit with the same code quietly."""
