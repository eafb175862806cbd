"""The tiny preset's issue-17 changes (colour images, channel permutation, FSQ noise) and smaller crops, by tile scale.

    python bench/bench_colour.py --variants a colour-permute colour-permute-noise   # 3 x 3 seeds x 3000 steps (~1 h)
    python bench/bench_colour.py --steps 300 --seeds 1 2 --no-write
    python bench/bench_colour.py --smoke                       # 2 steps, 3 runs, a few tiles: that it runs; no writes

Every run is `vqrae-train` with the built-in CPU recipe (`configs/tiny_cpu.yaml`) set back to what it was before
issue 17 (`BEFORE`) and the variant's changes, for the same number of steps with each seed
(`bench_quality.train_run`: the seed sets the initialisation, the order of the crops and the noise, so runs of one
seed are paired). The built-in training photos hold a narrow palette (the reds and oranges of `retina` and `ihc`,
greys), and the crops (8-100 % of a photo's area) never zoom in as far as the held-out set's quarter-side tiles
(0.042-0.063 of a photo's area). The variants add scikit-image's two synthetic colour images to the training photos
(`--dataset_name builtin:photos+colour`), then the channel permutation of the crops (`--color_augment permute`),
then either smaller crops (`--min_crop_scale 0.04`) or FSQ noise substitution (`--fsq_noise_probability 0.5`: half
the tokens skip the rounding in training, for uniform noise one level step wide; the tiny preset now).

Each run's saved model is evaluated by `vqrae.training.metrics.evaluate_model` (the figures of `eval_results.json`)
on the held-out tiles of each scale (`validation_tiles`: the photo's shorter side, a half, a quarter of it): the
colour error (CIEDE2000 between a tile's mean colour and its reconstruction's), PSNR and SSIM. Cells are the mean
over seeds [95 % t interval over seeds]; a difference to the reference variant is the mean of the per-seed paired
differences with its t interval, and "inside the noise" when that interval holds 0. A second table sets each variant
against the one it adds to, in the same way. The bicubic thumbnail of the same token grid is the same for every run.
"""

from __future__ import annotations

import numpy as np
from _common import bench_parser, load_average, markdown_table, parse_bench_args, publish
from bench_heldout import tile_scales
from bench_quality import cell, run_folders, train_run, verdict_word

# The tiny preset as it was before it took up colour and FSQ noise (issue 17): every variant starts from it, so each
# keeps its meaning whatever the preset is now.
BEFORE = ["--dataset_name", "builtin:photos", "--color_augment", "none", "--fsq_noise_probability", "0"]
COLOUR = ["--dataset_name", "builtin:photos+colour"]
PERMUTE = ["--color_augment", "permute"]
# name -> (label, options added to the tiny CPU recipe, the variant it adds to)
VARIANTS = {
    "a": ("the tiny preset before issue 17 (builtin:photos, no colour augmentation, no FSQ noise)", BEFORE, None),
    "colour": ("a + --dataset_name builtin:photos+colour", [*BEFORE, *COLOUR], "a"),
    "colour-permute": ("colour + --color_augment permute", [*BEFORE, *COLOUR, *PERMUTE], "colour"),
    "colour-permute-zoom": (
        "colour-permute + --min_crop_scale 0.04",
        [*BEFORE, *COLOUR, *PERMUTE, "--min_crop_scale", "0.04"],
        "colour-permute",
    ),
    "colour-permute-noise": (
        "colour-permute + --fsq_noise_probability 0.5 (the tiny preset now)",
        [*BEFORE, *COLOUR, *PERMUTE, "--fsq_noise_probability", "0.5"],
        "colour-permute",
    ),
}
REFERENCE = "a"
# (metric, column label, digits, higher is better)
METRICS = (
    ("color_error", "colour error ΔE00 ↓", 2, False),
    ("psnr", "PSNR dB ↑", 2, True),
    ("ssim", "SSIM ↑", 3, True),
)
ALL = "all"
SMOKE_TILES = 2  # tiles of each scale evaluated in --smoke


def by_scale(model_dir, tiles_per_scale: int | None = None) -> dict:
    """`evaluate_model`'s figures of the saved model in `model_dir` on the held-out tiles of each scale
    (scale -> the `eval_results.json` object); `tiles_per_scale`: only the first tiles of each scale."""
    import torch

    from vqrae import VQRAEModel
    from vqrae.builtin_photos import builtin_photos
    from vqrae.image_data import ValidationImages, load_validation_images, processor_resample
    from vqrae.training.metrics import evaluate_model

    torch.set_num_threads(2)
    model = VQRAEModel.from_pretrained(model_dir).eval()
    processor = model.get_image_processor()
    dataset = builtin_photos("validation")
    size = model.config.vision_config.image_size
    validation = load_validation_images(
        dataset, "image", size, dataset_name="builtin", dataset_split="validation",
        resample=processor_resample(processor),
    )  # fmt: skip
    scales = np.array(tile_scales(dataset))
    results = {}
    for scale in sorted(set(scales.tolist()), reverse=True):
        picked = np.flatnonzero(scales == scale)[:tiles_per_scale]
        tiles = ValidationImages(
            [validation.images[i] for i in picked], [int(i) for i in picked], 0, "builtin", "validation", size
        )
        results[scale] = evaluate_model(model, tiles, image_processor=processor, num_examples=0, compute_rfid=False)
        results[scale] = results[scale].metrics
    return results


