"""Tokenizing throughput of `vqrae-tokenize` (images/s), end to end and for the encoder alone.

    python bench/bench_tokenize.py                                  # tiny and base, on this machine's CPU
    python bench/bench_tokenize.py --configs base --num_images 128 --batch_size 32
    python bench/bench_tokenize.py --smoke                          # tiny, 8 images: checks it runs; writes nothing

For each configuration, a randomly initialised VQRAE model (the training presets: `tiny` = the built-in CPU
encoder; `base` = SigLIP-B/16 at 256 px, width 768, 12 layers; the table names each one's size; FSQ
[8, 8, 8, 5, 5, 5] + post_quant_conv) is saved to a temporary folder and `vqrae.tokenize.tokenize` runs on a
folder of generated 320 x 240 JPEG photos-like images, exactly as the CLI would (decode, centre crop, image
processor, encode under inference_mode, Parquet shards). "end to end" is images / wall time of the tokenizing
loop (model and dataset loading excluded); "encoder only" times `model.encode` on ready `pixel_values`, to show
how much of the time the data preparation takes. Prints a Markdown table and writes it into bench/BENCHMARKS.md.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import bench_parser, load_average, parse_bench_args, publish
from PIL import Image

from vqrae import VQRAEConfig, VQRAEModel
from vqrae.atomic_io import save_pretrained_atomic
from vqrae.cli.tokenize import parse_tokenize_args
from vqrae.presets import QUANTIZER_PRESETS, VISION_PRESETS
from vqrae.tokenize import tokenize


def make_images(folder: Path, count: int, seed: int = 0) -> None:
    """`count` smooth random 320 x 240 JPEGs (a blurred noise field compresses and decodes like a photo)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((320, 240), Image.Resampling.BICUBIC)
        image.save(folder / f"image_{i:05d}.jpg", quality=90)


def encoder_only(model: VQRAEModel, batch_size: int, repeats: int) -> float:
    size = model.config.vision_config.image_size
    pixel_values = torch.rand(batch_size, 3, size, size) * 2 - 1
    with torch.inference_mode():
        model.encode(pixel_values)  # warm-up
        started = time.perf_counter()
        for _ in range(repeats):
            model.encode(pixel_values)
    return batch_size * repeats / (time.perf_counter() - started)


def main(argv=None) -> None:
    parser = bench_parser(__doc__.split("\n\n")[0], threads=False)
    parser.add_argument("--configs", nargs="+", default=["tiny", "base"], choices=sorted(VISION_PRESETS))
    parser.add_argument("--num_images", type=int, nargs="+", default=None, help="Per config (default 512 / 64).")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--shard_size", type=int, default=256)
    smoke = {"configs": ["tiny"], "num_images": [8], "batch_size": 4, "shard_size": 4}
    args = parse_bench_args(parser, argv, smoke)
    start_load = load_average()
    defaults = {"tiny": 512, "small": 128, "base": 64}
    counts = args.num_images or [defaults[name] for name in args.configs]
    if len(counts) == 1:
        counts = counts * len(args.configs)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}; batch {args.batch_size}",
        file=sys.stderr,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-") as tmp:
        root = Path(tmp)
        make_images(root / "images", max(counts))
        for name, count in zip(args.configs, counts):
            torch.manual_seed(0)
            vision = dict(VISION_PRESETS[name])
            model = VQRAEModel(VQRAEConfig(vision_config=vision, **QUANTIZER_PRESETS["cosmos_fsq"])).eval()
            save_pretrained_atomic(model, root / name / "model", model.get_image_processor())
            summary = tokenize(
                parse_tokenize_args(
                    ["--model", str(root / name / "model"), "--train_dir", str(root / "images")]
                    + ["--output_dir", str(root / name / "tokens"), "--max_images", str(count)]
                    + ["--batch_size", str(args.batch_size), "--shard_size", str(args.shard_size)]
                )
            )
            encode_rate = encoder_only(model, args.batch_size, repeats=max(1, min(8, count // args.batch_size)))
            grid = vision["image_size"] // vision["patch_size"]
            rows.append(
                f"| {name} | {vision['image_size']} px, patch {vision['patch_size']}, width {vision['hidden_size']}, "
                f"{vision['num_hidden_layers']} layers | {grid}x{grid} | {summary['images']} | "
                f"{summary['images_per_second']:.1f} | {encode_rate:.1f} | "
                f"{summary['images_per_second'] / encode_rate:.2f}x |"
            )
    table = "\n".join(
        [
            "| config | encoder | tokens | images | end to end (images/s) | encoder only (images/s) "
            "| end to end / encoder |",
            "|---|---|---|---|---|---|---|",
        ]
        + rows
    )
    body = (
        f"Batch {args.batch_size}, generated 320 x 240 JPEGs, random weights, FSQ [8, 8, 8, 5, 5, 5] + "
        f"post_quant_conv, float32 CPU.\n\n{table}\n\n- End to end includes decoding, cropping and preprocessing the "
        'images and writing the Parquet shards; the gap to "encoder only" is the data preparation.\n'
        "- The data preparation runs in `dataloader_num_workers` worker processes (default: half the CPUs, 1 to 4) "
        "beside the encoder. For `base` "
        "the encoder dominates and end to end stays close to it; `tiny`'s encoder is so small that decoding the JPEGs "
        "is the whole cost."
    )
    publish("bench_tokenize", "7. Tokenizing throughput (vqrae-tokenize)", body, start_load, args.no_write)


if __name__ == "__main__":
    main()
