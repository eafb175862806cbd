"""`vqrae-tokenize` (`python -m vqrae.cli.tokenize`, `accelerate launch -m vqrae.cli.tokenize`): turn an image
dataset into a dataset of VQRAE tokens; the job and its options are `vqrae.tokenize`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..tokenize import TokenizeArguments, tokenize
from .common import parse_dataclasses, run_cli, setup_logging

__all__ = ["main", "parse_tokenize_args"]


def parse_tokenize_args(argv: Sequence[str] | None = None) -> TokenizeArguments:
    description = "Encode every image of a dataset into VQRAE tokens, written as a resumable Parquet dataset."
    return parse_dataclasses(TokenizeArguments, "vqrae-tokenize", description, argv)[0]


def _tokenize_command(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    tokenize(parse_tokenize_args(argv))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`vqrae-tokenize`: a user error is one line on stderr and exit status 2 (`vqrae.cli.common.run_cli`)."""
    return run_cli("vqrae-tokenize", _tokenize_command, argv)


if __name__ == "__main__":
    sys.exit(main())
