"""Evaluating a VQRAE tokenizer on validation images: one function, `evaluate_model`, shared by the training loop
and `vqrae-evaluate`, so both write the same `eval_results.json` for the same model and images.

What is measured, on 8-bit RGB images (what a user gets back as a PNG):

- `psnr`, `ssim`: mean over images of torchmetrics' PSNR and SSIM (data range 1, Gaussian window 11, sigma 1.5)
  between each image and its reconstruction through the tokens (`encode(...).indices` -> `decode_from_indices`);
  each image's PSNR is capped at `PSNR_CAP_DB` (100 dB, as common tools do), so an exact copy counts as 100 dB,
  not infinity, and `eval_results.json` stays valid JSON (it is written with `allow_nan=False`: a non-finite
  value is refused rather than written);
- `psnr_interval`, `ssim_interval` (and the bicubic baseline's): 95 % bootstrap intervals of those means over the
  images (`BOOTSTRAP_RESAMPLES` resamples, a fixed seed). Tiles of one photo are correlated, so the interval is
  that of this set of images, not of the photos they come from;
- `color_error` (and `color_error_interval`, `bicubic_color_error`, `bicubic_color_error_interval`): how far each
  reconstruction's overall colour is from its image's, the mean over images of the CIEDE2000 difference
  (`skimage.color.deltaE_ciede2000`) between the image's mean colour and its reconstruction's, each mean taken over
  the pixels in RGB scaled to [0, 1] (8-bit values / 255) and then converted to CIELAB (`skimage.color.rgb2lab`,
  sRGB, illuminant D65, 2-degree observer), with a 95 % bootstrap interval as for PSNR. 0 is the same mean colour;
  above about 5 the cast is obvious to anyone. It sees a colour cast that PSNR mixes with everything else;
- `seam_score`: how much more the reconstructions change across the borders of the decoder's pixel patches than
  within them, relative to the originals: `(border / within) of the reconstructions` over `(border / within) of
  the originals`, where `border` and `within` are the mean absolute differences of neighbouring pixels across a
  patch border and inside a patch, pooled over the images (1.0: seams no more visible than in the photos; a
  mosaic of patches scores well above). `bicubic_seam_score` is the same for the bicubic baseline;
- `codebook_utilization`, `used_codes`, `perplexity`: how much of the codebook the validation tokens use
  (`vqrae.codebook_statistics` over all `codebook_tokens` tokens of all images; fewer tokens than codes cap the
  utilisation at `codebook_tokens / codebook_size`);
- `crop_codebook_use`: the same over many random crops of the images (`codebook_use_on_crops`: `crops`, `tokens`,
  `used_codes`, `codebook_size`, `codebook_utilization`, `perplexity`), when asked for (`vqrae-evaluate
  --num_crops`); else `None`;
- `bits_per_image`: `h * w * log2(codebook_size)` for an `h x w` token grid;
- the bicubic baseline with the same grid: each image shrunk (bicubic, antialiased) to an `h x w` 8-bit RGB
  thumbnail and scaled back up (bicubic); it carries `h * w * 24` bits (`bicubic_bits_per_image`);
- `rfid`: Frechet Inception Distance between the images and their reconstructions, only when torch-fidelity and
  its Inception weights are available locally (nothing is downloaded); otherwise `None`, said once in the log.

With several processes, each evaluates its share and the per-image figures are gathered and ordered by image index,
so the result does not depend on the number of processes.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from accelerate.utils import gather_object
from PIL import Image
from skimage.color import deltaE_ciede2000, rgb2lab
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance

from ..atomic_io import atomic_write
from ..image_data import ValidationImages, processor_resample, random_resized_crop_box, to_pixel_values
from ..image_utils import denormalize
from ..quantizers import codebook_statistics
from . import plots
from .run_files import CODEBOOK_USAGE_FILE, EVAL_RESULT_FIELDS, EVAL_RESULTS_FILE, RECONSTRUCTIONS_FILE

logger = logging.getLogger(__name__)

__all__ = [
    "EvaluationResult",
    "bicubic_baseline",
    "codebook_use_on_crops",
    "evaluate_model",
    "find_inception_weights",
    "mean_color_error",
    "save_eval_results",
    "write_evaluation",
]

# torch-fidelity's Inception v3 weights (what torchmetrics' FID uses), looked up in the torch hub cache.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
# An identical image has an infinite PSNR; 100 dB is the usual cap (e.g. skimage-style tools, libvmaf's PSNR).
PSNR_CAP_DB = 100.0
BOOTSTRAP_RESAMPLES = 2000
_rfid_unavailable_reported = False


@dataclass
class EvaluationResult:
    """What `evaluate_model` returns (the same on every process).

    Args:
        metrics: the flat `eval_results.json` object (keys `EVAL_RESULT_FIELDS`).
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
    if importlib.util.find_spec("torch_fidelity") is None:  # an optional dependency, needed only for rFID
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
    psnr = peak_signal_noise_ratio(preds, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    psnr = psnr.clamp(max=PSNR_CAP_DB)
    ssim = structural_similarity_index_measure(preds, target, data_range=1.0, reduction="none")
    return psnr.double(), ssim.double()


def mean_color_error(preds: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """Per image `(B,)`: the CIEDE2000 difference between the mean colours of `preds` and `target` (`(B, 3, H, W)`
    RGB in [0, 1]); each mean is taken in RGB, then converted to CIELAB with scikit-image (sRGB, D65)."""
    means = [images.double().mean(dim=(2, 3)).clamp(0, 1).numpy() for images in (preds, target)]
    return deltaE_ciede2000(rgb2lab(means[0]), rgb2lab(means[1]))


def _gather(records: list, accelerator) -> list:
    if accelerator is None or accelerator.num_processes == 1:
        return records
    return gather_object(records)


def bootstrap_interval(samples: np.ndarray, statistic=np.mean, seed: int = 0) -> list[float]:
    """The 95 % percentile-bootstrap interval of `statistic` over the rows of `samples` (`BOOTSTRAP_RESAMPLES`
    resamples with replacement, a fixed seed, so the same images give the same interval)."""
    samples = np.asarray(samples)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(samples), size=(BOOTSTRAP_RESAMPLES, len(samples)))
    values = np.array([statistic(samples[pick]) for pick in picks])
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]


