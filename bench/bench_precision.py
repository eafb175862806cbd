"""How close bf16 is to float32, end to end, on real photos: equal token indices and reconstruction PSNR.

    python bench/bench_precision.py                           # the default run's model, outputs/vqrae-tiny-cpu
    python bench/bench_precision.py --model FOLDER --no-write
    python bench/bench_precision.py --smoke                   # a random tiny model, 4 tiles, seconds; writes nothing

`--model` is a trained model folder (default `outputs/vqrae-tiny-cpu`, what `vqrae-train` with no arguments
writes), loaded three ways:

- float32: `VQRAEModel.from_pretrained(folder, dtype=torch.float32)`, the reference;
- bf16 weights: `VQRAEModel.from_pretrained(folder, dtype=torch.bfloat16)` (the quantizer stays float32);
- autocast: the float32 model under `torch.autocast("cpu", dtype=torch.bfloat16)`, what
  `vqrae-tokenize --mixed_precision bf16` does (decoding under autocast too here).

Images: the built-in held-out tiles exactly as the training loop evaluates them (`load_image_dataset("validation")`
+ `load_validation_images`: the 324 tiles of the 4 held-out photos at three scales, resized with the model's
processor; the section compares their count and float32 PSNR with the model folder's `eval_results.json`), and
random crops of each tile at several scales (`random_resized_crop_box` with a fixed share of the tile's area,
aspect 3/4 to 4/3, resized to the model's size). Each precision encodes the images (`encode(...).indices`) and
decodes its own indices (`decode_from_indices`); PSNR is computed on 8-bit RGB as `vqrae-evaluate` does.
Intervals are 95 % bootstrap intervals over images (tokens of one image are not independent). The control: the
bf16 model's quantizer fed the float32 model's features must give the float32 indices exactly (the quantizer
computes in float32 in both models); any difference comes from the encoder's features. Batches of `--batch-size`
images under `torch.inference_mode()`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch
from _common import load_average, markdown_table, publish

from vqrae import VQRAEModel
from vqrae.builtin_photos import BUILTIN_DATASET_NAME
from vqrae.image_data import load_image_dataset, load_validation_images, random_resized_crop_box
from vqrae.image_decoding import decode_image

PRECISIONS = ("float32", "bf16 weights", "autocast")
HELD_OUT = "held-out tiles (as evaluated in training)"


def images_to_uint8(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in images])).permute(0, 3, 1, 2)


def reconstruction_to_uint8(reconstruction: torch.Tensor, processor) -> torch.Tensor:
    mean = torch.as_tensor(processor.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(processor.image_std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((reconstruction.float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)


def psnr_per_image(prediction: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """PSNR in dB of 8-bit images `(B, 3, H, W)`, as vqrae-evaluate computes it (torchmetrics, data range 1)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    value = peak_signal_noise_ratio(
        prediction.float() / 255, target.float() / 255, data_range=1.0, reduction="none", dim=(1, 2, 3)
    )
    return value.double().numpy()


def run_precisions(models: dict, images: list, processor, batch_size: int) -> dict:
    """Per image: the indices and reconstruction PSNR of each precision, the control, and the PSNR of the bf16 and
    autocast decoders on the float32 indices against the float32 decoder (the decoder's own share)."""
    float32, bfloat16 = models["float32"], models["bf16 weights"]
    patch = float32.config.vision_config.patch_size
    out = {name: {"indices": [], "psnr": []} for name in PRECISIONS}
    out["control"] = {"indices": []}
    out["decoder only"] = {"bf16 weights": [], "autocast": []}
    feature_error = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            pixel_values = processor(images=batch, return_tensors="pt")["pixel_values"].float()
            target = images_to_uint8(batch)
            grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
            reconstructions = {}
            for name in PRECISIONS:
                model = bfloat16 if name == "bf16 weights" else float32
                context = torch.autocast("cpu", dtype=torch.bfloat16) if name == "autocast" else nullcontext()
                with context:
                    encoded = model.encode(pixel_values)
                    reconstruction = model.decode_from_indices(encoded.indices).reconstruction
                out[name]["indices"].append(encoded.indices.reshape(len(batch), -1))
                reconstructions[name] = reconstruction_to_uint8(reconstruction, processor)
                out[name]["psnr"].append(psnr_per_image(reconstructions[name], target))
                if name == "float32":
                    features32, indices32 = encoded.last_hidden_state, encoded.indices
                else:
                    difference = (encoded.last_hidden_state.float() - features32).pow(2).mean(dim=(1, 2)).sqrt()
                    feature_error.append((name, (difference / features32.pow(2).mean(dim=(1, 2)).sqrt()).numpy()))
            out["control"]["indices"].append(bfloat16.quantize(features32, grid).indices.reshape(len(batch), -1))
            for name, model, context in (
                ("bf16 weights", bfloat16, nullcontext()),
                ("autocast", float32, torch.autocast("cpu", dtype=torch.bfloat16)),
            ):
                with context:
                    decoded = reconstruction_to_uint8(model.decode_from_indices(indices32).reconstruction, processor)
                # Capped at 100 dB (identical images), as common tools do.
                out["decoder only"][name].append(np.minimum(psnr_per_image(decoded, reconstructions["float32"]), 100))
    result = {}
    for name in (*PRECISIONS, "control"):
        result[name] = {"indices": torch.cat(out[name]["indices"]).numpy()}
        if "psnr" in out[name]:
            result[name]["psnr"] = np.concatenate(out[name]["psnr"])
    result["decoder only"] = {name: np.concatenate(values) for name, values in out["decoder only"].items()}
    result["feature error"] = {
        name: np.concatenate([values for other, values in feature_error if other == name])
        for name in ("bf16 weights", "autocast")
    }
    return result


