"""What stage 2 buys: the default model continued with its encoder frozen (stage 1), or unfrozen with and without
self-distillation (stage 2), against no further training.

    python bench/bench_stage2.py                                   # from outputs/vqrae-tiny-cpu: 3 arms x 2 seeds
    python bench/bench_stage2.py --start out/stage1 --steps 100 --seeds 1 --no-write
    python bench/bench_stage2.py --smoke                           # a 2-step start, one arm of 2 steps: checks it runs

Every arm starts from the same saved model (`--start`, default the output of `vqrae-train`, the default run) with the
built-in CPU recipe (`configs/tiny_cpu.yaml`) and `--init_from`, for the same number of steps and seeds, at a fifth
of the recipe's learning rate (docs/training.md's stage-2 command over its stage 1). Measured on the built-in
held-out set: PSNR and SSIM (95 % bootstrap intervals over the images, per run) and how far the encoder moved: the
cosine similarity of its features to the starting encoder's, averaged over every token of the held-out images.
"""

from __future__ import annotations

import json
from pathlib import Path

from _common import bench_parser, load_average, markdown_table, parse_bench_args, publish
from bench_quality import add_run_options, run_folders, t_interval, train_run

# name -> (label, options added to the tiny CPU recipe)
ARMS = {
    "stage1": ("stage 1 continued (encoder frozen)", ["--stage", "1"]),
    "distill": ("stage 2, self-distillation (weight 1)", ["--stage", "2", "--distillation_weight", "1"]),
    "no-distill": ("stage 2, no distillation (weight 0)", ["--stage", "2", "--distillation_weight", "0"]),
}


def encoder_similarity(folder: Path, start: Path) -> float:
    """Mean cosine similarity of the encoder features of `folder`'s model to `start`'s, over the held-out tokens."""
    import torch
    import torch.nn.functional as F

    from vqrae import VQRAEModel
    from vqrae.builtin_photos import builtin_photos
    from vqrae.image_data import load_validation_images, processor_resample, to_pixel_values

    torch.set_num_threads(2)
    model, reference = (VQRAEModel.from_pretrained(path).eval() for path in (folder, start))
    processor = reference.get_image_processor()
    validation = load_validation_images(
        builtin_photos("validation"), "image", reference.config.vision_config.image_size, dataset_name="builtin",
        dataset_split="validation", resample=processor_resample(processor),
    )  # fmt: skip
    with torch.no_grad():
        pixel_values = to_pixel_values(processor, validation.images)
        features = model.get_image_features(pixel_values).last_hidden_state
        start_features = reference.get_image_features(pixel_values).last_hidden_state
    return float(F.cosine_similarity(features, start_features, dim=-1).mean())


def main(argv=None):
    from vqrae.training.args import OPTION_NAMES
    from vqrae.training.config_files import load_config_file

    recipe = load_config_file("tiny_cpu", OPTION_NAMES)
    parser = bench_parser(__doc__.split("\n\n")[0], threads=False)
    parser.add_argument("--start", default=recipe["output_dir"], help="the saved model every arm starts from")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--learning_rate", type=float, default=recipe["learning_rate"] / 5)
    add_run_options(parser)
    # --smoke without --start: the start is a run of the recipe trained here for a few steps.
    smoke = {"start": None, "steps": 2, "seeds": [1], "arms": ["distill"], "crops": 16}
    args = parse_bench_args(parser, argv, smoke)
    start_load = load_average()
    runs = {}
    with run_folders(args.keep, "bench-stage2") as tmp:
        start = Path(args.start) if args.start is not None else tmp / "start"
        if args.start is None:
            train_run(start, [], args.steps, recipe["seed"], crops=args.crops)
        start_eval = json.loads((start / "eval_results.json").read_text())
        for seed in args.seeds:
            for arm in args.arms:
                folder = tmp / f"arm{list(ARMS).index(arm)}-seed{seed}"
                options = [*ARMS[arm][1], "--init_from", str(start), "--learning_rate", str(args.learning_rate)]
                result = train_run(folder, options, args.steps, seed, crops=args.crops)
                result["similarity"] = encoder_similarity(folder, start)
                runs[(arm, seed)] = result
                print(arm, seed, f"{result['final']['psnr']:.2f} dB, cos {result['similarity']:.4f}", flush=True)

    def interval(final: dict, name: str, digits: int) -> str:
        low, high = final[f"{name}_interval"]
        return f"{final[name]:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"

    rows = [["no stage 2: the starting model", "—", interval(start_eval, "psnr", 2), interval(start_eval, "ssim", 3),
             "—", "1 (itself)"]]  # fmt: skip
    for arm in args.arms:
        label = ARMS[arm][0]
        for seed in args.seeds:
            final = runs[(arm, seed)]["final"]
            delta = final["psnr"] - start_eval["psnr"]
            rows.append([label, seed, interval(final, "psnr", 2), interval(final, "ssim", 3), f"{delta:+.2f}",
                         f"{runs[(arm, seed)]['similarity']:.4f}"])  # fmt: skip
        mean, low, high = t_interval([runs[(arm, seed)]["final"]["psnr"] - start_eval["psnr"] for seed in args.seeds])
        rows.append([f"{label}: mean over seeds", "", "", "", f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]", ""])
    header = ["arm", "seed", "PSNR dB [95 % CI]", "SSIM [95 % CI]", "Δ PSNR vs start", "encoder cosine to start"]
    body = (
        f"Start: `{start}` (step {start_eval['step']}), then {args.steps} steps at learning rate "
        f"{args.learning_rate:g}, seeds {args.seeds}. Held-out set: {start_eval['num_images']} tiles. The mean row "
        "gives the 95 % t interval over seeds.\n\n" + markdown_table(header, rows)
    )
    publish("bench_stage2", "10. What stage 2 buys", body, start_load, args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
