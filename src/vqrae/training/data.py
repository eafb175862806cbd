"""The training streams of a VQRAE tokenizer: random resized crops, randomly flipped and (optionally) recoloured,
of `datasets` images, batched per process.

Every random choice of the training stream is a function of `(seed, position)`, where `position` counts the
examples of the global batch stream. The stream can therefore restart at any step (resuming a run) and gives the
same global batches with one or several processes. Decoding, crop boxes and the sources are the library's
(`vqrae.image_data`); `load_training_data` puts a run's together: its sources, held-out share, validation images
and training stream.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from PIL import Image
from skimage.color import rgb2yiq, yiq2rgb

from ..atomic_io import atomic_write
from ..builtin_photos import BUILTIN_DATASET_NAME, BUILTIN_DATASET_NAMES
from ..errors import MissingSplitError, UsageError
from ..image_data import (
    ValidationImages,
    dataset_identity,
    example_identities,
    hold_out,
    load_image_dataset,
    load_validation_images,
    processor_resample,
    processor_size,
    random_resized_crop_box,
    to_pixel_values,
)
from ..image_decoding import ImageDecodeCounter, try_decode
from .run_files import HELD_OUT_FILE

if TYPE_CHECKING:  # `args` imports this module (for `check_color_augment`)
    from .args import DataArguments, VQRAETrainingArguments

logger = logging.getLogger(__name__)

__all__ = [
    "COLOR_AUGMENTATIONS",
    "StreamingTrainingBatches",
    "TrainingBatches",
    "TrainingData",
    "check_color_augment",
    "color_augment",
    "load_training_data",
]

# Colour augmentations of the training crops. A few photos hold a narrow palette (the built-in ones: reds, oranges and
# greys), and a model trained on them alone pulls every colour toward it; recolouring the crops shows it other hues.
#   none     the crop as cut;
#   hue      the chroma rotated by a random angle in YIQ (scikit-image's rgb2yiq): every hue moves, the luma Y of
#            each pixel stays (up to rounding to 8 bits; a colour the rotation takes out of the RGB cube is desaturated
#            until it fits, rather than clipped);
#   permute  the RGB channels in a random order (exactly the same pixel values, reassigned).
COLOR_AUGMENTATIONS = ("none", "hue", "permute")

# ---------------------------------------------------------------------------------------------------------------
# Training stream
# ---------------------------------------------------------------------------------------------------------------


def check_color_augment(kind) -> None:
    """`UsageError` unless `kind` names one of `COLOR_AUGMENTATIONS`."""
    if kind not in COLOR_AUGMENTATIONS:
        raise UsageError(f"`color_augment` must be one of {list(COLOR_AUGMENTATIONS)} (got {kind!r}).")


def color_augment(crop: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """`crop` (8-bit RGB) recoloured by `kind` (one of `COLOR_AUGMENTATIONS`), with random draws from `rng` only
    (none for `"none"`, so a stream without augmentation draws exactly what it drew before the option existed)."""
    check_color_augment(kind)
    if kind == "none":
        return crop
    pixels = np.asarray(crop.convert("RGB"))
    if kind == "permute":
        return Image.fromarray(np.ascontiguousarray(pixels[..., rng.permutation(3)]))
    yiq = rgb2yiq(pixels / 255.0)
    angle = rng.uniform(0.0, 2 * np.pi)
    cos, sin = np.cos(angle), np.sin(angle)
    luma, i, q = yiq[..., 0:1], yiq[..., 1], yiq[..., 2]
    chroma = yiq2rgb(np.stack([np.zeros_like(i), cos * i - sin * q, sin * i + cos * q], axis=-1))
    # A rotated colour can leave the RGB cube; shrink its chroma (toward grey) just enough to stay inside, so that
    # the luma stays exact rather than clipped (yiq2rgb of (Y, 0, 0) is the grey (Y, Y, Y)).
    with np.errstate(divide="ignore", invalid="ignore"):
        room = np.where(chroma > 0, (1 - luma) / chroma, np.where(chroma < 0, -luma / chroma, np.inf))
    shrink = np.clip(room.min(axis=-1, keepdims=True), 0.0, 1.0)
    rgb = (luma + shrink * chroma).clip(0.0, 1.0)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def _train_crop(
    image: Image.Image, image_size: int, rng: np.random.Generator, scale, flip: bool, resample: int, color: str
):
    box = random_resized_crop_box(image.width, image.height, rng, scale=scale)
    crop = image.resize((image_size, image_size), resample, box=box)
    if flip and rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return color_augment(crop, color, rng)  # drawn after the crop's and the flip's draws: those stay as they were


class _TrainingCrops:
    """What both training streams share: the crop settings, the image processor and the count of unreadable
    images."""

    def __init__(
        self,
        image_column: str,
        image_processor,
        *,
        batch_size: int,
        seed: int,
        image_size: int | None = None,
        process_index: int = 0,
        num_processes: int = 1,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        random_flip: bool = True,
        color_augment: str = "none",
    ):
        check_color_augment(color_augment)
        self.image_column = image_column
        self.image_processor = image_processor
        self.image_size = processor_size(image_processor, image_size)
        self.resample = processor_resample(image_processor)
        self.batch_size = batch_size
        self.seed = seed
        self.process_index = process_index
        self.num_processes = num_processes
        self.crop_scale = tuple(crop_scale)
        self.random_flip = random_flip
        self.color_augment = color_augment
        self.counter = ImageDecodeCounter()

    def crop(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        """A random resized crop of `image`, `image_size` square, randomly flipped and recoloured."""
        return _train_crop(
            image, self.image_size, rng, self.crop_scale, self.random_flip, self.resample, self.color_augment
        )

    def pixel_values(self, crops: list[Image.Image]) -> dict[str, torch.Tensor]:
        """The batch: `pixel_values`, and `unreadable`, the names of the images this copy of the stream found
        unreadable since its last batch (so the trainer counts each image once over workers, epochs and processes)."""
        return {
            "pixel_values": to_pixel_values(self.image_processor, crops),
            "unreadable": self.counter.take_new_failures(),
        }


class TrainingBatches(_TrainingCrops, torch.utils.data.Dataset):
    """Training batches of one process, from a map-style dataset; item `k` is the `k`-th micro-batch.

    The global stream is an endless sequence of positions `0, 1, 2, ...`; position `p` is example
    `perm_e[p mod n]` of epoch `e = p // n` (`perm_e` a permutation seeded by `(seed, e)`), cropped, flipped and
    recoloured with a generator seeded by `(seed, p)`. Micro-batch `k` of process `r` (of `W`) holds the positions
    `k * B * W + r * B + [0, B)`, so all processes together see exactly the global batch a single process with
    batch `B * W` would see. An unreadable image is replaced by the next one of the permutation (and counted).

    Use it with `torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(start, end))`.
    """

    def __init__(self, dataset, image_column: str, image_processor, *, cache_images: bool | None = None, **crops):
        if len(dataset) == 0:
            raise UsageError("The training dataset is empty: there are no images to train on.")
        super().__init__(image_column, image_processor, **crops)
        self.dataset = dataset
        # Small datasets (the built-in photos) are decoded once and kept: decoding is most of the data cost.
        self.cache_images = len(dataset) <= 256 if cache_images is None else cache_images
        self._cache: dict[int, Image.Image | None] = {}
        self._permutations: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        # The stream is endless; a sampler decides which micro-batches are drawn.
        return 2**62

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) > 2:
                self._permutations.clear()
            rng = np.random.default_rng((self.seed, epoch, 0x5EED))
            self._permutations[epoch] = rng.permutation(len(self.dataset))
        return self._permutations[epoch]

    def _image(self, index: int) -> Image.Image | None:
        if index in self._cache:
            return self._cache[index]
        image = try_decode(self.dataset[int(index)][self.image_column], self.counter)
        if self.cache_images:
            self._cache[index] = image
        return image

    def example(self, position: int) -> Image.Image:
        """The training crop at global `position` (a PIL image of `image_size` x `image_size`)."""
        n = len(self.dataset)
        epoch, offset = divmod(position, n)
        permutation = self._permutation(epoch)
        for attempt in range(n):
            image = self._image(permutation[(offset + attempt) % n])
            if image is not None:
                return self.crop(image, np.random.default_rng((self.seed, position)))
        raise UsageError(f"None of the {n} training images can be read ({self.counter.examples[:3]}).")

    def positions(self, micro_batch: int) -> range:
        start = micro_batch * self.batch_size * self.num_processes + self.process_index * self.batch_size
        return range(start, start + self.batch_size)

    def __getitem__(self, micro_batch: int) -> dict[str, torch.Tensor]:
        return self.pixel_values([self.example(position) for position in self.positions(micro_batch)])


class StreamingTrainingBatches(_TrainingCrops, torch.utils.data.IterableDataset):
    """Training batches of one process from a streamed (`IterableDataset`) source.

    Each process reads its own shard (`datasets.distributed.split_dataset_by_node`), shuffled with a buffer and
    reshuffled every pass. `start_example` examples of the shard are skipped first (resuming); crops are seeded by
    `(seed, process, example number)`. Unreadable images are skipped and counted.
    """

    def __init__(self, dataset, image_column: str, image_processor, *, shuffle_buffer_size: int = 1000, **crops):
        super().__init__(image_column, image_processor, **crops)
        shard = split_dataset_by_node(dataset, rank=self.process_index, world_size=self.num_processes)
        self.dataset = (
            shard.shuffle(seed=self.seed, buffer_size=shuffle_buffer_size) if shuffle_buffer_size > 1 else shard
        )
        self.start_example = 0
        self.examples_read = 0

    def _examples(self) -> Iterator[tuple[int, object]]:
        position, epoch = 0, 0
        while True:
            self.dataset.set_epoch(epoch)
            empty = True
            for example in self.dataset:
                empty = False
                yield position, example[self.image_column]
                position += 1
            if empty:
                raise UsageError("The streamed training dataset is empty on this process: there are no images.")
            epoch += 1

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        crops = []
        for position, value in self._examples():
            if position < self.start_example:
                continue  # resuming: these examples were used before the checkpoint
            self.examples_read = position + 1
            image = try_decode(value, self.counter)
            if image is None:
                continue
            crops.append(self.crop(image, np.random.default_rng((self.seed, self.process_index, position))))
            if len(crops) == self.batch_size:
                yield self.pixel_values(crops)
                crops = []


# ---------------------------------------------------------------------------------------------------------------
# Loading a run's data
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """The training stream of this process, its validation share, and the identity of the training data."""

    batches: TrainingBatches | StreamingTrainingBatches
    validation: ValidationImages
    identity: dict


def _load_splits(data_args: DataArguments):
    """`(train, column), (validation, column), dataset name, validation split, held-out info or None)`."""
    common = {
        **data_args.source_kwargs(),
        "train_dir": data_args.train_dir,
        "validation_dir": data_args.validation_dir,
        "cache_dir": data_args.cache_dir,
    }
    builtin = data_args.train_dir is None and data_args.dataset_name in (None, *BUILTIN_DATASET_NAMES)
    train_split = "train" if builtin or data_args.train_dir else data_args.train_split
    train, column = load_image_dataset(train_split, **common)
    name = data_args.train_dir or data_args.dataset_name or BUILTIN_DATASET_NAME
    if data_args.train_dir is not None and data_args.validation_dir is None:
        missing = f"`train_dir` {data_args.train_dir!r} comes with no --validation_dir"
    else:
        validation_split = "validation" if builtin or data_args.train_dir else data_args.validation_split
        try:
            validation = load_image_dataset(validation_split, **common)
            # The built-in sources share one validation split, that of `builtin:photos`: named so, the figures
            # are those `vqrae-evaluate` writes for it, to the label.
            label = data_args.validation_dir or (BUILTIN_DATASET_NAME if builtin else name)
            return (train, column), validation, label, validation_split, None
        except MissingSplitError:
            missing = f"{name!r} has no {validation_split!r} split"
    if not data_args.validation_split_percentage:
        raise UsageError(
            f"{missing}, and --validation_split_percentage is 0: pass a validation split or folder, or a share of "
            "the training images to hold out (e.g. --validation_split_percentage 5)."
        )
    train, held, info = hold_out(train, data_args.validation_split_percentage, column, root=_source_folder(data_args))
    logger.info(
        "%s: holding out %s%% of the %s training images for validation (%s), each chosen by a hash of its name; "
        "their names are in %s.",
        missing,
        f"{info['percentage']:g}",
        info["of"] if info["of"] is not None else "streamed",
        f"{info['num_examples']} image(s)" if info["num_examples"] is not None else "about that share",
        HELD_OUT_FILE,
    )
    return (train, column), (held, column), name, train_split, info


def _source_folder(data_args: DataArguments) -> str | None:
    """The local folder the training images come from (held-out names are relative to it), or None."""
    if data_args.train_dir is not None:
        return data_args.train_dir
    name = data_args.dataset_name
    return name if name is not None and os.path.isdir(name) else None


def _write_held_out_ids(data_args: DataArguments, held, column: str, output_dir: str) -> None:
    """Write the names (`example_identity`) of the held-out examples into `HELD_OUT_FILE`, one a line, so a user can
    check them: all of them for a map-style dataset, the first --max_eval_samples (those evaluated) for a stream."""
    limit = data_args.max_eval_samples if data_args.streaming else None
    ids = example_identities(held, column, _source_folder(data_args), limit)
    atomic_write(os.path.join(output_dir, HELD_OUT_FILE), "".join(f"{identity}\n" for identity in ids))


def load_training_data(
    data_args: DataArguments, args: VQRAETrainingArguments, image_processor, image_size: int, accelerator
) -> TrainingData:
    """The training batches of this process and its share of the validation images (read before training starts,
    so a validation set that cannot be read fails now, not after training)."""
    (train, column), (validation_data, validation_column), name, split, held_out = _load_splits(data_args)
    if data_args.max_train_samples is not None:
        train = (
            train.take(data_args.max_train_samples)
            if data_args.streaming
            else train.select(range(min(data_args.max_train_samples, len(train))))
        )
    validation = load_validation_images(
        validation_data,
        validation_column,
        image_size,
        dataset_name=name,
        dataset_split=split,
        max_samples=data_args.max_eval_samples,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
        resample=int(image_processor.resample),
        held_out=held_out,
    )
    if held_out is not None and accelerator.is_main_process:
        _write_held_out_ids(data_args, validation_data, validation_column, args.output_dir)
    readable = accelerator.reduce(torch.tensor(len(validation.images), device=accelerator.device), "sum")
    if int(readable) == 0:
        raise UsageError(
            f"None of the validation images of {name!r} (split {split!r}) can be read ({validation.num_unreadable} "
            "unreadable on this process); fix them or choose other validation data before training."
        )
    stream = {
        "batch_size": args.per_device_train_batch_size,
        "seed": args.seed,
        "image_size": image_size,
        "process_index": accelerator.process_index,
        "num_processes": accelerator.num_processes,
        "crop_scale": (data_args.min_crop_scale, 1.0),
        "random_flip": data_args.random_flip,
        "color_augment": data_args.color_augment,
    }
    if data_args.streaming:
        shuffle = data_args.shuffle_buffer_size
        batches = StreamingTrainingBatches(train, column, image_processor, shuffle_buffer_size=shuffle, **stream)
    else:
        batches = TrainingBatches(train, column, image_processor, **stream)
    identity = dataset_identity(
        train,
        source=name,
        config=data_args.dataset_config_name,
        data_files=data_args.data_files or None,
        revision=data_args.dataset_revision,
        split=split,
        held_out_percentage=held_out and held_out["percentage"],
        max_train_samples=data_args.max_train_samples,
    )
    return TrainingData(batches=batches, validation=validation, identity=identity)


def batch_iterator(data: TrainingData, args, num_workers: int, start_step: int):
    """Micro-batches from `start_step` on: map-style data by micro-batch number (a sampler over the steps left of
    `args.max_steps`, times `args.gradient_accumulation_steps`), a stream from its saved position. A stream is read
    in the main process: its resume position (`examples_read`) is counted on this copy of it.

    Starting an iterator draws its workers' base seed from torch's global generator, which the model's own random
    draws (FSQ noise) also use. A resumed run starts its iterator after restoring the generator, an uninterrupted
    one long before that step: the draw is kept off the global generator, so both take the same noise."""
    if isinstance(data.batches, StreamingTrainingBatches):
        loader = torch.utils.data.DataLoader(data.batches, batch_size=None)
    else:
        accumulation = args.gradient_accumulation_steps
        sampler = range(start_step * accumulation, args.max_steps * accumulation)
        loader = torch.utils.data.DataLoader(data.batches, batch_size=None, sampler=sampler, num_workers=num_workers)
    with torch.random.fork_rng(devices=[]):
        return iter(loader)
