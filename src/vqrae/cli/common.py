"""What the vqrae command-line tools share: one-line user errors, the argument parser, the logging set-up, Ctrl-C.

The library and the training package raise `vqrae.errors.UsageError` for a mistake in what the user gave (an
option, a path, a dataset, a run folder); `run_cli` prints it as one line, `PROG: error: ...`, on stderr and exits
with status 2, as argparse does for a bad option. Anything else is a bug and keeps its traceback. `UsageError` is a
`ValueError`, so library callers can catch either.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from collections.abc import Callable, Sequence
from types import MappingProxyType

import torch.distributed
from transformers import HfArgumentParser

from ..arguments import is_main_process
from ..errors import UsageError

__all__ = ["OptionParser", "one_line_errors", "parse_dataclasses", "run_cli", "setup_logging"]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
_NOISY_LOGGERS = ("accelerate", "httpx", "urllib3", "filelock", "fsspec")


# What an option's field metadata may say about it besides argparse's keywords: `resumable` (a training resume may
# change it), `changes_tokens` (False: the tokens do not depend on it).
OPTION_FLAGS = ("resumable", "changes_tokens")


class OptionParser(HfArgumentParser):
    """`HfArgumentParser`, which passes a field's whole metadata to `add_argument`, without the `OPTION_FLAGS`."""

    @staticmethod
    def _parse_dataclass_field(parser, field):
        field = copy.copy(field)
        field.metadata = MappingProxyType({k: v for k, v in field.metadata.items() if k not in OPTION_FLAGS})
        HfArgumentParser._parse_dataclass_field(parser, field)


def parse_dataclasses(dataclass_type, prog: str, description: str, argv: Sequence[str] | None, positional=()):
    """Parse `argv` into one `dataclass_type` with `transformers.HfArgumentParser` (errors in one line); the
    `positional` `(name, help)` arguments come back as a dict beside it."""
    parser = one_line_errors(OptionParser(dataclass_type, prog=prog, description=description))
    for name, help_text in positional:
        parser.add_argument(name, help=help_text)
    *outputs, unused = parser.parse_args_into_dataclasses(
        args=None if argv is None else list(argv), return_remaining_strings=True
    )
    if unused:
        parser.error(f"unrecognized arguments: {' '.join(unused)}")
    return outputs[0], (vars(outputs[1]) if len(outputs) > 1 else {})


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make `parser` report its own errors (unknown option, missing value) as one line and exit 2."""

    def error(message: str):
        parser.exit(EXIT_USAGE, f"{parser.prog}: error: {_one_line(message)}\n")

    parser.error = error
    return parser


def setup_logging() -> None:
    """INFO on the main process (rank 0), warnings elsewhere, on stderr; third-party chatter down to warnings."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if is_main_process() else logging.WARNING,
        stream=sys.stderr,
    )
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def run_cli(prog: str, main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run `main(argv)` as the command `prog`: a `UsageError` becomes one line on stderr and exit status 2, Ctrl-C
    exit status 130 without a traceback (the tool has said what it left behind); other errors propagate.

    In a run of several processes only the main one prints: every process checks the same options, data and
    checkpoint and refuses alike (or is interrupted alike), and one line is what the user needs; the others exit
    with the same status."""
    try:
        return main(argv) or 0
    except UsageError as error:
        _leave_process_group()
        if is_main_process():
            print(f"{prog}: error: {_one_line(str(error))}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        _leave_process_group()
        if is_main_process():
            print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


def _leave_process_group() -> None:
    """Leave a run's process group before exiting early. Left to the interpreter's exit, gloo's teardown can race the
    other processes' leaving and abort (SIGABRT, "terminate called without an active exception") instead of exiting
    with the status the tool chose (seen once in `test_processes_that_find_different_checkpoints_are_refused`)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _one_line(message: str) -> str:
    return " ".join(message.split())
