"""Evaluating a VQRAE tokenizer on validation images: one function, `evaluate_model`, shared by the training loop
and `vqrae-evaluate`, so both write the same `eval_results.json` for the same model and images.

What is measured, on 8-bit RGB images (what a user gets back as a PNG):

- `psnr`, `ssim`: mean over images of torchmetrics' PSNR and SSIM (data range 1, Gaussian window 11, sigma 1.5)
  between each image and its reconstruction through the tokens (`encode(...).indices` -> `decode_from_indices`);
  each image's PSNR is capped at `PSNR_CAP_DB` (100 dB, as common tools do), so an exact copy counts as 100 dB,
  not infinity, and `eval_results.json` stays valid JSON (it is written with `allow_nan=False`: a non-finite
  value is refused rather than written);
- `codebook_utilization`, `used_codes`, `perplexity`: how much of the codebook the validation tokens use
  (`vqrae.codebook_statistics` over all tokens of all images);
- `bits_per_image`: `h * w * log2(codebook_size)` for an `h x w` token grid;
- the bicubic baseline with the same grid: each image shrunk (bicubic, antialiased) to an `h x w` 8-bit RGB
  thumbnail and scaled back up (bicubic); it carries `h * w * 24` bits (`bicubic_bits_per_image`);
- `rfid`: Frechet Inception Distance between the images and their reconstructions, only when torch-fidelity and
  its Inception weights are available locally (nothing is downloaded); otherwise `None`, said once in the log.

With several processes, each evaluates its share and the per-image figures are gathered and ordered by image index,
so the result does not depend on the number of processes.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..atomic_io import atomic_write
from ..image_data import ValidationImages
from ..quantizers import codebook_statistics
from .run_files import CODEBOOK_USAGE_FILE, EVAL_RESULTS_FILE, RECONSTRUCTIONS_FILE

logger = logging.getLogger(__name__)

__all__ = [
    "EVAL_RESULT_KEYS",
    "EvaluationResult",
    "bicubic_baseline",
    "evaluate_model",
    "find_inception_weights",
    "save_eval_results",
    "write_evaluation",
]

EVAL_RESULT_KEYS = (
    "dataset_name",
    "dataset_split",
    "held_out",
    "num_images",
    "image_size",
    "step",
    "psnr",
    "ssim",
    "codebook_utilization",
    "used_codes",
    "perplexity",
    "bits_per_image",
    "bicubic_psnr",
    "bicubic_ssim",
    "bicubic_bits_per_image",
    "rfid",
)

# torch-fidelity's Inception v3 weights (what torchmetrics' FID uses), looked up in the torch hub cache.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
# An identical image has an infinite PSNR; 100 dB is the usual cap (e.g. skimage-style tools, libvmaf's PSNR).
PSNR_CAP_DB = 100.0
_rfid_unavailable_reported = False


@dataclass
class EvaluationResult:
    """What `evaluate_model` returns (the same on every process).

    Args:
        metrics: the flat `eval_results.json` object (keys `EVAL_RESULT_KEYS`).
        code_counts: how often each code was used over the validation tokens, `(codebook_size,)` int64.
        originals, reconstructions, bicubic: `num_examples` validation images spread evenly over the split (the
            first ones when its size is unknown), their reconstructions and their bicubic baselines, as 8-bit RGB
            PIL images (main process only; else empty).
    """

    metrics: dict
    code_counts: torch.Tensor
    originals: list[Image.Image]
    reconstructions: list[Image.Image]
    bicubic: list[Image.Image]


def bicubic_baseline(image: Image.Image, grid_size: tuple[int, int]) -> Image.Image:
    """`image` shrunk to an `(h, w)` 8-bit RGB thumbnail (bicubic, antialiased) and scaled back up (bicubic)."""
    height, width = grid_size
    thumbnail = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    return thumbnail.resize(image.size, Image.Resampling.BICUBIC)


def find_inception_weights(path: str | None = None) -> str | None:
    """The local Inception weights for rFID (`path`, or torch-fidelity's file in the torch hub cache) when they and
    torch-fidelity are available; else `None`. Never downloads."""
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        return None
    candidates = [path] if path else [os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS_FILE)]
    return next((candidate for candidate in candidates if candidate and os.path.isfile(candidate)), None)


def _to_unit_tensor(images: list[Image.Image]) -> torch.Tensor:
    """8-bit RGB PIL images -> `(B, 3, H, W)` float32 in [0, 1]."""
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(255.0)


def _unit_to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def _image_quality(preds: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image PSNR (capped at `PSNR_CAP_DB`) and SSIM `(B,)` of images in [0, 1], with torchmetrics."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    psnr = peak_signal_noise_ratio(preds, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    psnr = psnr.clamp(max=PSNR_CAP_DB)
    ssim = structural_similarity_index_measure(preds, target, data_range=1.0, reduction="none")
    return psnr.double(), ssim.double()


def _gather(records: list, accelerator) -> list:
    if accelerator is None or accelerator.num_processes == 1:
        return records
    from accelerate.utils import gather_object

    return gather_object(records)


@torch.no_grad()
def evaluate_model(
    model,
    validation: ValidationImages,
    *,
    image_processor=None,
    batch_size: int = 32,
    step: int = 0,
    accelerator=None,
    num_examples: int = 8,
    compute_rfid: bool = True,
    inception_weights: str | None = None,
) -> EvaluationResult:
    """Evaluate `model` (a `VQRAEModel`, possibly wrapped by accelerate) on `validation`.

    Every process passes its own share (`load_validation_images(..., process_index, num_processes)`) and gets the
    same `EvaluationResult`. The model runs in eval mode and float32, without autocast, in batches of
    `batch_size`; its training mode is restored afterwards. See the module docstring for the metrics.
    """
    global _rfid_unavailable_reported
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    if image_processor is None:
        image_processor = model.get_image_processor()
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer (got {batch_size!r}).")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    weights = find_inception_weights(inception_weights) if compute_rfid else None
    fid = None
    if weights is not None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights).to(device)
    elif compute_rfid and not _rfid_unavailable_reported:
        _rfid_unavailable_reported = True
        logger.info(
            "rFID is not computed: it needs torch-fidelity and its Inception weights (%s in %s) locally; "
            "`rfid` is reported as null.",
            INCEPTION_WEIGHTS_FILE,
            os.path.join(torch.hub.get_dir(), "checkpoints"),
        )

    if validation.total is not None and validation.total > num_examples:
        wanted = {i * validation.total // num_examples for i in range(num_examples)}
    else:
        wanted = set(range(num_examples))
    records = []  # (index, psnr, ssim, bicubic_psnr, bicubic_ssim, token indices)
    examples = {}  # index -> (original, reconstruction, bicubic)
    grid = None
    try:
        for start in range(0, len(validation.images), batch_size):
            images = validation.images[start : start + batch_size]
            image_indices = validation.indices[start : start + batch_size]
            pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"].float().to(device)
            with torch.autocast(device_type=device.type, enabled=False):
                tokens = model.encode(pixel_values).indices
                reconstruction = model.decode_from_indices(tokens).reconstruction.float()
            grid = tuple(tokens.shape[-2:])
            pixel_mean = torch.as_tensor(image_processor.image_mean, dtype=torch.float32, device=device)
            pixel_std = torch.as_tensor(image_processor.image_std, dtype=torch.float32, device=device)
            reconstruction = reconstruction * pixel_std.view(1, -1, 1, 1) + pixel_mean.view(1, -1, 1, 1)
            reconstruction8 = _unit_to_uint8(reconstruction).cpu()
            original8 = _unit_to_uint8(_to_unit_tensor(images))
            bicubic8 = _unit_to_uint8(_to_unit_tensor([bicubic_baseline(image, grid) for image in images]))

            target = original8.float() / 255
            psnr, ssim = _image_quality(reconstruction8.float() / 255, target)
            bicubic_psnr, bicubic_ssim = _image_quality(bicubic8.float() / 255, target)
            if fid is not None:
                fid.update(original8.to(device), real=True)
                fid.update(reconstruction8.to(device), real=False)
            for i, index in enumerate(image_indices):
                records.append(
                    (
                        index,
                        psnr[i].item(),
                        ssim[i].item(),
                        bicubic_psnr[i].item(),
                        bicubic_ssim[i].item(),
                        tokens[i].cpu().numpy(),
                    )
                )
                if index in wanted:
                    examples[index] = (original8[i], reconstruction8[i], bicubic8[i])
        rfid = None
        if fid is not None:
            # torchmetrics syncs its states across processes; FID needs at least two images on each side.
            try:
                rfid = float(fid.compute())
            except (RuntimeError, ValueError) as error:
                logger.warning("rFID could not be computed (%s); reported as null.", error)
    finally:
        model.train(was_training)

    gathered = sorted(_gather(records, accelerator), key=lambda record: record[0])
    all_examples = _gather([(index, *images) for index, images in examples.items()], accelerator)
    if not gathered:
        raise ValueError(
            f"No validation image could be evaluated ({validation.dataset_name!r}, split {validation.dataset_split!r} "
            "is empty or unreadable)."
        )
    token_grid = tuple(gathered[0][5].shape)
    codebook_size = model.codebook_size
    all_tokens = torch.from_numpy(np.stack([record[5] for record in gathered]))
    stats = codebook_statistics(all_tokens, codebook_size)
    code_counts = torch.bincount(all_tokens.reshape(-1), minlength=codebook_size)
    num_tokens = token_grid[0] * token_grid[1]

    def mean(column: int) -> float:
        return float(np.mean([record[column] for record in gathered]))

    metrics = {
        "dataset_name": validation.dataset_name,
        "dataset_split": validation.dataset_split,
        "held_out": validation.held_out,
        "num_images": len(gathered),
        "image_size": validation.image_size,
        "step": int(step),
        "psnr": mean(1),
        "ssim": mean(2),
        "codebook_utilization": float(stats["utilization"]),
        "used_codes": int(stats["used_codes"]),
        "perplexity": float(stats["perplexity"]),
        "bits_per_image": num_tokens * math.log2(codebook_size),
        "bicubic_psnr": mean(3),
        "bicubic_ssim": mean(4),
        "bicubic_bits_per_image": num_tokens * 24,
        "rfid": rfid,
    }
    is_main = accelerator is None or accelerator.is_main_process
    picked = sorted(all_examples, key=lambda item: item[0])[:num_examples] if is_main else []

    def to_pil(tensor: torch.Tensor) -> Image.Image:
        return Image.fromarray(np.ascontiguousarray(tensor.permute(1, 2, 0).numpy()), mode="RGB")

    return EvaluationResult(
        metrics=metrics,
        code_counts=code_counts,
        originals=[to_pil(item[1]) for item in picked],
        reconstructions=[to_pil(item[2]) for item in picked],
        bicubic=[to_pil(item[3]) for item in picked],
    )


def write_evaluation(folder, result: EvaluationResult) -> None:
    """Write an evaluation's files into `folder`: `eval_results.json`, `reconstructions.png` and
    `codebook_usage.png` (what the training run and `vqrae-evaluate` both write)."""
    from . import plots

    save_eval_results(result.metrics, os.path.join(folder, EVAL_RESULTS_FILE))
    plots.plot_reconstructions(
        os.path.join(folder, RECONSTRUCTIONS_FILE),
        result.originals,
        result.reconstructions,
        result.bicubic,
        result.metrics,
    )
    plots.plot_codebook_usage(os.path.join(folder, CODEBOOK_USAGE_FILE), result.code_counts, result.metrics)


def save_eval_results(metrics: dict, path: str) -> None:
    """Write `metrics` (the flat `eval_results.json` object) to `path`, atomically, as strict JSON: a non-finite
    value (which JSON cannot hold) raises a `ValueError` naming it, and nothing is written."""
    missing = [key for key in EVAL_RESULT_KEYS if key not in metrics]
    if missing:
        raise ValueError(f"`metrics` lacks the eval_results keys {missing}.")
    results = {key: metrics[key] for key in EVAL_RESULT_KEYS}
    try:
        text = json.dumps(results, indent=2, allow_nan=False)
    except ValueError as error:  # Infinity / NaN: Python's json would write them, but they are not JSON
        non_finite = {
            key: value for key, value in results.items() if isinstance(value, float) and not math.isfinite(value)
        }
        raise ValueError(f"`metrics` holds values that JSON cannot represent: {non_finite} ({error}).") from error
    atomic_write(path, text + "\n")