def seam_sums(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Per image `(B, 4)`: the summed absolute differences of horizontally and vertically neighbouring pixels
    across a patch border and inside patches, and how many pairs of each (`[border_sum, border_count, within_sum,
    within_count]`), for `uint8` images `(B, C, H, W)` cut into `patch_size` squares."""
    images = images.double()
    sums = torch.zeros(images.shape[0], 4, dtype=torch.float64)
    for dim in (-1, -2):
        differences = (
            images.narrow(dim, 1, images.shape[dim] - 1) - images.narrow(dim, 0, images.shape[dim] - 1)
        ).abs()
        border = (torch.arange(1, images.shape[dim]) % patch_size) == 0  # pair (j, j + 1) crosses a border at j + 1
        shape = [1] * images.ndim
        shape[dim] = -1
        border = border.view(shape)
        per_pixel = differences.shape[1] * differences.shape[-1 if dim == -2 else -2]
        sums[:, 0] += (differences * border).flatten(1).sum(1)
        sums[:, 1] += int(border.sum()) * per_pixel
        sums[:, 2] += (differences * ~border).flatten(1).sum(1)
        sums[:, 3] += int((~border).sum()) * per_pixel
    return sums


def seam_score(reconstructions: np.ndarray, originals: np.ndarray) -> float | None:
    """`(border / within)` of the reconstructions over that of the originals, pooled over images, from
    `seam_sums` rows (see the module docstring); None where a ratio is undefined (images without any texture)."""
    parts = [
        sums[:, column].sum() / sums[:, column + 1].sum() for sums in (reconstructions, originals) for column in (0, 2)
    ]
    if not all(np.isfinite(parts)) or 0 in (parts[1], parts[2], parts[3]):
        return None
    return float((parts[0] / parts[1]) / (parts[2] / parts[3]))


def _fid(compute_rfid: bool, inception_weights: str | None, device):
    """torchmetrics' FID on the local Inception weights, or None (said once in the log)."""
    global _rfid_unavailable_reported
    weights = find_inception_weights(inception_weights) if compute_rfid else None
    if weights is not None:
        return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights).to(device)
    if compute_rfid and not _rfid_unavailable_reported:
        _rfid_unavailable_reported = True
        logger.info(
            "rFID is not computed: it needs torch-fidelity and its Inception weights (%s in %s) locally; "
            "`rfid` is reported as null.",
            INCEPTION_WEIGHTS_FILE,
            os.path.join(torch.hub.get_dir(), "checkpoints"),
        )
    return None


