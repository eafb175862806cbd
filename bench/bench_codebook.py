"""Codebook use and quality of FSQ 64,000, VQ 16384 and SimVQ 16384 at the tiny preset's full run.

    python bench/bench_codebook.py                 # 3 runs x the preset's 4000 steps (~30 min on 2 cores)
    python bench/bench_codebook.py --steps 200 --no-write
    python bench/bench_codebook.py --smoke          # FSQ and VQ, 2 steps, 16 crops: checks it runs; writes nothing

Each quantizer trains with the built-in CPU recipe (`configs/tiny_cpu.yaml`, its steps and seed) and only the
quantizer changed: `--quantizer cosmos_fsq` (the default), `--quantizer vq` and `--quantizer vq --use_simvq true`
(the `vq` preset: codes initialised from and restarted at encoder outputs, no weight decay on the codebook).
Codebook use counts the codes of 2048 random crops of the training photos (131,072 tokens: eight times a
16384-code codebook, twice FSQ's 64,000); quality is measured on the built-in held-out set. Intervals are 95 %
bootstrap intervals over the held-out images; the difference to FSQ is paired image by image (one seed per
quantizer: the spread between seeds of one variant is in section 6).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from _common import bench_parser, load_average, markdown_table, parse_bench_args, publish
from bench_quality import add_run_options, run_folders, train_run

# name -> (label, options added to the tiny CPU recipe); the first is the reference of the paired differences
QUANTIZERS = {
    "fsq": ("FSQ 64,000 (tiny preset)", []),
    "vq": ("VQ 16384 (vq preset)", ["--quantizer", "vq"]),
    "simvq": ("SimVQ 16384 (vq preset + SimVQ)", ["--quantizer", "vq", "--use_simvq", "true"]),
}
REFERENCE = "fsq"


def per_image_psnr(folder: Path) -> np.ndarray:
    """PSNR of each held-out image through the tokens of the model in `folder` (8-bit RGB, as evaluation does)."""
    import torch

    from vqrae import VQRAEModel, to_pil_images
    from vqrae.builtin_photos import builtin_photos
    from vqrae.image_data import load_validation_images, processor_resample, to_pixel_values

    torch.set_num_threads(2)
    model = VQRAEModel.from_pretrained(folder).eval()
    processor = model.get_image_processor()
    size = model.config.vision_config.image_size
    validation = load_validation_images(
        builtin_photos("validation"), "image", size, dataset_name="builtin", dataset_split="validation",
        resample=processor_resample(processor),
    )  # fmt: skip
    values = []
    with torch.no_grad():
        for start in range(0, len(validation.images), 64):
            images = validation.images[start : start + 64]
            indices = model.encode(to_pixel_values(processor, images)).indices
            reconstructions = to_pil_images(model.decode_from_indices(indices).reconstruction, processor)
            for original, reconstruction in zip(images, reconstructions):
                error = np.mean((np.asarray(original, float) - np.asarray(reconstruction, float)) ** 2)
                values.append(10 * np.log10(255**2 / max(error, 1e-10)))
    return np.array(values)


def main(argv=None):
    from vqrae.training.args import OPTION_NAMES
    from vqrae.training.config_files import load_config_file
    from vqrae.training.metrics import bootstrap_interval

    parser = bench_parser(__doc__.split("\n\n")[0], threads=False)
    parser.add_argument("--steps", type=int, default=load_config_file("tiny_cpu", OPTION_NAMES)["max_steps"])
    parser.add_argument("--seed", type=int, default=load_config_file("tiny_cpu", OPTION_NAMES)["seed"])
    parser.add_argument(
        "--quantizers", nargs="+", default=list(QUANTIZERS), choices=list(QUANTIZERS), help=f"first: {REFERENCE}"
    )
    add_run_options(parser)
    args = parse_bench_args(parser, argv, smoke={"steps": 2, "quantizers": [REFERENCE, "vq"], "crops": 16})
    if args.quantizers[0] != REFERENCE:
        parser.error(f"--quantizers must start with {REFERENCE}, the reference (got {args.quantizers})")
    start_load = load_average()
    results = {}
    with run_folders(args.keep, "bench-codebook") as tmp:
        for name in args.quantizers:
            folder = tmp / f"q{list(QUANTIZERS).index(name)}"
            result = train_run(folder, QUANTIZERS[name][1], args.steps, args.seed, crops=args.crops)
            result["per_image"] = per_image_psnr(folder)
            results[name] = result
            print(name, f"{result['final']['psnr']:.2f} dB, {result['crops']['used_codes']} codes", flush=True)
    reference = results[REFERENCE]["per_image"]
    rows = []
    for name, result in results.items():
        final, use = result["final"], result["crops"]
        low, high = final["psnr_interval"]
        ssim_low, ssim_high = final["ssim_interval"]
        difference = result["per_image"] - reference
        d_low, d_high = bootstrap_interval(difference)
        rows.append([
            QUANTIZERS[name][0],
            f"{use['used_codes']:,} of {use['codebook_size']:,} ({100 * use['codebook_utilization']:.1f} %)",
            f"{use['perplexity']:,.0f}",
            f"{final['psnr']:.2f} [{low:.2f}, {high:.2f}]",
            "—" if name == REFERENCE else f"{difference.mean():+.2f} [{d_low:+.2f}, {d_high:+.2f}]",
            f"{final['ssim']:.3f} [{ssim_low:.3f}, {ssim_high:.3f}]",
            f"{final['seam_score']:.2f}",
        ])  # fmt: skip
    final = results[REFERENCE]["final"]
    header = ["quantizer", f"codes used, {args.crops} crops ({args.crops * 64:,} tokens)", "perplexity",
              "PSNR dB [95 % CI]", "Δ PSNR vs FSQ, paired [95 % CI]", "SSIM [95 % CI]", "seam score"]  # fmt: skip
    body = (
        f"{args.steps} steps, seed {args.seed}, the tiny CPU recipe; held-out set: {final['num_images']} tiles "
        f"(bicubic thumbnail of the same grid: {final['bicubic_psnr']:.2f} dB, SSIM {final['bicubic_ssim']:.3f}).\n\n"
        + markdown_table(header, rows)
    )
    publish("bench_codebook", "6b. Codebook use of FSQ, VQ and SimVQ over a full run", body, start_load, args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
