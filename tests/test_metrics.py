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
from vqrae.training.metrics import EVAL_RESULT_KEYS, bicubic_baseline, evaluate_model, save_eval_results


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
    assert list(metrics) == list(EVAL_RESULT_KEYS)

    processor = model.get_image_processor()
    pixel_values = processor(images=validation.images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        indices = model.encode(pixel_values).indices
        reconstructions = vqrae.to_pil_images(model.decode_from_indices(indices).reconstruction)
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
