"""Rank zero's output: the one owner of what a job prints and of the run records only rank zero writes.

Every process holds a reporter, made once where the process learns its rank (``reporter_for``).
Rank zero's prints and writes; every other rank's is a ``SilentReporter`` whose methods do nothing
(torchtitan's loggers work the same way), so components carry no ``if rank == 0`` of their own.

Rank checks left elsewhere belong to components that write their own artifacts inside a collective
protocol: the checkpointer (its markers between barriers, pruning, ``best/``, and its warnings
through ``logging``), the export (``save_pretrained(is_main_process=...)``, ``export_check.json``),
the cache (which process builds an entry) and ``dist`` (the rank a gather goes to).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

from tqdm.auto import tqdm

from qa_dist.runtime.fsutil import atomic_write


class Reporter:
    """Rank zero's: console lines on stderr (stdout where asked), progress bars, run records."""

    active = True
    """This process reports (rank zero): what else is rank zero's alone (the trackers) follows it."""

    def __init__(self, progress: bool = True) -> None:
        self.shows_progress = progress
        """Whether progress bars are wanted (off with ``--quiet``; tqdm's ``disable=None`` also
        leaves them out where stderr is not a terminal: Slurm's log files, the tests')."""
        self._bar: tqdm | None = None

    def line(self, text: str, *, stdout: bool = False) -> None:
        """One line (or several) for the user; on stderr unless it is a command's result."""
        if not stdout and self._bar is not None and not self._bar.disable:
            self._bar.write(text, file=sys.stderr)  # above the open bar, not through it
        else:
            print(text, file=sys.stdout if stdout else sys.stderr, flush=True)

    def status(self, text: str) -> None:
        """A progress message (which stage a long job is in): shown only with the progress bars."""
        if self.shows_progress:
            self.line(text)

    def bar(self, total: int, *, initial: int = 0, desc: str, unit: str) -> tqdm:
        """A progress bar; lines written while it is open go above it."""
        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit=unit,
            file=sys.stderr,
            disable=None if self.shows_progress else True,
        )
        return self._bar

    def write_text(self, path: str | Path, text: str) -> Path:
        """A run record, written atomically (its directory made)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text)
        return path

    def write_json(self, path: str | Path, value) -> Path:
        return self.write_text(path, json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False))

    def remove(self, path: str | Path) -> None:
        Path(path).unlink(missing_ok=True)


class _NoBar:
    disable = True
    n = 0

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class SilentReporter(Reporter):
    """Every rank but zero's: the same calls, no output."""

    active = False

    def __init__(self) -> None:
        super().__init__(progress=False)

    def line(self, text: str, *, stdout: bool = False) -> None:
        pass

    def bar(self, total: int, *, initial: int = 0, desc: str, unit: str) -> _NoBar:  # type: ignore[override]
        return _NoBar()

    def write_text(self, path: str | Path, text: str) -> Path:
        return Path(path)

    def remove(self, path: str | Path) -> None:
        pass


SILENT = SilentReporter()
"""For library calls that report nothing (the default where a function takes a reporter)."""


def reporter_for(rank: int, progress: bool = True) -> Reporter:
    """The reporter of a process: rank zero's prints and writes, the others' are silent."""
    return Reporter(progress) if rank == 0 else SilentReporter()


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def quiet_libraries_on_other_ranks() -> None:
    """Other libraries' notices (transformers' load report, DeepSpeed's accelerator note, Python
    warnings) once, from global rank zero: every rank would print the same. Errors still come from
    every rank. Called before those libraries are imported (they read their verbosity then)."""
    if os.environ.get("RANK", "0") == "0":
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    for name in ("accelerate", "transformers", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)  # their modules' loggers inherit it
    # DeepSpeed sets its logger's level when it creates it: a filter on the logger survives that.
    logging.getLogger("DeepSpeed").addFilter(_ErrorsOnly())
    warnings.simplefilter("ignore")
