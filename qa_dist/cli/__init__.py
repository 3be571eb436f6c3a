"""The ``qa-dist`` command line. User errors print one line and exit with code 2."""

from __future__ import annotations

import logging
import os
import signal
import sys

from qa_dist.cli.commands import LAUNCH_FLAGS, PREDICT_FLAGS
from qa_dist.cli.parser import build_parser
from qa_dist.runtime.report import quiet_libraries_on_other_ranks
from qa_dist.runtime.safepath import drop_working_directory

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    from qa_dist.errors import AgreedError, QaDistError

    drop_working_directory()  # (again, for the console script and callers of main())
    quiet_libraries_on_other_ranks()
    logging.basicConfig(level=logging.WARNING, format="qa-dist: %(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QaDistError as e:
        if isinstance(e, AgreedError) and os.environ.get("RANK", "0") != "0":
            return EXIT_USAGE  # every rank raised it together: rank zero says it once
        # One line per problem, each with the prefix a log filter looks for.
        print("\n".join(f"qa-dist: error: {line}" for line in str(e).split("\n")), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("qa-dist: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`qa-dist config --keys | head`): as any shell tool, stop quietly.
        # stdout is pointed at /dev/null so that the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["EXIT_USAGE", "LAUNCH_FLAGS", "PREDICT_FLAGS", "build_parser", "main"]
