"""vqrae-evaluate: results the model card reads, the picture, and the same figures as the training run."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import save_model, tiny_model
from vqrae import to_pil_images
from vqrae.cli.evaluate import parse_evaluate_args
from vqrae.training.evaluate import evaluate
from vqrae.training.model_card import read_eval_results
from vqrae.training.run_files import CODEBOOK_USAGE_FILE, EVAL_RESULTS_FILE, RECONSTRUCTIONS_FILE


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    model = tiny_model(seed=5)
    save_model(model, root / "model")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(1)
    for i in range(5):
        smooth = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
        Image.fromarray(smooth).resize((40 + 4 * i, 48), Image.Resampling.BICUBIC).save(photos / f"p{i}.png")
    (photos / "p5_broken.png").write_bytes(b"not an image")
    return root, model.eval(), photos


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each evaluation (and training run) builds its own Accelerator."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_results_and_pictures_from_a_folder(setup):
    root, model, photos = setup
    output = root / "eval"
    result = evaluate(
        parse_evaluate_args(
            ["--model", str(root / "model"), "--validation_dir", str(photos), "--output_dir", str(output)]
            + ["--batch_size", "2", "--num_examples", "3", "--step", "7"]
        )
    )
    metrics = result.metrics
    assert read_eval_results(output) == metrics  # the model card machinery accepts the file as written
    assert json.loads((output / EVAL_RESULTS_FILE).read_text()) == metrics
    assert metrics["num_images"] == 5 and metrics["image_size"] == 32 and metrics["step"] == 7
    assert metrics["dataset_name"] == str(photos) and metrics["dataset_split"] == "validation"
    assert metrics["bits_per_image"] == pytest.approx(16 * np.log2(64000))
    assert 0 < metrics["used_codes"] <= 5 * 16 and metrics["rfid"] is None
    assert 1.0 <= metrics["perplexity"] <= metrics["used_codes"]
    assert metrics["color_error"] > 0 and metrics["bicubic_color_error"] >= 0  # what vqrae-evaluate prints too
    for name in (RECONSTRUCTIONS_FILE, CODEBOOK_USAGE_FILE):
        assert Image.open(output / name).format == "PNG"

    # The pictured originals are the centre squares of the photos at the model's resolution (the broken file is
    # skipped); the reconstructions are those of their tokens.
    # The pictured examples are spread over the split, so look the second one up among the photos' centre squares.
    assert len(result.originals) == len(result.reconstructions) == 3
    crops = []
    for i in range(5):
        photo = Image.open(photos / f"p{i}.png").convert("RGB")
        side = min(photo.size)
        left, top = (photo.width - side) // 2, (photo.height - side) // 2
        crops.append(photo.resize((32, 32), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side)))
    matches = [crop for crop in crops if np.array_equal(np.asarray(crop), np.asarray(result.originals[1]))]
    assert len(matches) == 1
    original = matches[0]
    pixel_values = model.get_image_processor()(images=[original], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        reconstruction = model.decode_from_indices(model.encode(pixel_values).indices).reconstruction
    np.testing.assert_array_equal(
        np.asarray(result.reconstructions[1]), np.asarray(to_pil_images(reconstruction, model)[0])
    )


def test_reproduces_the_eval_results_of_a_training_run(tmp_path):
    """vqrae-train a few steps on the tiny preset (built-in photos), then vqrae-evaluate its output folder on the
    same held-out photos: the same figures, to the last digit."""
    from conftest import TINY_VISION
    from vqrae.cli.train import parse_train_args
    from vqrae.training.trainer import train

    run = tmp_path / "run"
    sizes = [item for key, value in TINY_VISION.items() for item in (f"--{key}", str(value))]
    train(
        *parse_train_args(
            ["--config", "tiny_cpu", *sizes, "--decoder_intermediate_size", "37", "--output_dir", str(run)]
            + ["--max_steps", "3", "--per_device_train_batch_size", "4", "--warmup_steps", "1"]
            + ["--eval_steps", "100", "--save_steps", "100", "--max_eval_samples", "12", "--disable_tqdm"]
        )
    )
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    trained = json.loads((run / EVAL_RESULTS_FILE).read_text())
    assert trained["step"] == 3 and trained["num_images"] == 12

    output = tmp_path / "eval"
    argv = ["--model", str(run), "--output_dir", str(output), "--max_eval_samples", "12", "--step", "3"]
    assert evaluate(parse_evaluate_args([*argv, "--batch_size", "5"])).metrics == trained
    assert json.loads((output / EVAL_RESULTS_FILE).read_text()) == trained


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
        parse_evaluate_args(["--model", "unused", "--output_dir", str(tmp_path), *extra])


def test_num_crops_measures_codebook_use_over_random_crops_of_the_whole_images(setup):
    from vqrae.image_data import load_image_dataset
    from vqrae.image_decoding import decode_images
    from vqrae.training.metrics import codebook_use_on_crops
    from vqrae.training.model_card import render_model_card

    root, model, photos = setup
    output = root / "eval-crops"
    argv = ["--model", str(root / "model"), "--validation_dir", str(photos), "--output_dir", str(output)]
    metrics = evaluate(parse_evaluate_args([*argv, "--num_crops", "6"])).metrics
    use = metrics["crop_codebook_use"]
    assert use["crops"] == 6 and use["tokens"] == 6 * 16 and use["codebook_size"] == 64000
    # The same crops of the same whole photos (the broken file skipped) give the same count.
    dataset, column = load_image_dataset("validation", validation_dir=str(photos))
    images, unreadable = decode_images(dataset, column)
    assert len(images) == 5 and unreadable == 1 and images[0].size != (32, 32)
    assert codebook_use_on_crops(model, images, model.get_image_processor(), 6) == use
    assert read_eval_results(output)["crop_codebook_use"] == use
    save_model(model, output)
    card = str(render_model_card(output))
    row = f"over 6 random crops | {use['used_codes'] / 64000:.1%} ({use['used_codes']:,} codes over 96 tokens)"
    assert row in card
    assert (
        evaluate(parse_evaluate_args([*argv[:-1], str(root / "eval-no-crops")])).metrics["crop_codebook_use"] is None
    )
