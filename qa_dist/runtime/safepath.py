"""No code from the working directory: it may be a shared project or scratch directory that
someone else can write.

Under ``python -m`` (which every launch line uses, ``accelerate launch ... -m qa_dist train`` included)
Python puts the working directory first on ``sys.path``, so a planted ``torch.py``, a package named
like an installed one, or a ``*.dist-info`` folder declaring entry points would be found before
what is installed. Two defences, both needed:

- every process qa-dist starts runs with ``PYTHONSAFEPATH=1`` (Python 3.11+: the working directory
  is never added), which also covers modules imported before qa-dist's own code runs;
- ``qa-dist`` itself drops the working directory from ``sys.path`` first thing, for a process
  somebody else started without it (a hand-typed ``python -m qa_dist`` or ``torchrun``).
"""

from __future__ import annotations

# Only modules every interpreter has loaded before ``-m`` runs anything: this module runs while the
# working directory may still be on sys.path, where a planted pathlib.py would be found first.
import os
import sys

SAFE_PATH_ENV = {"PYTHONSAFEPATH": "1"}
"""The environment every Python process qa-dist starts gets (``python -P`` as a variable, which the
training processes that ``accelerate launch`` and torchrun start inherit)."""


def _same(entry: str, cwd: str) -> bool:
    try:
        return os.path.realpath(entry or ".") == cwd
    except OSError:
        return False


def drop_working_directory() -> list[str]:
    """Remove the working directory (``''``, ``.``, or its absolute path) from ``sys.path``; the
    entries removed. A source checkout run without installing keeps working: qa_dist was imported
    already, and its submodules are found through the package, not through ``sys.path``."""
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:  # the working directory is gone: only its relative names can point at it
        cwd = None
    keep = [p for p in sys.path if p not in ("", ".") and (cwd is None or not _same(p, cwd))]
    removed = [p for p in sys.path if p not in keep]
    sys.path[:] = keep
    return removed


def site_directories() -> list:
    """Where this interpreter installs packages: the only places model-name resolution looks for
    distributions (their entry points and bundled model directories)."""
    import site
    import sysconfig
    from pathlib import Path

    paths = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    paths.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    if site.ENABLE_USER_SITE and site.getusersitepackages():
        paths.add(site.getusersitepackages())
    return sorted({Path(p).resolve() for p in paths if os.path.isdir(p)})


def safe_environ(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with ``PYTHONSAFEPATH=1``."""
    return {**(os.environ if base is None else base), **SAFE_PATH_ENV}


def trusted_directories() -> list:
    """Where installed distributions are looked for: the site directories and what ``PYTHONPATH``
    names (absolute entries; the environment is trusted, the working directory is not)."""
    from pathlib import Path

    cwd = os.path.realpath(os.getcwd()) if os.path.isdir(".") else None
    extra = []
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if entry and os.path.isabs(entry) and os.path.isdir(entry) and os.path.realpath(entry) != cwd:
            extra.append(Path(entry).resolve())
    return sorted(set(site_directories()) | set(extra))
