"""The default model against the bicubic thumbnail on the built-in held-out tiles, scale by scale.

    python bench/bench_heldout.py                          # the output of `vqrae-train` (outputs/vqrae-tiny-cpu)
    python bench/bench_heldout.py --model out/stage1 --no-write
    python bench/bench_heldout.py --smoke                  # a random tiny model (or --model): checks it runs

The held-out set is square tiles of the held-out photos at three scales (`vqrae.builtin_photos.validation_tiles`: the
photo's shorter side, a half and a quarter of it, each resized to the model's resolution). A quarter-side tile is a
close-up: smooth, with little beyond its colours, which an 8-bit RGB thumbnail of the token grid (24 bits per patch,
bicubically enlarged) holds almost exactly, while a token carries log2(codebook size) bits (about 16 for the
default FSQ's 64,000 codes). PSNR and SSIM per scale show where the tokens win and where the thumbnail does;
intervals are 95 % bootstrap intervals over the tiles of a scale.

Two diagnostic columns say what the tokens' PSNR loses to colour: the reconstruction with its mean colour replaced
by the original tile's (an error of the image's colour as a whole, such as a cast), and with the mean of each token's
cell replaced by the original's (the thumbnail's own information, at the token grid). They are oracles, not a
decoder: each reads the original.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from pathlib import Path

import numpy as np
from _common import bench_parser, load_average, markdown_table, parse_bench_args, publish


def bits_per_image(config) -> tuple[float, int]:
    """The bits of one image in the tokens of a model (`config`): log2(codebook size) per token of its grid, and in
    the bicubic baseline's thumbnail, one 8-bit RGB pixel (24 bits) per token of the grid."""
    height, width = config.token_grid_size
    return height * width * math.log2(config.codebook_size), height * width * 24


@contextlib.contextmanager
def smoke_model(model_path: str | None):
    """`model_path`, or (None, `--smoke` without `--model`) a randomly initialised tiny model saved to a temporary
    folder, as `vqrae-train` builds it."""
    if model_path is not None:
        yield model_path
        return
    import torch

    from vqrae.atomic_io import save_pretrained_atomic
    from vqrae.training.args import ModelArguments
    from vqrae.training.trainer import build_model

    with tempfile.TemporaryDirectory(prefix="vqrae-bench-heldout-") as folder:
        torch.manual_seed(0)
        model = build_model(ModelArguments())
        save_pretrained_atomic(model, folder, model.get_image_processor())
        yield folder


def tile_scales(dataset) -> list[float]:
    """The scale of each tile of the built-in held-out set (`builtin_photos("validation")`), from its size before
    resizing: per photo, the largest tiles are scale 1, and so on."""
    from vqrae.builtin_photos import VALIDATION_TILE_SCALES

    photos, sides = [name.split("#")[0] for name in dataset["photo"]], [image.width for image in dataset["image"]]
    scales = []
    for photo, side in zip(photos, sides):
        ranked = sorted({s for p, s in zip(photos, sides) if p == photo}, reverse=True)
        scales.append(VALIDATION_TILE_SCALES[ranked.index(side)])
    return scales


