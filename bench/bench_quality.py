"""Reconstruction quality of the quantizer variants at an equal number of steps, over several seeds.

    python bench/bench_quality.py                               # 9 variants x 3 seeds x 600 steps (~45 min, 2 cores)
    python bench/bench_quality.py --steps 100 --seeds 1 2 --variants a b --no-write
    python bench/bench_quality.py --smoke                       # a and e, 2 steps, 1 seed: checks it runs

Every run is `vqrae-train` with the built-in CPU recipe (`configs/tiny_cpu.yaml`: random tiny model, 64-px crops of
the built-in photos, its batch, learning rate and L1 loss; the warm-up is the preset's, at most a quarter of the
run) and one change, the variant. Every variant trains the same number of steps with each seed (equal steps, not
equal seconds: a shared machine's speed varies); the seed sets the initialisation and the order of the crops, so
runs of one seed are paired. What is measured, on the built-in held-out set (`eval_results.json` of the run):
PSNR, SSIM and the seam score; and, from the saved model, codebook use over 2048 random crops of the training
photos (131,072 tokens: twice a 64,000-code codebook, eight times a 16384-code one;
`vqrae.training.metrics.codebook_use_on_crops`).

Each difference to the reference variant `a` is the mean over seeds of the paired per-seed differences, with its 95 %
t interval over seeds (the seed-to-seed spread of training, which dominates): a difference whose interval holds 0
is reported as inside the noise.

`--reuse` reads the finished runs in `--keep` instead of training them again, only where the run was made by the same
code: each run records the commit it ran from and a hash of any uncommitted changes (`bench_command.json`), and a
run of other code is refused, not mixed into the table.

The continuous variant `e` bypasses the quantizer (a patch applied by this script in its worker process only, since
the model has no such option), so the decoder reads the encoder's features directly: the price of tokens.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

from _common import (
    BENCH_DIR,
    bench_parser,
    code_identity,
    load_average,
    markdown_table,
    parse_bench_args,
    publish,
    run_and_sample_memory,
)

from vqrae.cli.common import run_cli
from vqrae.errors import UsageError
from vqrae.training.args import OPTION_NAMES
from vqrae.training.config_files import load_config_file

# name -> (label, options added to the tiny CPU recipe)
VARIANTS = {
    "a": ("FSQ 64,000, 3x3 post_quant_conv, overlapping patches, conv head (tiny preset)", []),
    "a-seed-decoder": (
        "a with the seed's decoder (no overlap, no conv head)",
        ["--decoder_patch_overlap", "0", "--decoder_conv_head_channels", "0"],
    ),
    "a-k1": ("a with the seed's 1x1 post_quant_conv (after project_out)", ["--post_quant_conv_kernel_size", "1"]),
    "a-cosmos": (
        "a-k1 with Cosmos-Tokenizer's placement (1x1 conv on the FSQ codes, no project_out)",
        ["--post_quant_conv_kernel_size", "1", "--post_quant_conv_on_codes", "true"],
    ),
    "b": ("a without post_quant_conv", ["--use_post_quant_conv", "false"]),
    "c": ("FSQ 512 ([8, 8, 8]), no post_quant_conv", ["--quantizer", "standard_fsq"]),
    "d": ("VQ 16384 (vq preset: restarts of unused codes)", ["--quantizer", "vq"]),
    "d-simvq": ("SimVQ 16384 (vq preset + SimVQ)", ["--quantizer", "vq", "--use_simvq", "true"]),
    "e": ("no quantizer (continuous bound)", ["--quantizer", "standard_fsq"]),
}
REFERENCE = "a"
CONTINUOUS = "e"
CROPS = 2048
CURVES_PNG = BENCH_DIR / "quality_curves.png"


# ---------------------------------------------------------------------------------------------------------------
# The continuous variant's worker: vqrae-train with the quantizer bypassed
# ---------------------------------------------------------------------------------------------------------------


def continuous_worker(cli_args: list[str]) -> int:
    """Run `vqrae-train` with the FSQ quantizer replaced by the identity. `encode` keeps the features of its
    batch so that `decode_from_indices` (called right after it by the trainer's evaluation) decodes them."""
    import torch

    from vqrae.cli.train import main as train_main
    from vqrae.modeling_vqrae import VQRAEModel
    from vqrae.quantizers import VQRAEFSQuantizer, VQRAEQuantizerOutput

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


def add_run_options(parser) -> None:
    """The options of the scripts that train through `train_run`."""
    parser.add_argument("--keep", default=None, help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("--crops", type=int, default=CROPS, help="random crops of the codebook-use count")


@contextlib.contextmanager
def run_folders(keep: str | None, name: str):
    """The folder the runs of a benchmark go to: `keep` (kept), else a temporary folder (removed at the end)."""
    with tempfile.TemporaryDirectory(prefix=f"vqrae-{name}-") as scratch:
        folder = Path(keep or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        yield folder


def train_command(options: list[str], continuous: bool = False) -> list[str]:
    common = ["--config", "tiny_cpu", "--overwrite_output_dir", "true", "--disable_tqdm", "true", *options]
    if continuous:
        return [sys.executable, str(Path(__file__).resolve()), "--continuous-worker", *common]
    return [sys.executable, "-m", "vqrae.cli.train", *common]


def train_run(
    output_dir: Path,
    options: list[str],
    steps: int,
    seed: int,
    continuous: bool = False,
    reuse: bool = False,
    crops: int = CROPS,
) -> dict:
    """Train one run of `steps` steps and return its records, final evaluation and (quantized runs, unless `crops`
    is 0) the codebook use over `crops` random crops of the training photos. `reuse`: a finished run of the same
    arguments already in `output_dir` (recorded in its `bench_command.json`, evaluated at `steps`) is read instead of
    trained again; one made by other code is refused (`UsageError`)."""
    warmup = load_config_file("tiny_cpu", OPTION_NAMES)["warmup_steps"]
    schedule = [
        "--output_dir", str(output_dir), "--seed", str(seed), "--max_steps", str(steps),
        "--warmup_steps", str(min(warmup, steps // 4)), "--logging_steps", str(max(1, steps // 30)),
        "--eval_steps", str(max(1, steps // 4)), "--save_steps", str(steps), "--num_reconstructions", "0",
    ]  # fmt: skip
    log_path = output_dir.with_suffix(".log")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    if reuse and _finished(output_dir, [*options, *schedule], steps):
        print(f"{output_dir.name}: reusing the finished run", flush=True)
        wall = float("nan")
    else:
        wall = _train(output_dir, [*options, *schedule], continuous, log_path)
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = json.loads((output_dir / "eval_results.json").read_text())
    use = crop_use(output_dir, crops) if crops and not continuous else None
    return {"records": records, "final": final, "wall": wall, "crops": use}


def _finished(output_dir: Path, arguments: list[str], steps: int) -> bool:
    """Whether `output_dir` holds a finished run of exactly these arguments, made by this code; a finished run of
    these arguments made by other code (another commit, other uncommitted changes, or not recorded) is refused."""
    results, command = output_dir / "eval_results.json", output_dir / "bench_command.json"
    if not (results.is_file() and command.is_file()):
        return False
    recorded = json.loads(command.read_text())
    if not isinstance(recorded, dict):  # written before the code was recorded: only the arguments
        recorded = {"arguments": recorded, "code": None}
    if recorded["arguments"] != arguments or json.loads(results.read_text())["step"] != steps:
        return False
    code = code_identity()
    if recorded["code"] != code or code["dirty"] == "unknown":
        raise UsageError(
            f"--reuse: the run in {output_dir} was made by {_describe_code(recorded['code'])}, not by this code "
            f"({_describe_code(code)}); rerun without --reuse or with another --keep folder, so that it is trained "
            "again."
        )
    return True


def _describe_code(code: dict | None) -> str:
    if code is None:
        return "code it did not record"
    if code["commit"] == "unknown":
        return "code outside a git checkout, which cannot be identified"
    dirty = code["dirty"]
    return f"commit {code['commit'][:12]}" + ("" if dirty is None else f" with uncommitted changes ({dirty})")


def _train(output_dir: Path, arguments: list[str], continuous: bool, log_path: Path) -> float:
    code_of_run = code_identity()  # before the run: the code that trains it
    with open(log_path, "w") as log:
        code, wall, _, _ = run_and_sample_memory(train_command(arguments, continuous), stdout=log, stderr=log)
    if code != 0:
        raise RuntimeError(f"{output_dir.name} failed:\n{log_path.read_text()[-3000:]}")
    (output_dir / "bench_command.json").write_text(json.dumps({"arguments": arguments, "code": code_of_run}))
    return wall


def crop_use(folder: Path, crops: int = CROPS) -> dict:
    import torch

    from vqrae import VQRAEModel
    from vqrae.builtin_photos import builtin_photos
    from vqrae.training.metrics import codebook_use_on_crops

    torch.set_num_threads(2)
    model = VQRAEModel.from_pretrained(folder).eval()
    photos = [example["image"].convert("RGB") for example in builtin_photos("train")]
    return codebook_use_on_crops(model, photos, model.get_image_processor(), crops, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# Statistics and report
# ---------------------------------------------------------------------------------------------------------------


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % t interval of the mean (nan bounds for a single value)."""
    from scipy import stats

    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def cell(values: list[float], digits: int, sign: bool = False) -> str:
    mean, low, high = t_interval(values)
    fmt = f"{{:{'+' if sign else ''}.{digits}f}}"
    if low != low:  # one seed
        return fmt.format(mean)
    return f"{fmt.format(mean)} [{fmt.format(low)}, {fmt.format(high)}]"


def paired(runs: dict, variant: str, seeds: list[int], metric: str) -> list[float]:
    return [runs[(variant, s)]["final"][metric] - runs[(REFERENCE, s)]["final"][metric] for s in seeds]


def verdict_word(differences: list[float]) -> str:
    _, low, high = t_interval(differences)
    if low != low:
        return "one seed: no interval"
    return "inside the noise" if low <= 0 <= high else ("better" if low > 0 else "worse")


def plot_curves(runs: dict, variants: list[str], path: Path) -> None:
    """Validation PSNR and the training windows' codebook use against the step, every seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (psnr_axis, usage_axis) = plt.subplots(1, 2, figsize=(12, 4))
    bicubic = None
    for color, variant in enumerate(variants):
        for seed_index, ((name, _), result) in enumerate((k, v) for k, v in runs.items() if k[0] == variant):
            style = dict(color=f"C{color}", linewidth=1, alpha=1 if seed_index == 0 else 0.5)
            label = variant if seed_index == 0 else None
            evals = [r for r in result["records"] if r.get("type") == "eval"]
            steps, psnr = [r["step"] for r in evals], [r["psnr"] for r in evals]
            psnr_axis.plot(steps, psnr, marker="o", ms=3, label=label, **style)
            train = [r for r in result["records"] if r.get("type") == "train" and "codebook_usage" in r]
            if name != CONTINUOUS:
                usage_axis.plot([r["step"] for r in train], [100 * r["codebook_usage"] for r in train], **style)
            bicubic = result["final"]["bicubic_psnr"]
    if bicubic is not None:
        psnr_axis.axhline(bicubic, color="grey", linestyle=":", label="bicubic thumbnail")
    psnr_axis.set(xlabel="step", ylabel="PSNR (dB)", title="held-out set (one line per seed)")
    usage_axis.set(xlabel="step", ylabel="% of the codes", title="codes used in each logging window (training)")
    psnr_axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report(runs: dict, variants: list[str], seeds: list[int], steps: int, num_crops: int = CROPS) -> str:
    rows = []
    for variant in variants:
        finals = [runs[(variant, s)]["final"] for s in seeds]
        crops = [runs[(variant, s)]["crops"] for s in seeds]
        continuous = variant == CONTINUOUS
        vs_reference = "—" if variant == REFERENCE or REFERENCE not in variants else (
            f"{cell(paired(runs, variant, seeds, 'psnr'), 2, sign=True)}: "
            f"{verdict_word(paired(runs, variant, seeds, 'psnr'))}"
        )  # fmt: skip
        seams = [f["seam_score"] for f in finals if f["seam_score"] is not None]
        rows.append([
            f"{variant}: {VARIANTS[variant][0]}",
            cell([f["psnr"] for f in finals], 2),
            vs_reference,
            cell([f["ssim"] for f in finals], 3),
            cell(seams, 2) if seams else "—",
            "—" if continuous else cell([100 * c["codebook_utilization"] for c in crops], 1) + " %",
            "—" if continuous else cell([c["perplexity"] for c in crops], 0),
            "float" if continuous else f"{finals[0]['bits_per_image']:.0f}",
        ])  # fmt: skip
    first = runs[(variants[0], seeds[0])]["final"]
    rows.append([
        "bicubic thumbnail (same token grid)", f"{first['bicubic_psnr']:.2f}", "—", f"{first['bicubic_ssim']:.3f}",
        f"{first['bicubic_seam_score']:.2f}", "—", "—", f"{first['bicubic_bits_per_image']:.0f}",
    ])  # fmt: skip
    header = ["variant", "PSNR dB [95 % CI]", f"Δ PSNR vs {REFERENCE}, paired [95 % CI]", "SSIM [95 % CI]",
              "seam score", f"codebook use, {num_crops} crops", "perplexity", "bits/image"]  # fmt: skip
    return (
        f"{steps} steps per run for every variant, seeds {seeds} (a seed's runs are paired: same crops, same "
        "initialisation where the layers agree); cells are the mean over seeds [95 % t interval over seeds]. "
        f"Held-out set: {first['num_images']} tiles of the held-out photos, {first['image_size']} px. Codebook use: "
        f"{num_crops} random crops of the training photos ({num_crops * 64:,} tokens). Seam score: 1 = patch borders "
        "no more visible than in the photos.\n\n" + markdown_table(header, rows) + "\n\n" + ALGEBRA
    )


ALGEBRA = """**The seed's 1x1 `post_quant_conv`, by algebra.** FSQ's `project_out` is a Linear from the FSQ width (6)
to D; a 1x1 D -> D convolution after it is another affine map of each token, and the two compose into one:
`W2 (W1 c + b1) + b2 = (W2 W1) c + (W2 b1 + b2)`, a Linear from 6 to D like `project_out` alone. It adds
parameters but no function the model could not already compute, so any difference it makes (row `a-k1` against
`b`) is one of optimisation, not of capacity. Cosmos-Tokenizer applies the convolution to the 6-wide codes instead,
in place of `project_out` (row `a-cosmos`): for a 1x1 kernel the same function class again, with fewer parameters.
A 3x3 kernel (the tiny preset, row `a`) is not such a composition: it mixes each token with its neighbours.
"""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--continuous-worker"]:
        return continuous_worker(argv[1:])
    parser = bench_parser(__doc__.split("\n\n")[0], threads=False)
    parser.add_argument("--steps", type=int, default=600, help="training steps of every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    add_run_options(parser)
    parser.add_argument(
        "--reuse", action="store_true", help="read finished runs of the same options and code found in --keep"
    )
    smoke = {"steps": 2, "seeds": [1], "variants": [REFERENCE, CONTINUOUS], "crops": 16}
    args = parse_bench_args(parser, argv, smoke)
    start_load = load_average()
    runs = {}
    with run_folders(args.keep, "bench-quality") as tmp:
        for seed_index, seed in enumerate(args.seeds):
            for variant in args.variants if seed_index % 2 == 0 else args.variants[::-1]:
                result = train_run(
                    tmp / f"{variant}-seed{seed}", VARIANTS[variant][1], args.steps, seed, variant == CONTINUOUS,
                    reuse=args.reuse, crops=args.crops,
                )  # fmt: skip
                runs[(variant, seed)] = result
                use = result["crops"]
                print(
                    f"{variant} seed {seed}: {result['final']['psnr']:.2f} dB"
                    + ("" if use is None else f", {use['used_codes']} of {use['codebook_size']} codes"),
                    flush=True,
                )
        body = report(runs, args.variants, args.seeds, args.steps, args.crops)
        # The curves go next to BENCHMARKS.md when it is written, else to the run folder (looked at, not published).
        plot_curves(runs, args.variants, tmp / CURVES_PNG.name if args.no_write else CURVES_PNG)
    if not args.no_write:
        body += f"\n![validation PSNR and codebook use over training]({CURVES_PNG.name})\n"
    publish("bench_quality", "6. Quality of the variants at an equal number of steps", body, start_load, args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(Path(__file__).name, main))
