"""Data: the built-in photos, image folders with odd and broken files, the resumable training stream."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_model
from vqrae.training.data import (
    BUILTIN_DATASET_NAME,
    BUILTIN_TRAIN_PHOTOS,
    BUILTIN_VALIDATION_PHOTOS,
    StreamingTrainingBatches,
    TrainingBatches,
    builtin_photos,
    load_image_dataset,
    load_validation_images,
    random_resized_crop_box,
)


@pytest.fixture(scope="module")
def processor():
    return tiny_model().get_image_processor()


def _photo(seed, size=(48, 40), mode="RGB"):
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    return Image.fromarray(array, mode="RGBA").convert(mode)


@pytest.fixture
def image_folder(tmp_path):
    """A train folder with RGB, grayscale, RGBA, palette and 16-bit images and one broken file."""
    train = tmp_path / "train"
    train.mkdir()
    _photo(0).save(train / "rgb.png")
    _photo(1, mode="L").save(train / "gray.png")
    _photo(2, mode="RGBA").save(train / "rgba.png")
    _photo(3, mode="P").save(train / "palette.png")
    Image.fromarray(np.full((40, 48), 40000, dtype=np.uint16)).save(train / "deep.png")
    (train / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    validation = tmp_path / "validation"
    validation.mkdir()
    for i in range(3):
        _photo(10 + i, size=(60, 36)).save(validation / f"v{i}.jpg")
    (validation / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return train, validation


def test_builtin_photos_are_split_by_photo():
    train, validation = builtin_photos("train"), builtin_photos("validation")
    assert len(train) == len(BUILTIN_TRAIN_PHOTOS)
    assert len(validation) == 5 * len(BUILTIN_VALIDATION_PHOTOS)  # five fixed windows per held-out photo
    held_out = {name.split("#")[0] for name in validation["photo"]}
    assert held_out == {filename.rsplit(".", 1)[0] for _, filename in BUILTIN_VALIDATION_PHOTOS}
    assert held_out.isdisjoint(train["photo"])
    image = train[0]["image"]
    assert image.mode == "RGB" and min(image.size) <= 384
    with pytest.raises(ValueError, match="splits 'train' and 'validation'"):
        builtin_photos("test")


def test_image_folder_converts_modes_and_skips_broken_files(image_folder, processor):
    train_dir, validation_dir = image_folder
    dataset, column = load_image_dataset("train", train_dir=str(train_dir), validation_dir=str(validation_dir))
    assert len(dataset) == 6 and column == "image"
    batches = TrainingBatches(dataset, column, processor, batch_size=12, seed=0)
    pixel_values = batches[0]["pixel_values"]
    assert pixel_values.shape == (12, 3, 32, 32)
    assert pixel_values.min() >= -1 and pixel_values.max() <= 1
    assert batches.counter.unreadable >= 1 and "broken.png" in batches.counter.examples[0]

    validation, column = load_image_dataset("validation", train_dir=str(train_dir), validation_dir=str(validation_dir))
    images = load_validation_images(validation, column, 32, dataset_name="folder", dataset_split="validation")
    assert len(images.images) == 3 and images.num_unreadable == 1
    assert all(image.size == (32, 32) and image.mode == "RGB" for image in images.images)


def test_bad_sources_give_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no images|is empty"):
        load_image_dataset("train", train_dir=str(empty))
    with pytest.raises(ValueError, match="not a folder"):
        load_image_dataset("train", train_dir=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="needs --validation_dir"):
        load_image_dataset("validation", train_dir=str(empty))
    with pytest.raises(ValueError, match="`image_column` 'pixels' is not a column"):
        load_image_dataset("train", dataset_name=BUILTIN_DATASET_NAME, image_column="pixels")


def test_training_stream_is_a_function_of_seed_and_position(processor):
    dataset, column = load_image_dataset("train")
    single = TrainingBatches(dataset, column, processor, batch_size=6, seed=3)
    first = single[2]["pixel_values"]
    assert torch.equal(first, TrainingBatches(dataset, column, processor, batch_size=6, seed=3)[2]["pixel_values"])
    assert not torch.equal(first, single[3]["pixel_values"])
    assert not torch.equal(first, TrainingBatches(dataset, column, processor, batch_size=6, seed=4)[2]["pixel_values"])
    # Two processes with half the batch see exactly the single process's global batch.
    halves = [
        TrainingBatches(dataset, column, processor, batch_size=3, seed=3, process_index=r, num_processes=2)[2]
        for r in range(2)
    ]
    assert torch.equal(torch.cat([half["pixel_values"] for half in halves]), first)


def test_streaming_shards_across_processes_and_skips_consumed_examples(processor):
    dataset, column = load_image_dataset("train", streaming=True)
    dataset = dataset.to_iterable_dataset() if hasattr(dataset, "to_iterable_dataset") else dataset
    shards = [
        StreamingTrainingBatches(
            dataset, column, processor, batch_size=2, seed=0, process_index=r, num_processes=2, shuffle_buffer_size=4
        )
        for r in range(2)
    ]
    batches = [next(iter(shard))["pixel_values"] for shard in shards]
    assert batches[0].shape == (2, 3, 32, 32) and not torch.equal(batches[0], batches[1])
    resumed = StreamingTrainingBatches(dataset, column, processor, batch_size=2, seed=0, shuffle_buffer_size=4)
    stream = iter(resumed)
    next(stream)
    second = next(stream)["pixel_values"]
    resumed.start_example = 2
    assert torch.equal(next(iter(resumed))["pixel_values"], second)


def test_random_resized_crop_box_stays_inside_the_image():
    rng = np.random.default_rng(0)
    for width, height in [(10, 300), (300, 10), (64, 64), (1, 1)]:
        for _ in range(20):
            left, top, right, bottom = random_resized_crop_box(width, height, rng)
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
