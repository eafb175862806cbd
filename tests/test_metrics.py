"""Metrics: evaluate_model against figures computed independently from the model's outputs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

import vqrae
from conftest import tiny_model
from vqrae.image_data import ValidationImages
from vqrae.training.metrics import (
    bicubic_baseline,
    bootstrap_interval,
    evaluate_model,
    mean_color_error,
    save_eval_results,
    seam_score,
    seam_sums,
)
from vqrae.training.run_files import EVAL_RESULT_FIELDS


@pytest.fixture(scope="module")
def validation():
    rng = np.random.default_rng(0)
    images = []
    for _ in range(5):
        smooth = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        images.append(Image.fromarray(smooth).resize((32, 32), Image.Resampling.BICUBIC))
    return ValidationImages(images, list(range(5)), 0, "toy", "validation", 32)


def _unit(images):
    return torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2).float() / 255


def test_metrics_match_an_independent_computation(validation):
    model = tiny_model(seed=1).eval()
    result = evaluate_model(model, validation, batch_size=2, step=7)
    metrics = result.metrics
    assert list(metrics) == list(EVAL_RESULT_FIELDS)

    processor = model.get_image_processor()
    pixel_values = processor(images=validation.images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        indices = model.encode(pixel_values).indices
        reconstructions = vqrae.to_pil_images(model.decode_from_indices(indices).reconstruction, processor)
    target, preds = _unit(validation.images), _unit(reconstructions)
    psnr = peak_signal_noise_ratio(preds, target, data_range=1.0, reduction="none", dim=(1, 2, 3)).mean()
    ssim = structural_similarity_index_measure(preds, target, data_range=1.0)
    assert metrics["psnr"] == pytest.approx(float(psnr), abs=1e-4)
    assert metrics["ssim"] == pytest.approx(float(ssim), abs=1e-5)
    stats = vqrae.codebook_statistics(indices, model.codebook_size)
    assert metrics["used_codes"] == stats["used_codes"] and metrics["perplexity"] == pytest.approx(stats["perplexity"])
    assert metrics["bits_per_image"] == pytest.approx(16 * np.log2(64000))
    assert metrics["bicubic_bits_per_image"] == 16 * 24
    assert metrics["num_images"] == 5 and metrics["step"] == 7 and metrics["image_size"] == 32
    assert metrics["rfid"] is None  # no Inception weights in the isolated test cache
    assert int(result.code_counts.sum()) == 5 * 16
    assert [image.size for image in result.reconstructions] == [(32, 32)] * 5
    assert model.training is False


def test_bicubic_baseline(validation):
    image = validation.images[0]
    baseline = bicubic_baseline(image, (4, 4))
    assert baseline.size == image.size and baseline.mode == "RGB"
    assert np.asarray(bicubic_baseline(image, (32, 32))).tolist() == np.asarray(image).tolist()
    model = tiny_model().train()
    metrics = evaluate_model(model, validation).metrics
    target = _unit(validation.images)
    preds = _unit([bicubic_baseline(image, (4, 4)) for image in validation.images])
    psnr = peak_signal_noise_ratio(preds, target, data_range=1.0, reduction="none", dim=(1, 2, 3)).mean()
    assert metrics["bicubic_psnr"] == pytest.approx(float(psnr), abs=1e-4)
    assert metrics["bicubic_psnr"] > metrics["psnr"]  # an untrained model does worse than the baseline
    assert model.training is True  # training mode is restored


def test_results_do_not_depend_on_batch_size_and_save_flat(validation, tmp_path):
    model = tiny_model(seed=2)
    first = evaluate_model(model, validation, batch_size=5).metrics
    assert evaluate_model(model, validation, batch_size=2).metrics == first
    path = tmp_path / "eval_results.json"
    save_eval_results(first, str(path))
    assert json.loads(path.read_text()) == first
    with pytest.raises(ValueError, match="lacks the eval_results keys"):
        save_eval_results({"psnr": 1.0}, str(path))


def _strict_json(text: str) -> dict:
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_a_perfect_reconstruction_is_capped_at_100_db_and_saved_as_strict_json(tmp_path):
    # One flat colour: the bicubic baseline (shrink, then enlarge) gives it back exactly, an infinite PSNR uncapped.
    flat = Image.new("RGB", (32, 32), (90, 140, 200))
    assert np.array_equal(np.asarray(bicubic_baseline(flat, (4, 4))), np.asarray(flat))
    validation = ValidationImages([flat], [0], 0, "flat", "validation", 32)
    metrics = evaluate_model(tiny_model(seed=4), validation).metrics
    assert metrics["bicubic_psnr"] == 100.0 and metrics["psnr"] < 100.0
    path = tmp_path / "eval_results.json"
    save_eval_results(metrics, str(path))
    assert _strict_json(path.read_text()) == metrics

    # A non-finite value is refused, named, and nothing is written.
    with pytest.raises(ValueError, match=r"JSON cannot represent: \{'bicubic_psnr': inf\}"):
        save_eval_results({**metrics, "bicubic_psnr": float("inf")}, str(tmp_path / "bad.json"))
    assert not (tmp_path / "bad.json").exists() and not (tmp_path / "bad.json.tmp").exists()


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_images():
    rng = np.random.default_rng(0)
    few, many = rng.normal(20, 2, 16), rng.normal(20, 2, 400)
    low, high = bootstrap_interval(few)
    assert low < few.mean() < high
    assert bootstrap_interval(few) == [low, high]  # seeded: the same images give the same interval
    many_low, many_high = bootstrap_interval(many)
    assert many_high - many_low < (high - low) / 3  # ~ 1 / sqrt(n): 5x narrower for 25x the images
    # The standard error of a mean of 400 draws of sigma 2 is 0.1: a 95 % interval is about +-0.2.
    assert 0.3 < many_high - many_low < 0.5
    assert bootstrap_interval(np.full(8, 3.0)) == [3.0, 3.0]


def test_bootstrap_interval_is_95_percent_wide():
    """For a large normal sample the bootstrap means are normal with sd s / sqrt(n): a 95 % interval is
    2 x 1.96 of that wide (a 90 % one 2 x 1.645, 16 % narrower) and centred on the mean."""
    samples = np.random.default_rng(5).normal(20, 2, 1000)
    low, high = bootstrap_interval(samples)
    standard_error = samples.std() / np.sqrt(len(samples))
    assert (high - low) / (2 * 1.959964 * standard_error) == pytest.approx(1, abs=0.06)
    assert (low + high) / 2 == pytest.approx(samples.mean(), abs=0.2 * standard_error)


def _uint8(array):
    return torch.from_numpy(np.array(array)).permute(2, 0, 1)[None]


def test_seam_score_is_one_for_the_photos_and_large_for_a_mosaic():
    rng = np.random.default_rng(1)
    # A smooth 32 x 32 image: a random 4 x 4 grid enlarged bicubically.
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((32, 32), 3))
    # The mosaic of that image: every 8 x 8 patch flattened to its mean colour (what a blocky decoder produces).
    mosaic = smooth.reshape(4, 8, 4, 8, 3).astype(float).mean(axis=(1, 3), keepdims=True)
    mosaic = np.broadcast_to(mosaic, (4, 8, 4, 8, 3)).reshape(32, 32, 3).round().astype(np.uint8)
    originals = seam_sums(_uint8(smooth), 8).numpy()
    assert seam_score(originals, originals) == pytest.approx(1.0)
    assert seam_score(seam_sums(_uint8(mosaic), 8).numpy(), originals) is None  # flat patches: no within-patch change
    noisy = np.clip(mosaic + rng.integers(-3, 4, mosaic.shape), 0, 255).astype(np.uint8)  # a little texture inside
    assert seam_score(seam_sums(_uint8(noisy), 8).numpy(), originals) > 2
    # By hand: one 1 x 2 x 1 image with a border between its two pixels (patch 1): all change is across borders.
    sums = seam_sums(torch.tensor([[[[10, 30]]]], dtype=torch.uint8), 1)
    assert sums.tolist() == [[20.0, 1.0, 0.0, 0.0]]
    sums = seam_sums(torch.tensor([[[[10, 30, 35, 45]]]], dtype=torch.uint8), 2)  # border between pixels 2 and 3
    assert sums.tolist() == [[5.0, 1.0, 30.0, 2.0]]


def test_evaluation_reports_intervals_seams_and_the_token_count(validation):
    metrics = evaluate_model(tiny_model(seed=1), validation).metrics
    for name in ("psnr", "ssim", "bicubic_psnr", "bicubic_ssim"):
        low, high = metrics[f"{name}_interval"]
        assert low <= metrics[name] <= high
    assert metrics["codebook_tokens"] == 5 * 16
    assert metrics["seam_score"] > 0 and metrics["bicubic_seam_score"] > 0
    assert metrics["crop_codebook_use"] is None  # only vqrae-evaluate --num_crops measures it


def test_colour_error_of_a_known_shift_is_skimages_ciede2000_of_the_two_mean_colours():
    from skimage.color import deltaE_ciede2000, rgb2lab

    # Two images whose pixels vary but whose mean colours are known exactly (in RGB [0, 1]).
    rng = np.random.default_rng(0)
    texture = torch.from_numpy(rng.choice([-0.1, 0.1], size=(1, 1, 8, 8))).float()
    texture = texture - texture.mean()
    original_mean, shifted_mean = np.array([0.5, 0.4, 0.3]), np.array([0.7, 0.35, 0.3])  # toward red
    original = torch.tensor(original_mean).float().view(1, 3, 1, 1) + texture
    shifted = torch.tensor(shifted_mean).float().view(1, 3, 1, 1) + texture
    expected = deltaE_ciede2000(rgb2lab(shifted_mean), rgb2lab(original_mean))
    assert expected > 10  # a cast anyone sees
    assert mean_color_error(shifted, original) == pytest.approx([expected], rel=1e-5)
    assert mean_color_error(original, original).tolist() == [0.0]
    # The mean is taken in RGB before the conversion: averaging per-pixel Lab would give another figure here.
    per_pixel_lab = deltaE_ciede2000(
        rgb2lab(shifted[0].permute(1, 2, 0).double().numpy()).mean((0, 1)),
        rgb2lab(original[0].permute(1, 2, 0).double().numpy()).mean((0, 1)),
    )
    assert abs(per_pixel_lab - expected) > 1e-3


def test_evaluation_reports_the_colour_error_of_the_model_and_the_baseline(validation, tmp_path):
    result = evaluate_model(tiny_model(seed=1), validation)
    metrics = result.metrics
    target = _unit(validation.images)
    for name, images in (("color_error", result.reconstructions), ("bicubic_color_error", result.bicubic)):
        per_image = mean_color_error(_unit(images), target)
        assert metrics[name] == pytest.approx(float(per_image.mean()), rel=1e-9)
        assert metrics[f"{name}_interval"] == bootstrap_interval(per_image)
    assert metrics["color_error"] > metrics["bicubic_color_error"] > 0  # an untrained model is far off in colour
    # The same images as their own reconstructions: no colour error.
    originals = _unit(validation.images)
    assert mean_color_error(originals, originals).tolist() == [0.0] * 5
    save_eval_results(metrics, tmp_path / "eval_results.json")
    saved = json.loads((tmp_path / "eval_results.json").read_text())
    assert saved["color_error"] == metrics["color_error"] and saved["bicubic_color_error_interval"] is not None


def _steps(width: int, offsets, step: int) -> np.ndarray:
    """A `width x width` gray image (1 channel) rising by 1 between neighbours left to right, and by `step` where
    `x` (the right pixel of the pair) is in `offsets`; constant down the columns."""
    increments = np.ones(width - 1, dtype=np.int64)
    increments[np.asarray(offsets, dtype=np.int64) - 1] = step
    row = np.concatenate([[0], np.cumsum(increments)])
    return torch.from_numpy(np.broadcast_to(row, (width, width)).astype(np.uint8).copy())[None, None]


def test_seam_sums_and_score_on_images_with_a_known_grid():
    # 16 x 16, patch 4: per row 3 border pairs and 12 within; per column (all differences 0) the same.
    on_the_grid = seam_sums(_steps(16, [4, 8, 12], 9), 4).numpy()
    assert on_the_grid.tolist() == [[16 * 3 * 9, 2 * 16 * 3, 16 * 12, 2 * 16 * 12]]  # border 4.5, within 0.5 per pair
    off_the_grid = seam_sums(_steps(16, [2, 6, 10, 14], 9), 4).numpy()  # the same steps, 2 pixels off
    assert off_the_grid.tolist() == [[16 * 3, 2 * 16 * 3, 16 * (4 * 9 + 8), 2 * 16 * 12]]
    # A patch size that does not divide where the steps are: they are read as within-patch change.
    assert seam_sums(_steps(16, [4, 8, 12], 9), 8).numpy().tolist() == [
        [16 * 9, 2 * 16, 16 * (2 * 9 + 12), 2 * 16 * 14]
    ]
    ramp = seam_sums(_steps(16, [], 1), 4).numpy()  # no seams at all: border / within is that of any pair
    assert seam_score(ramp, ramp) == 1.0
    # (border / within of the reconstructions) over (that of the originals): the reconstruction first.
    assert seam_score(on_the_grid, ramp) == pytest.approx(9.0)
    assert seam_score(ramp, on_the_grid) == pytest.approx(1 / 9)
    assert seam_score(off_the_grid, ramp) == pytest.approx((16 * 3 / 96) / (16 * 44 / 384))  # 0.27: no seams


def test_evaluation_scores_seams_of_the_reconstructions_against_the_originals_on_the_patch_grid(validation):
    result = evaluate_model(tiny_model(seed=1), validation)
    originals = torch.from_numpy(np.stack([np.asarray(image) for image in validation.images])).permute(0, 3, 1, 2)
    assert [np.asarray(image).tolist() for image in result.originals] == [
        np.asarray(image).tolist() for image in validation.images
    ]

    def score(images, reference, patch):
        pixels = torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2)
        return seam_score(seam_sums(pixels, patch).numpy(), seam_sums(reference, patch).numpy())

    patch = 32 // 4  # the tiny model: 32-px images, a 4 x 4 token grid, so 8-px decoder patches
    for name, images in (("seam_score", result.reconstructions), ("bicubic_seam_score", result.bicubic)):
        expected = score(images, originals, patch)
        assert result.metrics[name] == pytest.approx(expected, rel=1e-12)
        # The test tells the wrong patch size and the swapped roles apart from the right figure.
        assert abs(score(images, originals, patch // 2) - expected) > 1e-3 * expected
        assert abs(1 / expected - expected) > 1e-3 * expected
