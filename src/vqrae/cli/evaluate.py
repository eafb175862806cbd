"""`vqrae-evaluate` (`python -m vqrae.cli.evaluate`, `accelerate launch -m vqrae.cli.evaluate`): measure a VQRAE
tokenizer's reconstructions; the job and its options are `vqrae.training.evaluate`."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from accelerate import PartialState

from ..training.evaluate import EvaluateArguments, evaluate
from .common import parse_dataclasses, run_cli, setup_logging

__all__ = ["main", "parse_evaluate_args"]


def parse_evaluate_args(argv: Sequence[str] | None = None) -> EvaluateArguments:
    description = "Reconstruction quality of a VQRAE model: PSNR, SSIM, codebook use, bicubic baseline, rFID."
    return parse_dataclasses(EvaluateArguments, "vqrae-evaluate", description, argv)[0]


def _evaluate_command(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    result = evaluate(parse_evaluate_args(argv))
    if PartialState().is_main_process:
        print(json.dumps(result.metrics, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`vqrae-evaluate`: a user error is one line on stderr and exit status 2 (`vqrae.cli.common.run_cli`)."""
    return run_cli("vqrae-evaluate", _evaluate_command, argv)


if __name__ == "__main__":
    sys.exit(main())
