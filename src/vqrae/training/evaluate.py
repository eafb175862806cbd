"""Measure a VQRAE tokenizer's reconstructions on a dataset or a folder: `vqrae-evaluate`
(`python -m vqrae.training.evaluate`).

    vqrae-evaluate --model out/stage1 --output_dir eval/                           # the built-in validation photos
    vqrae-evaluate --model org/vqrae-cosmos --validation_dir photos/ --output_dir eval/
    vqrae-evaluate --model out/stage1 --dataset_name org/images --split validation --output_dir eval/
    accelerate launch -m vqrae.training.evaluate ...                                # several processes, same figures

The images are prepared and measured exactly as the training loop's evaluation does, by the same code
(`vqrae.image_data.load_validation_images`, `vqrae.training.metrics.evaluate_model`): fixed centre crops at the
model's resolution, PSNR and SSIM through the tokens, codebook utilisation and perplexity, the bicubic baseline of
the same token grid, and rFID where torch-fidelity's Inception weights exist locally. So, on the same validation
images, it reproduces a training run's `eval_results.json`.

It writes to `--output_dir`:

    eval_results.json     the flat results object the model card reads (`vqrae.training.model_card`)
    reconstructions.png   the first `--num_examples` images (top row) above their reconstructions, and the bicubic
                          baseline of the same token grid (bottom row): the training run's picture
    codebook_usage.png    how often each code is used on these images
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..cli_utils import UsageError, one_line_errors, run_cli, setup_logging

logger = logging.getLogger(__name__)


@dataclass
class EvaluateArguments:
    """Arguments of `vqrae-evaluate` (see `--help`)."""

    model: str
    output_dir: str
    revision: str | None = None
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    dataset_revision: str | None = None
    validation_dir: str | None = None
    split: str = "validation"
    image_column: str | None = None
    streaming: bool = False
    max_eval_samples: int | None = 256
    batch_size: int = 32
    num_examples: int = 8
    step: int = 0
    compute_rfid: bool = True
    inception_weights: str | None = None

    def __post_init__(self):
        if self.dataset_name is not None and self.validation_dir is not None:
            raise UsageError(
                "Give at most one source of images: `--dataset_name` or `--validation_dir` "
                f"(got dataset_name={self.dataset_name!r}, validation_dir={self.validation_dir!r})."
            )
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise UsageError(f"`--output_dir` must be a folder (got {self.output_dir!r}, which is a file).")
        for name, minimum in (("batch_size", 1), ("num_examples", 0), ("step", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise UsageError(f"`--{name}` must be an integer >= {minimum} (got {value!r}).")
        samples = self.max_eval_samples
        if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
            raise UsageError(f"`--max_eval_samples` must be an integer >= 1 or unset (got {samples!r}).")

    @property
    def dataset_label(self) -> str:
        """What `eval_results.json` names as the dataset."""
        from ..image_data import BUILTIN_DATASET_NAME

        if self.validation_dir is not None:
            return self.validation_dir
        return self.dataset_name or BUILTIN_DATASET_NAME


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vqrae-evaluate",
        description="Reconstruction quality of a VQRAE model: PSNR, SSIM, codebook use, bicubic baseline, rFID.",
    )
    parser.add_argument("--model", required=True, help="A VQRAE model: a local folder or a Hub id.")
    parser.add_argument("--revision", default=None, help="Revision of `--model` on the Hub.")
    parser.add_argument("--output_dir", required=True, help="Where eval_results.json and the picture are written.")
    source = parser.add_argument_group("images (default: the built-in validation photos)")
    source.add_argument("--dataset_name", default=None, help="A `datasets` Hub id or local dataset folder.")
    source.add_argument("--dataset_config_name", default=None)
    source.add_argument("--dataset_revision", default=None)
    source.add_argument("--validation_dir", default=None, help="A folder of images (loaded as an `imagefolder`).")
    source.add_argument("--split", default="validation", help="Split of `--dataset_name` to evaluate on.")
    source.add_argument("--image_column", default=None, help="Default: the dataset's only Image column.")
    source.add_argument("--streaming", action="store_true", help="Stream the dataset instead of downloading it.")
    source.add_argument(
        "--max_eval_samples", type=int, default=256, help="Evaluate the first N images (the training default)."
    )
    compute = parser.add_argument_group("evaluation")
    compute.add_argument("--batch_size", type=int, default=32, help="Images per forward pass (per process).")
    compute.add_argument("--num_examples", type=int, default=8, help="Images shown in reconstructions.png.")
    compute.add_argument("--step", type=int, default=0, help="The training step recorded in eval_results.json.")
    compute.add_argument(
        "--no_rfid", dest="compute_rfid", action="store_false", help="Skip rFID even where Inception weights exist."
    )
    compute.add_argument("--inception_weights", default=None, help="A local torch-fidelity Inception weights file.")
    return one_line_errors(parser)


def parse_args(argv: Sequence[str] | None = None) -> EvaluateArguments:
    return EvaluateArguments(**vars(build_parser().parse_args(argv)))


def evaluate(args: EvaluateArguments):
    """Evaluate `args.model` (in this process; one of several under `accelerate launch`) and write the results and
    pictures on the main process. Returns the `vqrae.training.metrics.EvaluationResult` (its `metrics` are the
    `eval_results.json` object)."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    from ..image_data import load_image_dataset, load_validation_images
    from ..tokenize import load_model_and_processor
    from .metrics import evaluate_model, write_evaluation

    accelerator = Accelerator()
    model, processor = load_model_and_processor(args.model, args.revision, accelerator.device)
    dataset, image_column = load_image_dataset(
        args.split,
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        validation_dir=args.validation_dir,
        image_column=args.image_column,
        streaming=args.streaming,
        revision=args.dataset_revision,
    )
    # The same call as the training loop's, so the same images come out.
    validation = load_validation_images(
        dataset,
        image_column,
        model.config.vision_config.image_size,
        dataset_name=args.dataset_label,
        dataset_split=args.split,
        max_samples=args.max_eval_samples,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
        resample=int(processor.resample),
    )
    unreadable = sum(gather_object([validation.num_unreadable]))
    readable = sum(gather_object([len(validation.images)]))
    if readable == 0:
        raise UsageError(
            f"No image of {args.dataset_label!r} (split {args.split!r}) could be read: {unreadable} unreadable; give "
            "a source with readable images (`--validation_dir`, or `--dataset_name` and `--split`)."
        )
    if unreadable:
        logger.warning("%d unreadable image(s) were skipped.", unreadable)
    result = evaluate_model(
        model,
        validation,
        image_processor=processor,
        batch_size=args.batch_size,
        step=args.step,
        accelerator=accelerator,
        num_examples=args.num_examples,
        compute_rfid=args.compute_rfid,
        inception_weights=args.inception_weights,
    )
    if accelerator.is_main_process:
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_evaluation(output_dir, result)
    accelerator.wait_for_everyone()
    return result


def _main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    from accelerate import PartialState

    result = evaluate(parse_args(argv))
    if PartialState().is_main_process:
        print(json.dumps(result.metrics, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`vqrae-evaluate`: a user error is one line on stderr and exit status 2 (`vqrae.cli_utils.run_cli`)."""
    return run_cli("vqrae-evaluate", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