def report(runs: dict, variants: list[str], seeds: list[int], steps: int) -> str:
    """The table: for each tile scale, each variant's colour error, PSNR and SSIM, their paired differences to the
    reference variant, and the thumbnail's figures."""
    header = ["tiles", "variant"]
    for _, label, _, _ in METRICS:
        header += [label, f"Δ vs {REFERENCE}, paired"]
    header.append("PSNR − thumbnail dB")
    rows = []
    for scale in runs[(variants[0], seeds[0])]:
        first = runs[(variants[0], seeds[0])][scale]
        tiles = "all tiles" if scale == ALL else f"{scale:g} side"
        for variant in variants:
            finals = [runs[(variant, seed)][scale] for seed in seeds]
            row = [f"{tiles} ({first['num_images']})", variant]
            for metric, _, digits, higher in METRICS:
                row.append(cell([final[metric] for final in finals], digits))
                if variant == REFERENCE or REFERENCE not in variants:
                    row.append("—")
                    continue
                differences = [
                    runs[(variant, seed)][scale][metric] - runs[(REFERENCE, seed)][scale][metric] for seed in seeds
                ]
                verdict = verdict_word(differences if higher else [-d for d in differences])  # "better" = improved
                row.append(f"{cell(differences, digits, sign=True)}: {verdict}")
            row.append(cell([final["psnr"] - final["bicubic_psnr"] for final in finals], 2, sign=True))
            rows.append(row)
        thumbnail = ["bicubic thumbnail"]
        for metric, _, digits, _ in METRICS:
            thumbnail += [f"{first['bicubic_' + metric]:.{digits}f}", "—"]
        rows.append([f"{tiles} ({first['num_images']})", *thumbnail, "—"])
    labels = "; ".join(f"{name}: {VARIANTS[name][0]}" for name in variants)
    return (
        f"{steps} steps per run for every variant, seeds {seeds} (a seed's runs are paired); cells are the mean over "
        "seeds [95 % t interval over seeds]; differences are paired by seed, and `better`/`worse` say which way an "
        f"interval that excludes 0 points (a lower colour error is better). Variants: {labels}. "
        f"The thumbnail carries {first['bicubic_bits_per_image']:.0f} bits per image, the tokens "
        f"{first['bits_per_image']:.0f}.\n\n" + markdown_table(header, rows) + steps_report(runs, variants, seeds)
    )


def steps_report(runs: dict, variants: list[str], seeds: list[int]) -> str:
    """A second table: each variant against the variant it adds to (when both ran), paired by seed, by tile
    scale; empty when no such pair ran."""
    pairs = [(name, VARIANTS[name][2]) for name in variants if VARIANTS[name][2] in variants]
    if not pairs:
        return ""
    header = ["tiles", "variant", "against"] + [f"Δ {label}, paired" for _, label, _, _ in METRICS]
    rows = []
    for scale in runs[(variants[0], seeds[0])]:
        tiles = "all tiles" if scale == ALL else f"{scale:g} side"
        for name, base in pairs:
            row = [f"{tiles} ({runs[(name, seeds[0])][scale]['num_images']})", name, base]
            for metric, _, digits, higher in METRICS:
                differences = [runs[(name, seed)][scale][metric] - runs[(base, seed)][scale][metric] for seed in seeds]
                verdict = verdict_word(differences if higher else [-d for d in differences])
                row.append(f"{cell(differences, digits, sign=True)}: {verdict}")
            rows.append(row)
    return "\n\nStep by step, each variant against the one it adds to:\n\n" + markdown_table(header, rows)


def main(argv=None):
    parser = bench_parser(__doc__.split("\n\n")[0], threads=False)
    parser.add_argument(
        "--steps", type=int, default=3000, help="training steps of every run (3000; the preset itself trains 4000)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--keep", default=None, help="keep the run folders here (default: a temporary folder)")
    parser.add_argument(
        "--reuse", action="store_true", help="read finished runs of the same options found in --keep, train the rest"
    )
    # --smoke: 2 steps of the reference, a variant and one that adds to it, one seed, a few tiles.
    smoke = {"steps": 2, "seeds": [1], "variants": [REFERENCE, "colour-permute", "colour-permute-noise"]}
    args = parse_bench_args(parser, argv, smoke)
    extra, tiles = ([], None) if not args.smoke else (["--max_eval_samples", str(SMOKE_TILES)], SMOKE_TILES)
    start_load = load_average()
    runs = {}
    with run_folders(args.keep, "bench-colour") as tmp:
        for seed_index, seed in enumerate(args.seeds):
            for variant in args.variants if seed_index % 2 == 0 else args.variants[::-1]:
                folder = tmp / f"{variant}-seed{seed}"
                result = train_run(
                    folder, [*VARIANTS[variant][1], *extra], args.steps, seed, reuse=args.reuse, crops=0
                )
                runs[(variant, seed)] = {**by_scale(folder, tiles), ALL: result["final"]}
                summary = ", ".join(
                    f"{scale}: {m['color_error']:.2f} ΔE00 {m['psnr']:.2f} dB"
                    for scale, m in runs[(variant, seed)].items()
                )
                print(f"{variant} seed {seed} ({result['wall']:.0f} s): {summary}", flush=True)
    body = report(runs, args.variants, args.seeds, args.steps)
    title = "6d. The tiny preset's colour augmentation, crop scale and FSQ noise, by tile scale"
    publish("bench_colour", title, body, start_load, args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
