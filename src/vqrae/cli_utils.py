"""What every vqrae command-line tool shares: one-line user errors, the logging set-up and Ctrl-C.

A mistake in what the user gave (an option, a path, a dataset, a run folder) raises `UsageError`; `run_cli` prints
it as one line, `PROG: error: ...`, on stderr and exits with status 2, as argparse does for a bad option. Anything
else is a bug and keeps its traceback. `UsageError` is a `ValueError`, so library callers can catch either.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

__all__ = ["UsageError", "one_line_errors", "run_cli", "setup_logging"]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
_NOISY_LOGGERS = ("accelerate", "httpx", "urllib3", "filelock", "fsspec")


class UsageError(ValueError):
    """Bad input from the user: the message says which option or file, the value, and what is allowed."""


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make `parser` report its own errors (unknown option, missing value) as one line and exit 2."""

    def error(message: str):
        parser.exit(EXIT_USAGE, f"{parser.prog}: error: {_one_line(message)}\n")

    parser.error = error
    return parser


def setup_logging() -> None:
    """INFO on the main process (rank 0), warnings elsewhere, on stderr; third-party chatter down to warnings."""
    is_main = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if is_main else logging.WARNING,
        stream=sys.stderr,
    )
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def run_cli(prog: str, main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run `main(argv)` as the command `prog`: a `UsageError` becomes one line on stderr and exit status 2, Ctrl-C
    exit status 130 without a traceback (the tool has said what it left behind); other errors propagate."""
    try:
        return main(argv) or 0
    except UsageError as error:
        print(f"{prog}: error: {_one_line(str(error))}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


def _one_line(message: str) -> str:
    return " ".join(message.split())