def concatenate(results: list[dict]) -> dict:
    """The results of several image sets (`run_precisions`) as one."""
    return {
        group: {key: np.concatenate([result[group][key] for result in results]) for key in results[0][group]}
        for group in results[0]
    }


def bootstrap_interval(per_image: np.ndarray, weights: np.ndarray | None, rng, resamples: int = 2000):
    """95 % interval of a (weighted) mean over images, resampling the images."""
    count = len(per_image)
    picks = rng.integers(0, count, size=(resamples, count))
    if weights is None:
        values = per_image[picks].mean(axis=1)
    else:
        values = (per_image[picks] * weights[picks]).sum(axis=1) / weights[picks].sum(axis=1)
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def level_digits(indices: np.ndarray, levels: list[int]) -> np.ndarray:
    """FSQ index -> the level index of every dimension (first dimension least significant)."""
    basis = np.cumprod([1, *levels[:-1]])
    return (indices[..., None] // basis) % np.asarray(levels)


def crops_of(windows: list, image_size: int, scales: list[float], per_window: int, resample: int, seed: int):
    """`per_window` random crops of each window at each area share in `scales`, resized to `image_size`."""
    rng = np.random.default_rng(seed)
    crops = {scale: [] for scale in scales}
    for scale in scales:
        for window in windows:
            for _ in range(per_window):
                box = random_resized_crop_box(window.width, window.height, rng, scale=(scale, scale))
                crops[scale].append(window.resize((image_size, image_size), resample, box=box))
    return crops


def load_models(folder: str) -> dict:
    """The model of `folder` in float32 and with bf16 weights (evaluation mode)."""
    return {
        "float32": VQRAEModel.from_pretrained(folder, dtype=torch.float32).eval(),
        "bf16 weights": VQRAEModel.from_pretrained(folder, dtype=torch.bfloat16).eval(),
    }


def save_smoke_model(folder: str) -> None:
    """A randomly initialised model of the default run's architecture, saved to `folder` (for `--smoke`)."""
    from vqrae.training.args import ModelArguments
    from vqrae.training.trainer import build_model

    torch.manual_seed(0)
    model = build_model(ModelArguments(vision_config="tiny"))
    model.save_pretrained(folder)
    model.get_image_processor().save_pretrained(folder)


def held_out_reference(folder: str) -> dict | None:
    """The run's own `eval_results.json` (what training measured on the held-out tiles), if the folder has one."""
    path = os.path.join(folder, "eval_results.json")
    if not os.path.exists(path):
        return None
    with open(path) as file:
        return json.load(file)


def load_image_sets(config, processor, args) -> tuple[dict, list]:
    """The held-out tiles exactly as training evaluates them, and random crops of each at every scale in
    `args.scales`. `args.max_images` keeps the first tiles only (`--smoke`)."""
    image_size = config.vision_config.image_size
    resample = int(processor.resample)
    dataset, column = load_image_dataset("validation")
    validation = load_validation_images(
        dataset,
        column,
        image_size,
        dataset_name=BUILTIN_DATASET_NAME,
        dataset_split="validation",
        max_samples=args.max_images,
        resample=resample,
    )
    windows = [decode_image(dataset[i][column]) for i in validation.indices]
    crops = crops_of(windows, image_size, args.scales, args.crops_per_window, resample, args.seed)
    sets = {HELD_OUT: validation.images}
    sets.update({f"random crops, {scale:.0%} of the area": images for scale, images in crops.items()})
    return sets, validation.images


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="outputs/vqrae-tiny-cpu", help="a trained VQRAE model folder")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.05, 0.2, 0.6], help="crop area shares")
    parser.add_argument("--crops-per-window", type=int, default=1, help="random crops of each tile per scale")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a randomly initialised model of the default architecture on 4 tiles, one crop scale; writes nothing",
    )
    args = parser.parse_args(argv)
    args.max_images = None
    if args.smoke:
        args.max_images, args.scales, args.no_write = 4, [0.2], True
    elif not os.path.isdir(args.model):
        parser.error(
            f"model folder {args.model!r} not found; train it first with `vqrae-train` "
            "(writes outputs/vqrae-tiny-cpu) or pass --model FOLDER."
        )
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        with tempfile.TemporaryDirectory(prefix="bench_precision_smoke_") as folder:
            save_smoke_model(folder)
            args.model = folder
            measure(args)
    else:
        measure(args)