def _evaluate_batch(model, images: list[Image.Image], image_processor, device, fid) -> dict:
    """One batch through the tokens: the 8-bit originals, reconstructions and bicubic baselines, per-image PSNR
    and SSIM of both, their seam sums and the token grids."""
    pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"].float().to(device)
    with torch.autocast(device_type=device.type, enabled=False):
        tokens = model.encode(pixel_values).indices
        reconstruction = model.decode_from_indices(tokens).reconstruction.float()
    grid = tuple(tokens.shape[-2:])
    batch = {
        "original": _unit_to_uint8(_to_unit_tensor(images)),
        "reconstruction": _unit_to_uint8(denormalize(reconstruction, image_processor)).cpu(),
        "bicubic": _unit_to_uint8(_to_unit_tensor([bicubic_baseline(image, grid) for image in images])),
        "tokens": tokens.cpu().numpy(),
    }
    target = batch["original"].float() / 255
    batch["psnr"], batch["ssim"] = _image_quality(batch["reconstruction"].float() / 255, target)
    batch["bicubic_psnr"], batch["bicubic_ssim"] = _image_quality(batch["bicubic"].float() / 255, target)
    for prefix, name in (("", "reconstruction"), ("bicubic_", "bicubic")):
        batch[prefix + "color_error"] = mean_color_error(batch[name].float() / 255, target)
    patch = pixel_values.shape[-1] // grid[-1]
    for name in ("original", "reconstruction", "bicubic"):
        batch[f"{name}_seams"] = seam_sums(batch[name], patch)
    if fid is not None:
        fid.update(batch["original"].to(device), real=True)
        fid.update(batch["reconstruction"].to(device), real=False)
    return batch


def _summary(records: list[dict], validation: ValidationImages, codebook_size: int, step: int, rfid) -> dict:
    """The `eval_results.json` object from the per-image records of every process (ordered by image index)."""
    column = lambda name: np.array([record[name] for record in records])  # noqa: E731
    all_tokens = torch.from_numpy(np.stack([record["tokens"] for record in records]))
    stats = codebook_statistics(all_tokens, codebook_size)
    num_tokens = all_tokens[0].numel()
    seams = {
        name: np.stack([record[f"{name}_seams"] for record in records])
        for name in ("original", "reconstruction", "bicubic")
    }
    metrics = {
        "dataset_name": validation.dataset_name,
        "dataset_split": validation.dataset_split,
        "held_out": validation.held_out,
        "num_images": len(records),
        "image_size": validation.image_size,
        "step": int(step),
    }
    for prefix in ("", "bicubic_"):
        for name in ("psnr", "ssim", "color_error"):
            values = column(prefix + name)
            metrics[prefix + name] = float(values.mean())
            metrics[f"{prefix}{name}_interval"] = bootstrap_interval(values)
        metrics[prefix + "seam_score"] = seam_score(
            seams["bicubic" if prefix else "reconstruction"], seams["original"]
        )
    metrics.update(
        codebook_utilization=float(stats["utilization"]),
        used_codes=int(stats["used_codes"]),
        codebook_tokens=int(all_tokens.numel()),
        perplexity=float(stats["perplexity"]),
        crop_codebook_use=None,
        bits_per_image=num_tokens * math.log2(codebook_size),
        bicubic_bits_per_image=num_tokens * 24,
        rfid=rfid,
    )
    return {key: metrics[key] for key in EVAL_RESULT_FIELDS}


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
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    image_processor = image_processor if image_processor is not None else model.get_image_processor()
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer (got {batch_size!r}).")
    device = next(model.parameters()).device
    fid = _fid(compute_rfid, inception_weights, device)
    if validation.total is not None and validation.total > num_examples:
        wanted = {i * validation.total // num_examples for i in range(num_examples)}
    else:
        wanted = set(range(num_examples))
    records, examples = [], []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(validation.images), batch_size):
            batch = _evaluate_batch(model, validation.images[start : start + batch_size], image_processor, device, fid)
            for i, index in enumerate(validation.indices[start : start + batch_size]):
                records.append({"index": index, **{name: value[i] for name, value in batch.items()}})
                if index in wanted:
                    examples.append((index, batch["original"][i], batch["reconstruction"][i], batch["bicubic"][i]))
        rfid = _compute_fid(fid)
    finally:
        model.train(was_training)
    for record in records:
        names = [prefix + name for prefix in ("", "bicubic_") for name in ("psnr", "ssim", "color_error")]
        record.update({name: float(record[name]) for name in names})
        record.update({name: record[name].numpy() for name in record if name.endswith("_seams")})
        for name in ("original", "reconstruction", "bicubic"):
            del record[name]
    gathered = sorted(_gather(records, accelerator), key=lambda record: record["index"])
    all_examples = _gather(examples, accelerator)
    if not gathered:
        raise ValueError(
            f"No validation image could be evaluated ({validation.dataset_name!r}, split {validation.dataset_split!r} "
            "is empty or unreadable)."
        )
    metrics = _summary(gathered, validation, model.codebook_size, step, rfid)
    all_tokens = torch.from_numpy(np.stack([record["tokens"] for record in gathered]))
    is_main = accelerator is None or accelerator.is_main_process
    picked = sorted(all_examples, key=lambda item: item[0])[:num_examples] if is_main else []
    return EvaluationResult(
        metrics=metrics,
        code_counts=torch.bincount(all_tokens.reshape(-1), minlength=model.codebook_size),
        originals=[_to_pil(item[1]) for item in picked],
        reconstructions=[_to_pil(item[2]) for item in picked],
        bicubic=[_to_pil(item[3]) for item in picked],
    )


