"""Data: the built-in photos, image folders with odd and broken files, the resumable training stream."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_model
from vqrae.builtin_photos import (
    BUILTIN_COLOUR_DATASET_NAME,
    BUILTIN_COLOUR_IMAGES,
    BUILTIN_DATASET_NAME,
    BUILTIN_TRAIN_PHOTOS,
    BUILTIN_VALIDATION_PHOTOS,
    builtin_photos,
    validation_tiles,
)
from vqrae.errors import UsageError
from vqrae.image_data import load_image_dataset, load_validation_images, random_resized_crop_box
from vqrae.image_decoding import decode_image
from vqrae.training.args import DataArguments
from vqrae.training.data import StreamingTrainingBatches, TrainingBatches


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
    assert len(validation) >= 256  # tiles at three scales of the held-out photos
    held_out = {name.split("#")[0] for name in validation["photo"]}
    assert held_out == {filename.rsplit(".", 1)[0] for _, filename in BUILTIN_VALIDATION_PHOTOS}
    assert held_out.isdisjoint(train["photo"])
    image = train[0]["image"]
    assert image.mode == "RGB" and min(image.size) <= 384
    with pytest.raises(ValueError, match="splits 'train' and 'validation'"):
        builtin_photos("test")


def test_the_colour_dataset_adds_the_colour_images_to_training_only():
    photos, photos_column = load_image_dataset("train", dataset_name=BUILTIN_DATASET_NAME)
    colour, colour_column = load_image_dataset("train", dataset_name=BUILTIN_COLOUR_DATASET_NAME)
    added = [filename.rsplit(".", 1)[0] for _, filename in BUILTIN_COLOUR_IMAGES]
    assert list(colour["photo"]) == [*photos["photo"], *added] and colour_column == photos_column == "image"
    for value in colour.select(range(len(photos), len(colour)))["image"]:
        pixels = np.asarray(decode_image(value), dtype=np.int16)
        assert np.ptp(pixels[..., 0] - pixels[..., 1]) > 100  # colour, not grey
    validation = load_image_dataset("validation", dataset_name=BUILTIN_COLOUR_DATASET_NAME)[0]
    assert list(validation["photo"]) == list(builtin_photos("validation")["photo"])


def test_training_defaults_to_the_colour_dataset_and_a_named_source_is_kept():
    """With no data named, training uses the built-in photos with the colour images (the tiny preset); data named
    in any way is used as named, the plain built-in photos included."""
    assert DataArguments().dataset_name == BUILTIN_COLOUR_DATASET_NAME
    assert DataArguments(dataset_name=BUILTIN_DATASET_NAME).dataset_name == BUILTIN_DATASET_NAME
    assert DataArguments(train_dir="photos/").dataset_name is None


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


def _pixels(image):
    return np.asarray(image, dtype=np.float64) / 255


def test_crops_without_colour_augmentation_are_the_plain_crop_and_flip_of_seed_and_position():
    dataset, column = load_image_dataset("train")
    processor = tiny_model().get_image_processor()
    default = TrainingBatches(dataset, column, processor, batch_size=4, seed=3)
    none = TrainingBatches(dataset, column, processor, batch_size=4, seed=3, color_augment="none")
    for position in (0, 5, 17, 40):
        # What the stream drew before colour augmentation existed: the box, then the flip, from (seed, position).
        rng = np.random.default_rng((3, position))
        image = default._image(default._permutation(position // len(dataset))[position % len(dataset)])
        box = random_resized_crop_box(image.width, image.height, rng, scale=(0.08, 1.0))
        expected = image.resize((32, 32), int(processor.resample), box=box)
        if rng.random() < 0.5:
            expected = expected.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        assert np.asarray(default.example(position)).tobytes() == np.asarray(expected).tobytes()
        assert np.asarray(none.example(position)).tobytes() == np.asarray(expected).tobytes()


def test_colour_augmentation_is_a_function_of_seed_and_position_and_keeps_luma_or_values(processor):
    from skimage.color import rgb2yiq

    dataset, column = load_image_dataset("train")

    def stream(kind, seed=3):
        return TrainingBatches(dataset, column, processor, batch_size=4, seed=seed, color_augment=kind)

    plain, hue, permute = stream("none"), stream("hue"), stream("permute")
    hue_shifts = []
    for position in range(0, 48, 3):
        crop, recoloured, permuted = (_pixels(s.example(position)) for s in (plain, hue, permute))
        assert np.array_equal(recoloured, _pixels(stream("hue").example(position)))  # a fresh stream: same pixels
        assert np.array_equal(permuted, _pixels(stream("permute").example(position)))
        # hue: the same crop (its draws come after the box and flip), each pixel's luma kept up to clipping/rounding.
        luma = np.abs(rgb2yiq(recoloured)[..., 0] - rgb2yiq(crop)[..., 0])
        assert luma.max() <= 1.5 / 255
        if np.abs(rgb2yiq(crop)[..., 1:]).mean() > 0.03:  # grey photos (coins, moon, text) have no hue to turn
            hue_shifts.append(np.abs(recoloured - crop).mean())
        # permute: exactly the crop's channels in some order.
        assert any(np.array_equal(permuted, crop[..., list(order)]) for order in np.ndindex(3, 3, 3))
    assert len(hue_shifts) >= 4 and np.median(hue_shifts) > 0.02  # the colours did move
    assert not np.array_equal(_pixels(hue.example(3)), _pixels(hue.example(6)))
    assert not np.array_equal(_pixels(hue.example(3)), _pixels(stream("hue", seed=4).example(3)))


def test_an_unknown_colour_augmentation_is_refused_by_name(processor):
    dataset, column = load_image_dataset("train")
    with pytest.raises(
        UsageError, match=r"`color_augment` must be one of \['none', 'hue', 'permute'\] \(got 'sepia'\)"
    ):
        TrainingBatches(dataset, column, processor, batch_size=4, seed=0, color_augment="sepia")
    with pytest.raises(UsageError, match=r"`color_augment` must be one of .* \(got 'sepia'\)"):
        DataArguments(color_augment="sepia")


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


NUM_LABELLED = 10


def labelled_dataset(num_shards=None):
    """`NUM_LABELLED` images whose uniform red channel encodes their index, so any crop or flip of image `i` still
    says `i`, and whose green channel is noise, so different crops differ; undecoded, as `load_image_dataset` gives
    them. `num_shards`: as a streamed (iterable) dataset."""
    import datasets

    images = []
    for i in range(NUM_LABELLED):
        pixels = np.full((40, 48, 3), 10 + 20 * i, dtype=np.uint8)
        pixels[..., 1] = np.random.default_rng(i).integers(0, 256, (40, 48))
        images.append(Image.fromarray(pixels))
    dataset = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    dataset = dataset.cast_column("image", datasets.Image(decode=False))
    return dataset if num_shards is None else dataset.to_iterable_dataset(num_shards=num_shards)


def labels(batch, processor):
    """The index of the image each crop of a batch was cut from."""
    mean, std = processor.image_mean[0], processor.image_std[0]
    red = (batch["pixel_values"][:, 0] * std + mean) * 255
    assert (red.amax(dim=(1, 2)) - red.amin(dim=(1, 2))).max() < 0.5  # still uniform: the label is readable
    found = ((red.mean(dim=(1, 2)) - 10) / 20).round().long()
    assert ((found >= 0) & (found < NUM_LABELLED)).all()
    return found.tolist()


def test_processes_share_out_the_global_stream_over_a_whole_run(processor):
    dataset, num_processes, batch_size, micro_batches = labelled_dataset(), 3, 2, 10  # 60 positions, 6 epochs
    single = TrainingBatches(dataset, "image", processor, batch_size=batch_size * num_processes, seed=1)
    shards = [
        TrainingBatches(
            dataset, "image", processor, batch_size=batch_size, seed=1, process_index=r, num_processes=num_processes
        )  # fmt: skip
        for r in range(num_processes)
    ]
    positions = [[p for k in range(micro_batches) for p in shard.positions(k)] for shard in shards]
    assert sorted(p for process in positions for p in process) == list(range(micro_batches * len(single.positions(0))))
    stream = []
    for k in range(micro_batches):  # every micro-batch of the run: the processes' parts make up the global batch
        global_batch = single[k]
        assert torch.equal(torch.cat([shard[k]["pixel_values"] for shard in shards]), global_batch["pixel_values"])
        stream += labels(global_batch, processor)
    # Each epoch of the global stream holds every image exactly once, in a fresh order.
    epochs = [stream[i : i + NUM_LABELLED] for i in range(0, len(stream), NUM_LABELLED)]
    assert all(sorted(epoch) == list(range(NUM_LABELLED)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1


def note_pass_starts(batches: StreamingTrainingBatches) -> list[tuple[int, int]]:
    """`(epoch, examples read before it)` for each pass over the shard, noted as the stream starts it (the real
    `set_epoch` is still called)."""
    starts, set_epoch = [], batches.dataset.set_epoch

    def noting(epoch):
        starts.append((epoch, batches.examples_read))
        set_epoch(epoch)

    batches.dataset.set_epoch = noting
    return starts


@pytest.mark.parametrize("num_shards", [1, 6])  # one shard: split by example; six: whole shards per process
def test_streamed_processes_share_out_every_pass(processor, num_shards):
    dataset, num_processes, batch_size, batches = labelled_dataset(num_shards), 3, 2, 9  # 18 crops: 4 or more passes
    passes = []  # per process: the images of each of its complete passes, by epoch
    for r in range(num_processes):
        shard = StreamingTrainingBatches(dataset, "image", processor, batch_size=batch_size, seed=1, process_index=r,
                                         num_processes=num_processes, shuffle_buffer_size=4)  # fmt: skip
        starts, stream = note_pass_starts(shard), iter(shard)
        seen = [label for _ in range(batches) for label in labels(next(stream), processor)]
        assert [epoch for epoch, _ in starts] == list(range(len(starts)))
        bounds = [read for _, read in starts]
        passes.append([seen[begin:end] for begin, end in zip(bounds, bounds[1:])])
    complete = min(len(process) for process in passes)
    assert complete >= 3
    # (The images a process gets may change from pass to pass: `datasets` re-deals shards, or reshuffles before
    # splitting, at each epoch.) In every pass, the processes' images are disjoint and together are every image.
    for epoch in range(complete):
        together = [label for process in passes for label in process[epoch]]
        assert sorted(together) == list(range(NUM_LABELLED)), epoch
    # One process alone reads every image in each pass.
    single = StreamingTrainingBatches(dataset, "image", processor, batch_size=NUM_LABELLED, seed=1)
    assert all(sorted(labels(batch, processor)) == list(range(NUM_LABELLED)) for batch, _ in zip(single, range(3)))


def test_random_resized_crop_box_stays_inside_the_image():
    rng = np.random.default_rng(0)
    for width, height in [(10, 300), (300, 10), (64, 64), (1, 1)]:
        for _ in range(20):
            left, top, right, bottom = random_resized_crop_box(width, height, rng)
            assert 0 <= left < right <= width and 0 <= top < bottom <= height


@pytest.mark.parametrize("size", [(512, 384), (384, 384), (384, 577), (100, 64)])
def test_validation_tiles_cover_several_scales_and_overlap_at_most_half(size):
    width, height = size
    tiles = validation_tiles(width, height)
    sides = sorted({right - left for left, top, right, bottom in tiles}, reverse=True)
    assert sides == [int(min(size) * scale) for scale in (1.0, 0.5, 0.25)]
    boxes = np.array(tiles, dtype=float)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert all(right - left == bottom - top for left, top, right, bottom in tiles)
    overlap_w = np.clip(
        np.minimum(boxes[:, None, 2], boxes[None, :, 2]) - np.maximum(boxes[:, None, 0], boxes[None, :, 0]), 0, None
    )
    overlap_h = np.clip(
        np.minimum(boxes[:, None, 3], boxes[None, :, 3]) - np.maximum(boxes[:, None, 1], boxes[None, :, 1]), 0, None
    )
    intersection = overlap_w * overlap_h
    area = (boxes[:, 2] - boxes[:, 0]) ** 2
    share_of_larger = intersection / np.maximum(area[:, None], area[None, :])
    np.fill_diagonal(share_of_larger, 0)
    assert share_of_larger.max() <= 0.5  # no two tiles share more than half of the larger one
    same_side = area[:, None] == area[None, :]
    assert share_of_larger[same_side].max() <= 0.5  # tiles of one scale: at most half of either
    assert share_of_larger[same_side].max() > 0.2  # ... and neighbours do overlap (a grid at half strides)
    assert len(set(tiles)) == len(tiles)


@pytest.mark.parametrize("resample", [Image.Resampling.BICUBIC, Image.Resampling.BILINEAR])
def test_square_images_get_the_pixels_of_a_plain_resize(resample):
    """The training crops and the built-in validation tiles are square: the model's centre-cropping processor and
    `center_square` give them exactly the pixels a plain resize to the model's resolution gives (so centre
    cropping non-square photos leaves the default run's numerics as they were)."""
    from transformers import SiglipImageProcessorPil

    from vqrae.image_data import center_square

    processor = tiny_model(preprocessor_config={"resample": int(resample)}).get_image_processor()
    squeeze = SiglipImageProcessorPil(size={"height": 32, "width": 32}, resample=resample)
    rng = np.random.default_rng(0)
    for side in (32, 47, 100):
        image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        square = center_square(image, 32, resample)
        np.testing.assert_array_equal(np.asarray(square), np.asarray(image.resize((32, 32), resample)))
        for picture in (image, square):
            expected = squeeze(images=[picture], return_tensors="pt").pixel_values
            assert torch.equal(processor(images=[picture], return_tensors="pt").pixel_values, expected)