def measure(args) -> None:
    """Run every precision on every image set and publish the section."""
    start_load = load_average()
    started = time.perf_counter()
    models = load_models(args.model)
    processor = models["float32"].get_image_processor()
    sets, held_out_images = load_image_sets(models["float32"].config, processor, args)
    sets_results = {name: run_precisions(models, images, processor, args.batch_size) for name, images in sets.items()}
    # Batch-size dependence: the held-out tiles one at a time against the batched run above.
    one_at_a_time = run_precisions(models, held_out_images, processor, 1)
    batch_equal = {
        name: float((one_at_a_time[name]["indices"] == sets_results[HELD_OUT][name]["indices"]).mean())
        for name in PRECISIONS
    }
    sets_results["all crops"] = concatenate([result for name, result in sets_results.items() if "crops" in name])
    body = report(args, models, sets, sets_results, batch_equal, held_out_reference(args.model), started)
    publish("bench_precision", "9. bf16 vs float32, end to end on real photos", body, start_load, args.no_write)


AGREEMENT_HEADER = [
    "image set",
    "images",
    "tokens",
    "bf16 weights = float32",
    "autocast = float32",
    "control: bf16 quantizer on float32 features",
]
PSNR_HEADER = [
    "image set",
    "PSNR dB float32",
    "PSNR dB bf16 weights (change; 95 % interval)",
    "PSNR dB autocast (change; 95 % interval)",
    "decoder only, bf16 weights: PSNR dB vs float32 decode",
    "decoder only, autocast: PSNR dB vs float32 decode",
    "encoder features, bf16 weights: relative RMS error",
    "encoder features, autocast: relative RMS error",
]


def table_rows(sets_results: dict, levels: list[int], rng) -> tuple[list, list, list, dict]:
    """The rows of the agreement and PSNR tables, the notes on the PSNR changes, and the level digits of every
    differing token (held-out tiles and crops, each once) by precision."""
    agreement_rows, psnr_rows, psnr_notes = [], [], []
    flips = {"bf16 weights": [], "autocast": []}
    for name, result in sets_results.items():
        reference = result["float32"]["indices"]
        images, tokens_per_image = reference.shape
        cells = []
        for key in ("bf16 weights", "autocast", "control"):
            equal = result[key]["indices"] == reference
            low, high = bootstrap_interval(equal.mean(axis=1), None, rng)
            if equal.all():
                cells.append(f"100 % exactly ({equal.size} of {equal.size})")
            else:
                cells.append(f"{100 * equal.mean():.2f} % ({100 * low:.2f}-{100 * high:.2f})")
            if key in flips and name != "all crops":
                flips[key].append(
                    (level_digits(result[key]["indices"][~equal], levels), level_digits(reference[~equal], levels))
                )
        agreement_rows.append([name, images, images * tokens_per_image, *cells])
        psnr32 = result["float32"]["psnr"]
        row = [name, f"{psnr32.mean():.2f}"]
        for key in ("bf16 weights", "autocast"):
            delta = result[key]["psnr"] - psnr32
            low, high = bootstrap_interval(delta, None, rng)
            row.append(f"{result[key]['psnr'].mean():.2f} ({delta.mean():+.3f}; {low:+.3f} to {high:+.3f})")
            if name in (HELD_OUT, "all crops"):
                verdict = "the interval holds zero" if low <= 0 <= high else "the interval excludes zero"
                psnr_notes.append(
                    f"{name}, {key}: PSNR changes by {delta.mean():+.3f} dB (95 % interval {low:+.3f} to "
                    f"{high:+.3f} dB; {verdict})."
                )
        row += [f"{np.median(result['decoder only'][key]):.1f}" for key in ("bf16 weights", "autocast")]
        row += [
            f"{100 * statistics.median(result['feature error'][key].tolist()):.2f} %"
            for key in ("bf16 weights", "autocast")
        ]
        psnr_rows.append(row)
    return agreement_rows, psnr_rows, psnr_notes, flips


