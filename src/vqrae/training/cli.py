"""`vqrae-train`: train a VQRAE tokenizer (alone, or under `accelerate launch`)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from ..cli_utils import run_cli, setup_logging

__all__ = ["main"]


def _main(argv: Sequence[str] | None) -> int:
    from .args import parse_args

    arguments = sys.argv[1:] if argv is None else list(argv)
    model_args, data_args, training_args = parse_args(arguments)
    setup_logging()
    from .trainer import train

    # How the run was started (scripts/train.py or the console script, possibly under `accelerate launch`), for the
    # command that resumes it; `python -m vqrae.training.cli` and a call with `argv` are `vqrae-train`.
    program = sys.argv[0] if argv is None and sys.argv else "vqrae-train"
    if os.path.abspath(program) == os.path.abspath(__file__):
        program = "vqrae-train"
    train(model_args, data_args, training_args, command=[program, *arguments])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `[--config FILE_OR_PRESET] [--option value ...]` and train; see `vqrae-train --help`. A user error
    prints one line and exits 2; Ctrl-C says where the last checkpoint is and exits 130."""
    return run_cli("vqrae-train", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