def per_tile(model_path: str) -> tuple[dict, list[str], object]:
    """PSNR and SSIM of every held-out tile through the tokens and through the bicubic thumbnail, its scale, and
    the model's config."""
    import torch
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from vqrae import VQRAEModel, to_pil_images
    from vqrae.builtin_photos import builtin_photos
    from vqrae.image_data import load_validation_images, processor_resample, to_pixel_values
    from vqrae.training.metrics import bicubic_baseline

    torch.set_num_threads(2)
    model = VQRAEModel.from_pretrained(model_path).eval()
    processor = model.get_image_processor()
    dataset = builtin_photos("validation")
    validation = load_validation_images(
        dataset, "image", model.config.vision_config.image_size, dataset_name="builtin", dataset_split="validation",
        resample=processor_resample(processor),
    )  # fmt: skip
    scales = tile_scales(dataset)

    def unit(images):
        return torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2) / 255.0

    grid = model.config.token_grid_size

    def cells(images):
        """Each pixel replaced by the mean of its token's cell."""
        pooled = torch.nn.functional.adaptive_avg_pool2d(images, grid)
        return torch.nn.functional.interpolate(pooled, size=images.shape[-2:], mode="nearest")

    values = {
        "psnr": [],
        "ssim": [],
        "bicubic_psnr": [],
        "bicubic_ssim": [],
        "image_mean_psnr": [],
        "cell_means_psnr": [],
    }
    with torch.no_grad():
        for start in range(0, len(validation.images), 64):
            images = validation.images[start : start + 64]
            indices = model.encode(to_pixel_values(processor, images)).indices
            ours = unit(to_pil_images(model.decode_from_indices(indices).reconstruction, processor))
            theirs = unit([bicubic_baseline(image, grid) for image in images])
            target = unit(images)
            for prefix, prediction in (("", ours), ("bicubic_", theirs)):
                psnr = peak_signal_noise_ratio(prediction, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
                ssim = structural_similarity_index_measure(prediction, target, data_range=1.0, reduction="none")
                values[prefix + "psnr"] += psnr.clamp(max=100).tolist()
                values[prefix + "ssim"] += ssim.tolist()
            for name, mean in (("image_mean_", lambda x: x.mean(dim=(2, 3), keepdim=True)), ("cell_means_", cells)):
                corrected = (ours - mean(ours) + mean(target)).clamp(0, 1)
                psnr = peak_signal_noise_ratio(corrected, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
                values[name + "psnr"] += psnr.clamp(max=100).tolist()
    return {name: np.array(v) for name, v in values.items()}, scales, model.config


def main(argv=None):
    from vqrae.training.args import OPTION_NAMES
    from vqrae.training.config_files import load_config_file
    from vqrae.training.metrics import bootstrap_interval

    parser = bench_parser(__doc__.split("\n\n")[0], threads=False)
    parser.add_argument("--model", default=load_config_file("tiny_cpu", OPTION_NAMES)["output_dir"])
    args = parse_bench_args(parser, argv, smoke={"model": None})
    start_load = load_average()
    with smoke_model(args.model) as model_path:
        values, scales, config = per_tile(model_path)
    scales = np.array(scales)
    token_bits, thumbnail_bits = bits_per_image(config)

    def cell(samples: np.ndarray, digits: int) -> str:
        low, high = bootstrap_interval(samples)
        return f"{samples.mean():.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"

    rows = []
    for scale in [*sorted(set(scales.tolist()), reverse=True), None]:
        pick = np.ones(len(scales), bool) if scale is None else scales == scale
        label = "all tiles" if scale is None else f"{scale:g} of the shorter side"
        gap = values["psnr"][pick] - values["bicubic_psnr"][pick]
        rows.append([
            label, int(pick.sum()), cell(values["psnr"][pick], 2), cell(values["bicubic_psnr"][pick], 2),
            cell(gap, 2), cell(values["ssim"][pick], 3), cell(values["bicubic_ssim"][pick], 3),
            cell(values["image_mean_psnr"][pick], 2), cell(values["cell_means_psnr"][pick], 2),
        ])  # fmt: skip
    header = ["tiles", "count", "VQRAE PSNR dB", "bicubic PSNR dB", "VQRAE - bicubic, paired", "VQRAE SSIM",
              "bicubic SSIM", "VQRAE PSNR, image's mean colour from the original (oracle)",
              "VQRAE PSNR, each token cell's mean from the original (oracle)"]  # fmt: skip
    body = (
        f"Model: `{model_path}` ({Path(model_path).name}); {token_bits:.0f} bits per image in tokens against "
        f"{thumbnail_bits} in the thumbnail. Cells: mean [95 % bootstrap interval over the tiles].\n\n"
        + markdown_table(header, rows)
    )
    publish("bench_heldout", "6c. The default model against the bicubic thumbnail, by tile scale", body, start_load,
            args.no_write)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
