"""vqrae-evaluate: results the model card reads, the picture, and the same figures as the training run."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_model
from vqrae import to_pil_images
from vqrae.evaluate import EVAL_RESULTS_FILE, RECONSTRUCTIONS_FILE, evaluate, parse_args
from vqrae.training.model_card import read_eval_results

GAP = 2  # pixels between the tiles of reconstructions.png


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    model = tiny_model(seed=5)
    model.save_pretrained(root / "model")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(1)
    for i in range(5):
        smooth = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
        Image.fromarray(smooth).resize((40 + 4 * i, 48), Image.Resampling.BICUBIC).save(photos / f"p{i}.png")
    (photos / "p5_broken.png").write_bytes(b"not an image")
    return root, model.eval(), photos


def test_results_and_picture_from_a_folder(setup):
    root, model, photos = setup
    output = root / "eval"
    metrics = evaluate(
        parse_args(
            ["--model", str(root / "model"), "--validation_dir", str(photos), "--output_dir", str(output)]
            + ["--batch_size", "2", "--num_examples", "3", "--step", "7"]
        )
    )
    assert read_eval_results(output) == metrics  # the model card machinery accepts the file as written
    assert json.loads((output / EVAL_RESULTS_FILE).read_text()) == metrics
    assert metrics["num_images"] == 5 and metrics["image_size"] == 32 and metrics["step"] == 7
    assert metrics["dataset_name"] == str(photos) and metrics["dataset_split"] == "validation"
    assert metrics["bits_per_image"] == pytest.approx(16 * np.log2(64000))
    assert 0 < metrics["used_codes"] <= 5 * 16 and metrics["rfid"] is None
    assert 1.0 <= metrics["perplexity"] <= metrics["used_codes"]

    # Top row: the centre-cropped photos; bottom row: their reconstructions through the tokens.
    picture = np.asarray(Image.open(output / RECONSTRUCTIONS_FILE))
    assert picture.shape == (2 * 32 + GAP, 3 * 32 + 2 * GAP, 3)
    original = Image.open(photos / "p1.png").convert("RGB")
    side = min(original.size)
    left, top = (original.width - side) // 2, (original.height - side) // 2
    original = original.resize((32, 32), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    np.testing.assert_array_equal(picture[:32, 34:66], np.asarray(original))
    pixel_values = model.get_image_processor()(images=[original], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        reconstruction = model.decode_from_indices(model.encode(pixel_values).indices).reconstruction
    np.testing.assert_array_equal(picture[34:, 34:66], np.asarray(to_pil_images(reconstruction)[0]))


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--dataset_name", "x", "--validation_dir", "y"], "at most one source of images"),
        (["--batch_size", "0"], "`--batch_size` must be an integer >= 1"),
        (["--max_eval_samples", "0"], "`--max_eval_samples` must be an integer >= 1"),
        (["--step", "-1"], "`--step` must be an integer >= 0"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        parse_args(["--model", "unused", "--output_dir", str(tmp_path), *extra])
