"""`vqrae-train`: train a VQRAE tokenizer (alone, or under `accelerate launch`)."""

from __future__ import annotations

from collections.abc import Sequence

from ..cli_utils import run_cli, setup_logging

__all__ = ["main"]


def _main(argv: Sequence[str] | None) -> int:
    from .args import parse_args

    model_args, data_args, training_args = parse_args(None if argv is None else list(argv))
    setup_logging()
    from .trainer import train

    train(model_args, data_args, training_args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `[--config FILE_OR_PRESET] [--option value ...]` and train; see `vqrae-train --help`. A user error
    prints one line and exits 2; Ctrl-C says where the last checkpoint is and exits 130."""
    return run_cli("vqrae-train", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
