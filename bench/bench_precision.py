"""How close bf16 is to float32, end to end, on real photos: equal token indices and reconstruction PSNR.

    python bench/bench_precision.py                           # the default run's model, outputs/vqrae-tiny-cpu
    python bench/bench_precision.py --model FOLDER --no-write

`--model` is a trained model folder (default `outputs/vqrae-tiny-cpu`, what `vqrae-train` with no arguments
writes), loaded three ways:

- float32: `VQRAEModel.from_pretrained(folder, dtype=torch.float32)`, the reference;
- bf16 weights: `VQRAEModel.from_pretrained(folder, dtype=torch.bfloat16)` (the quantizer stays float32);
- autocast: the float32 model under `torch.autocast("cpu", dtype=torch.bfloat16)`, what
  `vqrae-tokenize --mixed_precision bf16` does (decoding under autocast too here).

Images: the built-in held-out photos exactly as the training loop evaluates them (`load_image_dataset("validation")`
+ `load_validation_images`: 20 windows of 4 photos, centre-cropped, resized with the model's processor), and
random crops of the same windows at several scales (`random_resized_crop_box` with a fixed share of the window's
area, aspect 3/4 to 4/3, resized to the model's size), so there are tens of thousands of tokens. Each precision
encodes the images (`encode(...).indices`) and decodes its own indices (`decode_from_indices`); PSNR is computed
on 8-bit RGB as `vqrae-evaluate` does. Intervals are 95 % bootstrap intervals over images (tokens of one image are
not independent). The control: the bf16 model's quantizer fed the float32 model's features must give the float32
indices exactly (the quantizer computes in float32 in both models); any difference comes from the encoder's
features. Batches of `--batch-size` images under `torch.inference_mode()`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
from _common import load_average, markdown_table, publish

from vqrae import VQRAEModel
from vqrae.image_data import (
    BUILTIN_DATASET_NAME,
    decode_image,
    load_image_dataset,
    load_validation_images,
    random_resized_crop_box,
)

PRECISIONS = ("float32", "bf16 weights", "autocast")


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="outputs/vqrae-tiny-cpu", help="a trained VQRAE model folder")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.05, 0.2, 0.6], help="crop area shares")
    parser.add_argument("--crops-per-window", type=int, default=16, help="random crops of each window per scale")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.model):
        sys.exit(
            f"bench_precision.py: error: model folder {args.model!r} not found; train it first with `vqrae-train` "
            "(writes outputs/vqrae-tiny-cpu) or pass --model FOLDER."
        )
    start_load = load_average()
    started = time.perf_counter()

    models = {
        "float32": VQRAEModel.from_pretrained(args.model, dtype=torch.float32).eval(),
        "bf16 weights": VQRAEModel.from_pretrained(args.model, dtype=torch.bfloat16).eval(),
    }
    bf16_model = models["bf16 weights"]
    dtypes = {
        "encoder": bf16_model.encoder.dtype,
        "quantizer": next(bf16_model.quantizer.parameters()).dtype,
        "decoder": bf16_model.decoder.in_proj.weight.dtype,
    }
    processor = models["float32"].get_image_processor()
    config = models["float32"].config
    image_size = config.vision_config.image_size
    resample = int(processor.resample)

    dataset, column = load_image_dataset("validation")
    validation = load_validation_images(
        dataset,
        column,
        image_size,
        dataset_name=BUILTIN_DATASET_NAME,
        dataset_split="validation",
        resample=resample,
    )
    windows = [decode_image(dataset[i][column]) for i in validation.indices]
    crops = crops_of(windows, image_size, args.scales, args.crops_per_window, resample, args.seed)
    sets = {"held-out photos (as evaluated in training)": validation.images}
    sets.update({f"random crops, {scale:.0%} of the area": images for scale, images in crops.items()})
    sets_results = {name: run_precisions(models, images, processor, args.batch_size) for name, images in sets.items()}

    # Batch-size dependence: the held-out photos one at a time against the batched run above.
    one_at_a_time = run_precisions(models, validation.images, processor, 1)
    held_out = sets_results["held-out photos (as evaluated in training)"]
    batch_equal = {
        name: float((one_at_a_time[name]["indices"] == held_out[name]["indices"]).mean()) for name in PRECISIONS
    }

    rng = np.random.default_rng(args.seed)
    sets_results["all crops"] = concatenate([result for name, result in sets_results.items() if "crops" in name])

    agreement_rows, psnr_rows, psnr_notes = [], [], []
    levels = list(config.fsq_levels)
    flips = {"bf16 weights": [], "autocast": []}
    for name, result in sets_results.items():
        reference = result["float32"]["indices"]
        images, tokens_per_image = reference.shape
        cells = []
        for key in ("bf16 weights", "autocast", "control"):
            equal = result[key]["indices"] == reference
            per_image = equal.mean(axis=1)
            low, high = bootstrap_interval(per_image, None, rng)
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
        changes = {}
        for key in ("bf16 weights", "autocast"):
            delta = result[key]["psnr"] - psnr32
            low, high = bootstrap_interval(delta, None, rng)
            changes[key] = (delta.mean(), low, high)
            row.append(f"{result[key]['psnr'].mean():.2f} ({delta.mean():+.3f}; {low:+.3f} to {high:+.3f})")
        for key in ("bf16 weights", "autocast"):
            row.append(f"{np.median(result['decoder only'][key]):.1f}")
        for key in ("bf16 weights", "autocast"):
            row.append(f"{100 * statistics.median(result['feature error'][key].tolist()):.2f} %")
        psnr_rows.append(row)
        if name in ("held-out photos (as evaluated in training)", "all crops"):
            for key, (mean, low, high) in changes.items():
                verdict = "within the noise" if low <= 0 <= high else "outside the noise"
                psnr_notes.append(
                    f"{name}, {key}: PSNR changes by {mean:+.3f} dB ({low:+.3f} to {high:+.3f}), {verdict}"
                    f"{', and under 0.01 dB' if max(abs(low), abs(high)) < 0.01 else ''}."
                )

    def flip_summary(key: str) -> str:
        changed = np.concatenate([pair[0] for pair in flips[key]])
        original = np.concatenate([pair[1] for pair in flips[key]])
        if len(changed) == 0:
            return f"{key}: no token differs."
        steps = np.abs(changed - original)
        one_step = float((steps.sum(axis=1) == 1).mean())
        dims = np.bincount((steps > 0).sum(axis=1), minlength=len(levels) + 1)
        return (
            f"{key}: of the {len(changed)} differing tokens (held-out photos and crops), {100 * one_step:.1f} % move "
            f"by one level in one dimension (neighbouring codes); dimensions changed per differing token: "
            + ", ".join(f"{d}: {count}" for d, count in enumerate(dims) if d > 0 and count)
            + "."
        )

    agreement_header = [
        "image set",
        "images",
        "tokens",
        "bf16 weights = float32",
        "autocast = float32",
        "control: bf16 quantizer on float32 features",
    ]
    psnr_header = [
        "image set",
        "PSNR dB float32",
        "PSNR dB bf16 weights (change; 95 % interval)",
        "PSNR dB autocast (change; 95 % interval)",
        "decoder only, bf16 weights: PSNR dB vs float32 decode",
        "decoder only, autocast: PSNR dB vs float32 decode",
        "encoder features, bf16 weights: relative RMS error",
        "encoder features, autocast: relative RMS error",
    ]
    crop_count = sum(len(images) for name, images in sets.items() if "crops" in name)
    held_out_row = agreement_rows[0]
    all_row = agreement_rows[-1]
    lines = [
        f"Model: `{args.model}` ({config.vision_config.image_size} px, patch {config.vision_config.patch_size}, "
        f"width {config.vision_config.hidden_size}, {config.vision_config.num_hidden_layers} encoder and "
        f"{config.decoder_num_hidden_layers_resolved} decoder layers, FSQ {levels}"
        f"{' + post_quant_conv' if config.use_post_quant_conv else ''}), trained by `vqrae-train` (the default run). "
        f"Loaded with `dtype=torch.bfloat16` its weights are: encoder {dtypes['encoder']}, quantizer "
        f"{dtypes['quantizer']}, decoder {dtypes['decoder']}. {len(validation.images)} held-out images and "
        f"{crop_count} random crops ({args.crops_per_window} per window per scale, seed {args.seed}), batch "
        f"{args.batch_size}, torch {torch.__version__}, {torch.get_num_threads()} threads.",
        "",
        "Share of tokens whose index equals the float32 model's (95 % bootstrap interval over images):",
        "",
        markdown_table(agreement_header, agreement_rows),
        "",
        "Reconstruction quality (each precision decodes its own tokens; PSNR on 8-bit RGB against the image; change "
        '= mean over images of the per-image difference to float32, with its 95 % bootstrap interval). "Decoder '
        'only": the float32 tokens decoded in bf16 against the same tokens decoded in float32 (median over '
        "images). Feature error: RMS of the difference of the encoder's features to float32 over the RMS of the "
        "float32 features (median over images).",
        "",
        markdown_table(psnr_header, psnr_rows),
        "",
        f"- Control: the bf16 model's quantizer on the float32 model's features gives the float32 indices on "
        f"{all_row[5]} crop tokens and {held_out_row[5]} held-out tokens: the quantizer is float32 in both models; "
        "the differences above come from the encoder's features, computed in bf16.",
        f"- Held-out photos: bf16 weights give the float32 token on {held_out_row[3].split(' (')[0]} of tokens, "
        f"autocast on {held_out_row[4].split(' (')[0]}; over all crops {all_row[3].split(' (')[0]} and "
        f"{all_row[4].split(' (')[0]}.",
        f"- {flip_summary('bf16 weights')}",
        f"- {flip_summary('autocast')}",
        *[f"- {note}" for note in psnr_notes],
        "- Batch size: the held-out photos encoded one at a time give the same indices as in batches of "
        f"{args.batch_size} on " + ", ".join(f"{100 * v:.2f} % ({k})" for k, v in batch_equal.items()) + " of tokens.",
        f"- Run time {time.perf_counter() - started:.0f} s.",
    ]
    body = "\n".join(lines) + "\n"
    publish("bench_precision", "9. bf16 vs float32, end to end on real photos", body, start_load, args.no_write)


if __name__ == "__main__":
    main()
