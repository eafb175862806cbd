"""`vqrae-train`: train a VQRAE tokenizer (alone, or under `accelerate launch`)."""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Parse `[--config FILE_OR_PRESET] [--option value ...]` and train; see `vqrae-train --help`."""
    from .args import parse_args

    model_args, data_args, training_args = parse_args(argv)
    is_main = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if is_main else logging.WARNING,
        stream=sys.stderr,
    )
    for noisy in ("accelerate", "httpx", "urllib3", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from .trainer import train

    train(model_args, data_args, training_args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
