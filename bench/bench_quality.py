"""Reconstruction quality at an equal wall-clock budget: the seed's quantizer claims, with the spread over seeds.

    python bench/bench_quality.py                   # 7 variants x 2 seeds x 75 s (~25 min on 2 cores)
    python bench/bench_quality.py --budget 20 --seeds 1 --variants a c --no-write

Every run is `vqrae-train --config tiny_cpu` (the built-in CPU recipe: random tiny model, 64-px crops of the
built-in photos, its batch, learning rate and L1 loss; the warm-up is the preset's, at most a quarter of the run)
with one quantizer:

- a: FSQ [8, 8, 8, 5, 5, 5] (64,000 codes) + post_quant_conv with the tiny preset's 3x3 kernel;
- a-k1: the same with the seed's Cosmos-Tokenizer 1x1 kernel;
- b: the same without post_quant_conv;
- c: FSQ [8, 8, 8] (512 codes);
- d: VQ with 16384 codes, plain and SimVQ;
- e: no quantizer, the continuous upper bound: the same loop with the quantizer replaced by the identity (a
  patch applied by this script in its worker process only, since the model has no such option), so the decoder
  reads the encoder's features directly (`model.decode` on the reshaped `last_hidden_state`); the trainer's own
  evaluation then decodes those features instead of indices.

Equal budget: two rounds of short calibration runs measure each variant's steps per second on this machine (the
fastest logging window counts: the speed with the least interference from other work), and its runs get
`round(budget x steps/s)` steps (the learning-rate schedule spans them). The final evaluation on the
held-out photos is the trainer's (`eval_results.json`: PSNR, SSIM, codebook utilisation, perplexity, bits per
image, and the bicubic thumbnail of the same number of tokens' worth of pixels). Each variant runs once per seed;
seed rounds alternate in order. The curves (training L1 and validation PSNR against training seconds) go to
bench/quality_curves.png.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

from _common import BENCH_DIR, load_average, markdown_table, run_and_sample_memory, write_section

from vqrae.presets import VISION_PRESETS
from vqrae.training.args import load_config_file

VARIANTS = {
    "a": ("FSQ 64,000 + post_quant_conv 3x3 (tiny preset)", ["--quantizer", "cosmos_fsq"]),
    "a-k1": (
        "FSQ 64,000 + post_quant_conv 1x1 (seed)",
        ["--quantizer", "cosmos_fsq", "--post_quant_conv_kernel_size", "1"],
    ),
    "b": ("FSQ 64,000, no post_quant_conv", ["--quantizer", "cosmos_fsq", "--use_post_quant_conv", "false"]),
    "c": ("FSQ 512 ([8, 8, 8])", ["--quantizer", "standard_fsq"]),
    "d": ("VQ 16384", ["--quantizer", "vq"]),
    "d-simvq": ("SimVQ 16384", ["--quantizer", "vq", "--use_simvq", "true"]),
    "e": ("no quantizer (continuous bound)", ["--quantizer", "standard_fsq"]),
}
CONTINUOUS = "e"
CURVES_PNG = BENCH_DIR / "quality_curves.png"


# ---------------------------------------------------------------------------------------------------------------
# The continuous variant's worker: vqrae-train with the quantizer bypassed
# ---------------------------------------------------------------------------------------------------------------


def continuous_worker(cli_args: list[str]) -> int:
    """Run `vqrae-train` with the FSQ quantizer replaced by the identity. `encode` keeps the features of its
    batch so that `decode_from_indices` (called right after it by the trainer's evaluation) decodes them."""
    import torch

    from vqrae.modeling_vqrae import VQRAEModel
    from vqrae.quantizers import VQRAEFSQuantizer, VQRAEQuantizerOutput
    from vqrae.training.cli import main as train_main

    def identity(self, z):
        indices = torch.zeros(z.shape[:-1], dtype=torch.long, device=z.device)
        return VQRAEQuantizerOutput(quantized=z, indices=indices, loss=z.new_zeros(()))

    original_encode = VQRAEModel.encode

    def encode(self, pixel_values, return_dict=None):
        output = original_encode(self, pixel_values, return_dict=True)
        self._bench_continuous_codes = output.quantized
        return output if return_dict is not False else output.to_tuple()

    def decode_from_indices(self, indices, return_dict=None):
        return self.decode(self._bench_continuous_codes, return_dict=return_dict)

    VQRAEFSQuantizer.forward = identity
    VQRAEModel.encode = encode
    VQRAEModel.decode_from_indices = decode_from_indices
    return train_main(cli_args)


# ---------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------


def train_command(variant: str, output_dir: Path, options: list[str]) -> list[str]:
    common = [
        "--config", "tiny_cpu", "--output_dir", str(output_dir), "--overwrite_output_dir", "true",
        "--disable_tqdm", "true", "--num_reconstructions", "0", *VARIANTS[variant][1], *options,
    ]  # fmt: skip
    if variant == CONTINUOUS:
        return [sys.executable, str(Path(__file__).resolve()), "--continuous-worker", *common]
    return [sys.executable, "-m", "vqrae.training.cli", *common]


def run(variant: str, output_dir: Path, options: list[str], log_path: Path) -> float:
    with open(log_path, "w") as log:
        code, wall, _, _ = run_and_sample_memory(train_command(variant, output_dir, options), stdout=log, stderr=log)
    if code != 0:
        raise RuntimeError(f"variant {variant} failed:\n{log_path.read_text()[-3000:]}")
    return wall


def read_records(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_clock(records: list[dict]) -> list[tuple[int, float]]:
    """(step, training seconds so far) at each logged step, from the windows' steps per second."""
    clock, previous_step, elapsed = [(0, 0.0)], 0, 0.0
    for record in records:
        if record.get("type") == "train":
            elapsed += (record["step"] - previous_step) / record["steps_per_second"]
            previous_step = record["step"]
            clock.append((record["step"], elapsed))
    return clock


def calibrate(variant: str, tmp: Path, steps: int) -> float:
    """Steps per second of one short run: the fastest of its logging windows after the first, i.e. the speed with
    the least interference from other work on the machine."""
    output_dir = tmp / f"calibrate-{variant}"
    options = ["--max_steps", str(steps), "--logging_steps", str(max(1, steps // 4)), "--eval_steps",
               str(10 * steps), "--save_steps", str(10 * steps), "--max_eval_samples", "4"]  # fmt: skip
    run(variant, output_dir, options, tmp / "log.txt")
    rates = [r["steps_per_second"] for r in read_records(output_dir) if r.get("type") == "train"]
    return max(rates[1:] or rates)


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def spread_cell(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def plot_curves(runs: dict, rates: dict, path: Path) -> None:
    """Training L1 and validation PSNR against training time at each variant's calibrated speed (step / steps per
    second), so that a spell of other work on the machine does not bend the curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, psnr_axis) = plt.subplots(1, 2, figsize=(11, 4))
    bicubic = None
    for color_index, variant in enumerate(VARIANTS):
        seeds = sorted(seed for (name, seed) in runs if name == variant)
        for seed_index, result in enumerate(runs[(variant, seed)] for seed in seeds):
            train = [r for r in result["records"] if r.get("type") == "train"]
            evals = [r for r in result["records"] if r.get("type") == "eval"]
            style = dict(color=f"C{color_index}", linestyle="-" if seed_index == 0 else "--", linewidth=1)
            label = f"{variant}: {VARIANTS[variant][0]}" if seed_index == 0 else None
            seconds = [r["step"] / rates[variant] for r in train]
            loss_axis.plot(seconds, [r["l1"] for r in train], label=label, **style)
            seconds = [r["step"] / rates[variant] for r in evals]
            psnr_axis.plot(seconds, [r["psnr"] for r in evals], marker="o", markersize=3, **style)
            bicubic = result["final"]["bicubic_psnr"]
    if bicubic is not None:
        psnr_axis.axhline(bicubic, color="grey", linestyle=":", label="bicubic thumbnail")
    xlabel = "training seconds (step / calibrated steps per second)"
    loss_axis.set(xlabel=xlabel, ylabel="training L1", yscale="log", title="training loss")
    psnr_axis.set(xlabel=xlabel, ylabel="PSNR (dB)", title="held-out photos (solid/dashed: seeds)")
    loss_axis.legend(fontsize=7)
    psnr_axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def verdict(summary: dict) -> str:
    """Claims compared with a simple noise rule: a difference counts when the means differ by more than the
    larger of the two seed spreads (max - min)."""

    def compare(first: str, second: str, metric: str = "psnr") -> tuple[float, float, bool]:
        a, b = summary[first][metric], summary[second][metric]
        noise = max(max(a) - min(a), max(b) - min(b))
        delta = statistics.mean(a) - statistics.mean(b)
        return delta, noise, len(a) > 1 and abs(delta) > noise

    lines = ["Rule: a difference counts when the means differ by more than the larger seed spread (max - min)."]
    for with_conv, kernel in (("a-k1", "1x1 (seed)"), ("a", "3x3 (tiny preset)")):
        if {with_conv, "b"} <= summary.keys():
            delta, noise, real = compare(with_conv, "b")
            lines.append(
                f'- post_quant_conv {kernel} "potentially improves reconstruction": {delta:+.2f} dB PSNR with it '
                f"(spread {noise:.2f} dB): {'a real difference' if real else 'not distinguishable from noise'} at "
                "this budget."
            )
    if {"b", "c"} <= summary.keys():
        delta, noise, real = compare("b", "c")
        lines.append(
            f"- 64,000 vs 512 codes (both without post_quant_conv): {delta:+.2f} dB PSNR for 64,000 (spread "
            f"{noise:.2f} dB): {'a real difference' if real else 'not distinguishable from noise'}; 64,000 codes "
            f"carry {summary['b']['bits'][0] - summary['c']['bits'][0]:.0f} more bits per image."
        )
    for key in ("d", "d-simvq"):
        if key in summary:
            used = summary[key]["used_codes"]
            collapsed = statistics.mean(used) < 0.01 * 16384
            lines.append(
                f"- {VARIANTS[key][0]}: {statistics.mean(used):.0f} of 16384 codes in use on the held-out photos"
                f"{' (collapsed)' if collapsed else ''}, {statistics.mean(summary[key]['psnr']):.2f} dB."
            )
    if {"a", CONTINUOUS} <= summary.keys():
        delta, noise, _ = compare(CONTINUOUS, "a")
        lines.append(
            f"- The continuous bound is {delta:+.2f} dB above variant a (spread {noise:.2f} dB): the price of tokens."
        )
    best = max((k for k in summary if k != CONTINUOUS), key=lambda k: statistics.mean(summary[k]["psnr"]))
    bicubic = statistics.mean(summary[best]["bicubic_psnr"])
    lines.append(
        f"- Best quantized variant: {best} ({VARIANTS[best][0]}), {statistics.mean(summary[best]['psnr']):.2f} dB "
        f"against {bicubic:.2f} dB for the bicubic thumbnail."
    )
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--continuous-worker"]:
        return continuous_worker(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=75.0, help="training seconds per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--calibration-steps", type=int, default=40)
    parser.add_argument("--keep", default=None, help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md and the PNG alone")
    args = parser.parse_args(argv)
    start_load = load_average()

    with tempfile.TemporaryDirectory(prefix="vqrae-bench-quality-") as scratch:
        tmp = Path(args.keep or scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        steps, rates = {}, {}
        for round_index in range(2):  # two rounds, the second reversed; the faster of the two counts
            for variant in args.variants if round_index == 0 else args.variants[::-1]:
                rates[variant] = max(rates.get(variant, 0.0), calibrate(variant, tmp, args.calibration_steps))
        for variant in args.variants:
            steps[variant] = max(20, round(args.budget * rates[variant]))
            print(f"calibration {variant}: {rates[variant]:.2f} steps/s -> {steps[variant]} steps", flush=True)
        runs, warmup = {}, load_config_file("tiny_cpu")["warmup_steps"]
        for seed_index, seed in enumerate(args.seeds):
            for variant in args.variants if seed_index % 2 == 0 else args.variants[::-1]:
                output_dir = tmp / f"{variant}-seed{seed}"
                n = steps[variant]
                options = [
                    "--seed", str(seed), "--max_steps", str(n), "--warmup_steps", str(min(warmup, n // 4)),
                    "--logging_steps", str(max(1, n // 20)), "--eval_steps", str(max(1, n // 4)),
                    "--save_steps", str(n),
                ]  # fmt: skip
                wall = run(variant, output_dir, options, tmp / "log.txt")
                final = json.loads((output_dir / "eval_results.json").read_text())
                records = read_records(output_dir)
                runs[(variant, seed)] = {"final": final, "records": records, "wall": wall}
                print(variant, seed, f"{final['psnr']:.2f} dB, {training_clock(records)[-1][1]:.0f} s", flush=True)

    summary, rows = {}, []
    for variant in args.variants:
        results = [runs[(variant, seed)] for seed in args.seeds]
        finals = [r["final"] for r in results]
        continuous = variant == CONTINUOUS
        summary[variant] = {
            "psnr": [f["psnr"] for f in finals],
            "ssim": [f["ssim"] for f in finals],
            "used_codes": [f["used_codes"] for f in finals],
            "bits": [f["bits_per_image"] for f in finals],
            "bicubic_psnr": [f["bicubic_psnr"] for f in finals],
        }
        # The continuous run uses standard_fsq's model (512 codes) with the quantizer bypassed: its decoder reads
        # `tokens` float32 vectors of the encoder's width.
        tokens = round(finals[0]["bits_per_image"] / math.log2(512))
        rows.append(
            [
                f"{variant}: {VARIANTS[variant][0]}",
                spread_cell(summary[variant]["psnr"], 2),
                spread_cell(summary[variant]["ssim"], 3),
                "-" if continuous else spread_cell([100 * f["codebook_utilization"] for f in finals], 1) + " %",
                "-" if continuous else spread_cell([f["perplexity"] for f in finals], 0),
                f"{tokens * VISION_PRESETS['tiny']['hidden_size'] * 32} (float32)"
                if continuous
                else f"{finals[0]['bits_per_image']:.0f}",
                steps[variant],
                f"{rates[variant]:.2f}",
                spread_cell([training_clock(r["records"])[-1][1] for r in results], 0),
            ]
        )
    first = runs[(args.variants[0], args.seeds[0])]["final"]
    rows.append([
        "bicubic thumbnail (same token grid)", f"{first['bicubic_psnr']:.2f}", f"{first['bicubic_ssim']:.3f}", "-",
        "-", f"{first['bicubic_bits_per_image']:.0f}", "-", "-", "-",
    ])  # fmt: skip
    header = ["variant", "PSNR dB", "SSIM", "codebook use", "perplexity", "bits/image", "steps",
              "calibrated steps/s", "train s measured"]  # fmt: skip
    body = (
        f"Budget {args.budget:.0f} training seconds per run at each variant's calibrated speed (so every seed of a "
        f"variant trains the same steps; the measured seconds show how busy the machine was), seeds {args.seeds}; "
        f"cells are mean (min-max over seeds). {first['num_images']} held-out photos, {first['image_size']} px.\n\n"
        + markdown_table(header, rows)
        + "\n\n"
        + verdict(summary)
    )
    if args.no_write:
        print(body)
    else:
        plot_curves(runs, rates, CURVES_PNG)
        body += f"\n![training and validation curves]({CURVES_PNG.name})\n"
        write_section("bench_quality", "6. Quality at an equal wall-clock budget", body, start_load)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