def flip_summary(key: str, flips: list, levels: list[int]) -> str:
    """How far the tokens that differ from float32 move: one level in one dimension is a neighbouring code."""
    changed = np.concatenate([pair[0] for pair in flips])
    original = np.concatenate([pair[1] for pair in flips])
    if len(changed) == 0:
        return f"{key}: no token differs."
    steps = np.abs(changed - original)
    one_step = float((steps.sum(axis=1) == 1).mean())
    dims = np.bincount((steps > 0).sum(axis=1), minlength=len(levels) + 1)
    return (
        f"{key}: of the {len(changed)} differing tokens (held-out tiles and crops), {100 * one_step:.1f} % move "
        f"by one level in one dimension (neighbouring codes); dimensions changed per differing token: "
        + ", ".join(f"{d}: {count}" for d, count in enumerate(dims) if d > 0 and count)
        + "."
    )


def reference_note(reference: dict | None, held_out: dict) -> str:
    """Whether the held-out set is the one the run's evaluation scored: its size and float32 PSNR against the
    run's `eval_results.json`."""
    images, psnr = len(held_out["float32"]["psnr"]), float(held_out["float32"]["psnr"].mean())
    if reference is None:
        return f"The model folder has no eval_results.json to compare the {images} held-out tiles with."
    return (
        f"The held-out tiles are the ones the run's evaluation scored: {images} tiles here, "
        f"{reference['num_images']} in the model folder's eval_results.json (step {reference['step']}); float32 PSNR "
        f"{psnr:.2f} dB here, {reference['psnr']:.2f} dB there."
    )


def report(args, models, sets, sets_results, batch_equal, reference, started) -> str:
    """The section's text: the agreement and PSNR tables and the notes under them."""
    config, vision = models["float32"].config, models["float32"].config.vision_config
    bf16_model = models["bf16 weights"]
    dtypes = {
        "encoder": bf16_model.encoder.dtype,
        "quantizer": next(bf16_model.quantizer.parameters()).dtype,
        "decoder": bf16_model.decoder.in_proj.weight.dtype,
    }
    levels = list(config.fsq_levels)
    agreement_rows, psnr_rows, psnr_notes, flips = table_rows(sets_results, levels, np.random.default_rng(args.seed))
    crop_count = sum(len(images) for name, images in sets.items() if "crops" in name)
    held_out_row, all_row = agreement_rows[0], agreement_rows[-1]
    lines = [
        f"Model: `{args.model}` ({vision.image_size} px, patch {vision.patch_size}, width {vision.hidden_size}, "
        f"{vision.num_hidden_layers} encoder and {config.decoder_num_hidden_layers} decoder layers, FSQ {levels}"
        f"{' + post_quant_conv' if config.use_post_quant_conv else ''}), "
        f"{'randomly initialised (--smoke)' if args.smoke else 'trained by `vqrae-train` (the default run)'}. "
        f"Loaded with `dtype=torch.bfloat16` its weights are: encoder {dtypes['encoder']}, quantizer "
        f"{dtypes['quantizer']}, decoder {dtypes['decoder']}. {len(sets[HELD_OUT])} held-out tiles and "
        f"{crop_count} random crops of them ({args.crops_per_window} per tile per scale, seed {args.seed}), batch "
        f"{args.batch_size}, torch {torch.__version__}, {torch.get_num_threads()} threads. "
        + reference_note(reference, sets_results[HELD_OUT]),
        "",
        "Share of tokens whose index equals the float32 model's (95 % bootstrap interval over images):",
        "",
        markdown_table(AGREEMENT_HEADER, agreement_rows),
        "",
        "Reconstruction quality (each precision decodes its own tokens; PSNR on 8-bit RGB against the image; change "
        '= mean over images of the per-image difference to float32, with its 95 % bootstrap interval). "Decoder '
        'only": the float32 tokens decoded in bf16 against the same tokens decoded in float32 (median over '
        "images). Feature error: RMS of the difference of the encoder's features to float32 over the RMS of the "
        "float32 features (median over images).",
        "",
        markdown_table(PSNR_HEADER, psnr_rows),
        "",
        f"- Control: the bf16 model's quantizer on the float32 model's features gives the float32 indices on "
        f"{all_row[5]} crop tokens and {held_out_row[5]} held-out tokens: the quantizer is float32 in both models; "
        "the differences above come from the encoder's features, computed in bf16.",
        f"- Held-out tiles: bf16 weights give the float32 token on {held_out_row[3].split(' (')[0]} of tokens, "
        f"autocast on {held_out_row[4].split(' (')[0]}; over all crops {all_row[3].split(' (')[0]} and "
        f"{all_row[4].split(' (')[0]}.",
        *[f"- {flip_summary(key, pairs, levels)}" for key, pairs in flips.items()],
        *[f"- {note}" for note in psnr_notes],
        "- Batch size: the held-out tiles encoded one at a time give the same indices as in batches of "
        f"{args.batch_size} on " + ", ".join(f"{100 * v:.2f} % ({k})" for k, v in batch_equal.items()) + " of tokens.",
        f"- Run time {time.perf_counter() - started:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
