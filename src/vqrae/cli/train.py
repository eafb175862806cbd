"""`vqrae-train`: train a VQRAE tokenizer (alone, or under `accelerate launch -m vqrae.cli.train`).

Options come from a YAML file (`--config`, a path or the name of a preset in `vqrae/configs/`) overridden by the
command line; `vqrae.training.args` declares them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..training import args as training_args_module
from ..training.args import ALL_ARGUMENT_CLASSES, OPTION_NAMES
from ..training.config_files import load_config_file
from ..training.trainer import train
from .common import OptionParser, one_line_errors, run_cli, setup_logging

__all__ = ["main", "parse_train_args"]


def parse_train_args(argv: Sequence[str] | None = None):
    """Parse `[--config FILE_OR_PRESET] [--option value ...]` into `(model_args, data_args, training_args)`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("--config", default=None)
    known, remaining = config_parser.parse_known_args(argv)

    description = training_args_module.__doc__.split("\n\n")[0]
    parser = one_line_errors(OptionParser(ALL_ARGUMENT_CLASSES, prog="vqrae-train", description=description))
    parser.add_argument(
        "--config", default=None, help="A YAML file of options (or a preset name: cosmos_fsq, vq, ...)."
    )
    if known.config is not None:
        parser.set_defaults(**load_config_file(known.config, OPTION_NAMES))
    *arguments, unused = parser.parse_args_into_dataclasses(args=remaining, return_remaining_strings=True)
    if unused:
        parser.error(f"unrecognized arguments: {' '.join(unused)}")
    model_args, data_args, training_args, _ = arguments
    return model_args, data_args, training_args


def _train_command(argv: Sequence[str] | None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    model_args, data_args, training_args = parse_train_args(arguments)
    setup_logging()
    # How the run was started (scripts/train.py or the console script, possibly under `accelerate launch`), for the
    # command that resumes it; `python -m vqrae.cli.train` and a call with `argv` are `vqrae-train`.
    program = sys.argv[0] if argv is None and sys.argv else "vqrae-train"
    if os.path.abspath(program) == os.path.abspath(__file__):
        program = "vqrae-train"
    train(model_args, data_args, training_args, command=[program, *arguments])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `[--config FILE_OR_PRESET] [--option value ...]` and train; see `vqrae-train --help`. A user error
    prints one line and exits 2; Ctrl-C says where the last checkpoint is and exits 130."""
    return run_cli("vqrae-train", _train_command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
