"""What every vqrae command-line tool shares: one-line user errors, the logging set-up, Ctrl-C, and the argument
dataclasses their `HfArgumentParser`s are built from (where the model comes from, where the images come from, how
they are computed), so each option is declared once.

A mistake in what the user gave (an option, a path, a dataset, a run folder) raises `UsageError`; `run_cli` prints
it as one line, `PROG: error: ...`, on stderr and exits with status 2, as argparse does for a bad option. Anything
else is a bug and keeps its traceback. `UsageError` is a `ValueError`, so library callers can catch either.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import ClassVar

from transformers import HfArgumentParser

from .configuration_vqrae import is_int
from .errors import UsageError

__all__ = [
    "ComputeArguments",
    "ImageSourceArguments",
    "ModelSourceArguments",
    "OptionParser",
    "UsageError",
    "check_at_least",
    "check_output_dir",
    "is_main_process",
    "one_line_errors",
    "parse_dataclasses",
    "run_cli",
    "setup_logging",
]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
_NOISY_LOGGERS = ("accelerate", "httpx", "urllib3", "filelock", "fsspec")


def check_at_least(name: str, value, minimum: int, optional: bool = False) -> None:
    """`UsageError` unless `value` is an integer >= `minimum` (or None, when `optional`)."""
    if optional and value is None:
        return
    if not is_int(value) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or unset" if optional else "")
        raise UsageError(f"`--{name}` must be {allowed} (got {value!r}).")


def check_output_dir(output_dir: str) -> None:
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise UsageError(f"`--output_dir` must be a folder (got {output_dir!r}, which is a file).")


@dataclass(kw_only=True)
class ModelSourceArguments:
    """Which trained VQRAE model a tool runs."""

    model: str = field(metadata={"help": "A VQRAE model: a local folder or a Hub id."})
    revision: str | None = field(default=None, metadata={"help": "Revision of `--model` on the Hub."})


@dataclass(kw_only=True)
class ImageSourceArguments:
    """Where the images come from: a `datasets` dataset (a Hub id or a local dataset folder; by default the built-in
    photos where a tool has them). Each tool adds its folder option and split."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A `datasets` Hub id or local dataset folder ('builtin:photos': the built-in photos; "
            "'builtin:photos+colour': with two synthetic colour images among the training photos)."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    dataset_revision: str | None = field(default=None, metadata={"help": "The dataset's revision (branch, commit)."})
    image_column: str | None = field(
        default=None, metadata={"help": "The column holding the images (default: the dataset's only Image column)."}
    )
    streaming: bool = field(
        default=False, metadata={"changes_tokens": False, "help": "Stream the dataset instead of downloading it."}
    )
    # How this tool's command line chooses a split (named when a split is missing).
    SPLIT_OPTION: ClassVar[str] = "--split"

    def source_kwargs(self) -> dict:
        """These options as the keyword arguments of `vqrae.image_data.load_image_dataset`."""
        return {
            "dataset_name": self.dataset_name,
            "dataset_config_name": self.dataset_config_name,
            "revision": self.dataset_revision,
            "image_column": self.image_column,
            "streaming": self.streaming,
            "split_option": self.SPLIT_OPTION,
        }


@dataclass(kw_only=True)
class ComputeArguments:
    """How the images are pushed through the model."""

    batch_size: int = field(default=32, metadata={"help": "Images per forward pass (per process)."})
    dataloader_num_workers: int = field(
        default=0, metadata={"changes_tokens": False, "help": "Processes that decode images."}
    )

    def __post_init__(self):
        check_at_least("batch_size", self.batch_size, 1)
        check_at_least("dataloader_num_workers", self.dataloader_num_workers, 0)


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


def is_main_process() -> bool:
    """Whether this is the main process (rank 0) of a run launched in several processes, or the only one."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


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
        if is_main_process():
            print(f"{prog}: error: {_one_line(str(error))}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if is_main_process():
            print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


def _one_line(message: str) -> str:
    return " ".join(message.split())
