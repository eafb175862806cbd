"""Train a VQRAE tokenizer: `python scripts/train.py ...` or `accelerate launch scripts/train.py ...`.

The same as the `vqrae-train` console script; see `python scripts/train.py --help` for the options.
"""

from vqrae.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
