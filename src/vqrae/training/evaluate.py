"""Measure a VQRAE tokenizer's reconstructions on a dataset or a folder: `vqrae-evaluate`
(`python -m vqrae.cli.evaluate`).

    vqrae-evaluate --model out/stage1 --output_dir eval/                           # the built-in validation photos
    vqrae-evaluate --model org/vqrae-cosmos --validation_dir photos/ --output_dir eval/
    vqrae-evaluate --model out/stage1 --dataset_name org/images --split validation --output_dir eval/
    accelerate launch -m vqrae.cli.evaluate ...                                     # several processes, same figures

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

import logging
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import gather_object

from ..arguments import (
    ComputeArguments,
    ImageSourceArguments,
    ModelSourceArguments,
    check_at_least,
    check_output_dir,
)
from ..builtin_photos import BUILTIN_DATASET_NAME
from ..errors import UsageError
from ..image_data import load_image_dataset, load_validation_images
from ..image_decoding import decode_images
from ..loading import load_model_and_processor
from .metrics import codebook_use_on_crops, evaluate_model, write_evaluation

__all__ = ["EvaluateArguments", "evaluate"]

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class EvaluateArguments(ModelSourceArguments, ImageSourceArguments, ComputeArguments):
    """Arguments of `vqrae-evaluate` (see `--help`): the model, the images (default: the built-in validation
    photos; or `--dataset_name` / `--validation_dir`), the evaluation."""

    output_dir: str = field(metadata={"help": "Where eval_results.json and the pictures are written."})
    validation_dir: str | None = field(
        default=None, metadata={"help": "A folder of images (loaded as an `imagefolder`), instead of --dataset_name."}
    )
    split: str = field(default="validation", metadata={"help": "Split of `--dataset_name` to evaluate on."})
    max_eval_samples: int | None = field(
        default=512, metadata={"help": "Evaluate the first N images (the training default)."}
    )
    num_examples: int = field(default=8, metadata={"help": "Images shown in reconstructions.png."})
    num_crops: int = field(
        default=0,
        metadata={
            "help": "Also measure codebook use over this many random resized crops of the images (seeded; 0: skip). "
            "Enough crops give at least twice as many tokens as the codebook has codes, which the validation "
            "tokens alone may not."
        },
    )
    step: int = field(default=0, metadata={"help": "The training step recorded in eval_results.json."})
    rfid: bool = field(
        default=True, metadata={"help": "rFID where Inception weights exist locally (--no_rfid: skip it)."}
    )
    inception_weights: str | None = field(
        default=None, metadata={"help": "A local torch-fidelity Inception weights file."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.dataset_name is not None and self.validation_dir is not None:
            raise UsageError(
                "Give at most one source of images: `--dataset_name` or `--validation_dir` "
                f"(got dataset_name={self.dataset_name!r}, validation_dir={self.validation_dir!r})."
            )
        check_output_dir(self.output_dir)
        check_at_least("num_examples", self.num_examples, 0)
        check_at_least("step", self.step, 0)
        check_at_least("num_crops", self.num_crops, 0)
        check_at_least("max_eval_samples", self.max_eval_samples, 1, optional=True)

    @property
    def dataset_label(self) -> str:
        """What `eval_results.json` names as the dataset."""
        if self.validation_dir is not None:
            return self.validation_dir
        return self.dataset_name or BUILTIN_DATASET_NAME


def evaluate(args: EvaluateArguments):
    """Evaluate `args.model` (in this process; one of several under `accelerate launch`) and write the results and
    pictures on the main process. Returns the `vqrae.training.metrics.EvaluationResult` (its `metrics` are the
    `eval_results.json` object)."""
    accelerator = Accelerator()
    model, processor = load_model_and_processor(args.model, args.revision, accelerator.device)
    dataset, image_column = load_image_dataset(args.split, validation_dir=args.validation_dir, **args.source_kwargs())
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
        compute_rfid=args.rfid,
        inception_weights=args.inception_weights,
    )
    # What is left runs on the main process alone and the others need none of it: they return now rather than wait
    # in a barrier through the crops (long with many of them), which NCCL's watchdog (10 minutes) would abort.
    if args.num_crops and accelerator.is_main_process:
        # The whole images (not the evaluated centre crops), on the main process: every image, one count.
        images, _ = decode_images(dataset, image_column, args.max_eval_samples)
        result.metrics["crop_codebook_use"] = codebook_use_on_crops(model, images, processor, args.num_crops)
    if accelerator.is_main_process:
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_evaluation(output_dir, result)
    return result
