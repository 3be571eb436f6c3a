"""qa-dist's metrics as ``evaluate`` modules, shipped in the package so ``evaluate.load`` works offline.

``evaluate.load("squad_v2")`` fetches its script from the Hugging Face hub at run time. Each folder
here holds one script named after the folder, as the hub's metric repositories do, so that
``evaluate.load(<folder>)`` loads it from disk::

    import evaluate
    import qa_dist

    squad_v2 = evaluate.load(qa_dist.evaluate_module("squad_v2"))
    squad_v2.compute(predictions=[...], references=[...])

The scripts delegate the scoring to :func:`qa_dist.metrics.score` (the official scripts' numbers).
This module imports neither ``evaluate`` nor ``datasets``: only the scripts do, through ``_hf``.
"""

from __future__ import annotations

from pathlib import Path

from qa_dist.errors import ConfigError

NAMES = ("squad", "squad_v2", "cmrc2018")
_HERE = Path(__file__).resolve().parent


def evaluate_module(name: str) -> str:
    """The path to pass to ``evaluate.load`` for ``squad``, ``squad_v2`` or ``cmrc2018`` (also DRCD).

    Raises :class:`~qa_dist.ConfigError` (a ``ValueError``) for any other name.
    """
    if not isinstance(name, str) or name not in NAMES:
        hint = " (qa_dist.score's 'cmrc' is 'cmrc2018' here)" if name == "cmrc" else ""
        raise ConfigError(f"unknown evaluate module {name!r}{hint}: squad, squad_v2 or cmrc2018")
    return str(_HERE / name)