def _compute_fid(fid) -> float | None:
    if fid is None:
        return None
    try:  # torchmetrics syncs its states across processes; FID needs at least two images on each side
        return float(fid.compute())
    except (RuntimeError, ValueError) as error:
        logger.warning("rFID could not be computed (%s); reported as null.", error)
        return None


def _to_pil(tensor: torch.Tensor) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(tensor.permute(1, 2, 0).numpy()), mode="RGB")


def write_evaluation(folder, result: EvaluationResult) -> None:
    """Write an evaluation's files into `folder`: `eval_results.json`, `reconstructions.png` and
    `codebook_usage.png` (what the training run and `vqrae-evaluate` both write)."""
    save_eval_results(result.metrics, os.path.join(folder, EVAL_RESULTS_FILE))
    plots.plot_reconstructions(
        os.path.join(folder, RECONSTRUCTIONS_FILE),
        result.originals,
        result.reconstructions,
        result.bicubic,
        result.metrics,
    )
    plots.plot_codebook_usage(os.path.join(folder, CODEBOOK_USAGE_FILE), result.code_counts, result.metrics)


@torch.no_grad()
def codebook_use_on_crops(
    model, images: list[Image.Image], image_processor, num_crops: int, seed: int = 0, batch_size: int = 64
) -> dict:
    """Codebook use over `num_crops` random resized crops of `images` (the training crops' distribution: a random
    box of 8-100 % of the area, aspect 3/4-4/3, resized to the model's resolution; seeded, so repeatable): the
    tokens, the codes they use, that share of the codebook, and the perplexity. Unlike the validation tokens, which
    are fewer than a large codebook has codes, enough crops can show whether the whole codebook is reachable."""
    if num_crops < 1 or not images:
        raise ValueError(f"Codebook use needs crops of images (got {num_crops} crops of {len(images)} images).")
    size, resample = model.config.vision_config.image_size, processor_resample(image_processor)
    parameter = next(model.parameters())
    rng = np.random.default_rng(seed)
    indices = []
    for start in range(0, num_crops, batch_size):
        crops = []
        for _ in range(min(batch_size, num_crops - start)):
            image = images[int(rng.integers(len(images)))]
            box = random_resized_crop_box(image.width, image.height, rng)
            crops.append(image.resize((size, size), resample, box=box))
        pixel_values = to_pixel_values(image_processor, crops).to(parameter.device, parameter.dtype)
        indices.append(model.encode(pixel_values).indices.flatten().cpu())
    indices = torch.cat(indices)
    stats = codebook_statistics(indices, model.codebook_size)
    return {
        "crops": num_crops,
        "tokens": indices.numel(),
        "used_codes": int(stats["used_codes"]),
        "codebook_size": model.codebook_size,
        "codebook_utilization": float(stats["utilization"]),
        "perplexity": float(stats["perplexity"]),
    }


def save_eval_results(metrics: dict, path: str) -> None:
    """Write `metrics` (the flat `eval_results.json` object) to `path`, atomically, as strict JSON: a non-finite
    value (which JSON cannot hold) raises a `ValueError` naming it, and nothing is written."""
    missing = [key for key in EVAL_RESULT_FIELDS if key not in metrics]
    if missing:
        raise ValueError(f"`metrics` lacks the eval_results keys {missing}.")
    results = {key: metrics[key] for key in EVAL_RESULT_FIELDS}
    try:
        text = json.dumps(results, indent=2, allow_nan=False)
    except ValueError as error:  # Infinity / NaN: Python's json would write them, but they are not JSON
        non_finite = {
            key: value for key, value in results.items() if isinstance(value, float) and not math.isfinite(value)
        }
        raise ValueError(f"`metrics` holds values that JSON cannot represent: {non_finite} ({error}).") from error
    atomic_write(path, text + "\n")
