"""Values that go into a command line or a Slurm script: refused when they hold control characters,
escaped for sbatch's own parser in ``#SBATCH`` lines."""

from __future__ import annotations

import unicodedata

from qa_dist.errors import ConfigError


def check_printable(name: str, value: str) -> str:
    """``value`` unchanged, or a ConfigError naming ``name`` when it holds a character that has no
    place in a script or a command line: a control or format character (newline, carriage return,
    escape, DEL, zero-width and direction marks...) or a Unicode line or paragraph separator. A
    newline would end a ``#SBATCH`` line (Slurm reads that block itself, no shell quoting applies)
    and the others hide what a printed command really runs."""
    for ch in value:
        if unicodedata.category(ch) in ("Cc", "Cf") or ch in "\u2028\u2029":
            raise ConfigError(
                f"{name}: control or line-break character {ch!r} (U+{ord(ch):04X}) in {value!r}: "
                "not allowed in a launch script or command line"
            )
    return value


def override_key(override: str) -> str:
    return override.split("=", 1)[0] if "=" in override else override


def sbatch_word(value: str) -> str:
    """``value`` as (part of) one argument of a ``#SBATCH`` line. Slurm splits those lines itself
    (sbatch's ``_get_argument``, not a shell): whitespace ends an argument unless it is inside quotes
    (a backslash does not protect it), an unquoted ``#`` starts a comment, and a backslash escapes the
    next character anywhere, even inside quotes. So a value holding any of these is written inside
    double quotes with ``"`` and ``\\`` escaped; ``$``, ``;``, backticks, parentheses are plain
    characters there. Control characters cannot be carried at all (a newline ends the line) and are
    refused by ``check_printable`` before this."""
    if not any(ch in " \t\v\f\r\"'#\\" for ch in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
