"""Images for a VQRAE tokenizer, loaded with `datasets`: crop boxes, the image processor's size and filter, the
sources, held-out shares, and the fixed validation crops.

Sources (see `load_image_dataset`):

- the built-in photographs (`vqrae.builtin_photos`), split by photo into training and validation photos;
- a Hub dataset (`dataset_name`, `dataset_config_name`, a split, an image column), optionally streamed;
- local folders of images (`train_dir` / `validation_dir`, through the `imagefolder` builder).

Validation images are fixed centre crops, prepared with the model's image processor's filter. Decoding to RGB and
the counting of unreadable images are `vqrae.image_decoding`'s. Training streams (random crops) live in
`vqrae.training.data`; tokenizing and evaluating use this module.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from PIL import Image
from transformers import SiglipImageProcessorPil

from .builtin_photos import BUILTIN_COLOUR_DATASET_NAME, BUILTIN_DATASET_NAME, BUILTIN_DATASET_NAMES, builtin_photos
from .errors import MissingSplitError, UsageError
from .image_decoding import ImageDecodeCounter, expand_braces, image_name, try_decode
from .modeling_vqrae import center_crop_settings

__all__ = [
    "HOLD_OUT_SEED",
    "ID_COLUMNS",
    "ValidationImages",
    "center_square",
    "dataset_identity",
    "example_identities",
    "example_identity",
    "hold_out",
    "id_column",
    "load_image_dataset",
    "load_validation_images",
    "processor_resample",
    "processor_size",
    "random_resized_crop_box",
    "resolve_image_column",
    "to_pixel_values",
]

# ---------------------------------------------------------------------------------------------------------------
# Crops
# ---------------------------------------------------------------------------------------------------------------


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """A crop box `(left, top, right, bottom)` covering a random share `scale` of the image's area with a random
    aspect ratio in `ratio` (the Inception-style crop of torchvision's `RandomResizedCrop`, same algorithm)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left = int(rng.integers(0, width - crop_w + 1))
            top = int(rng.integers(0, height - crop_h + 1))
            return left, top, left + crop_w, top + crop_h
    # Fallback: the central crop with the ratio clamped to the allowed range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_w, crop_h = int(round(height * ratio[1])), height
    else:
        crop_w, crop_h = width, height
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return left, top, left + crop_w, top + crop_h


def center_square(image: Image.Image, image_size: int, resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """The largest centred square of `image` at `image_size` px, cut by the model's image processor's own code with
    its crop (`vqrae.modeling_vqrae.center_crop_settings`): `vqrae-tokenize`, `vqrae-evaluate`, the training's
    validation images and `AutoImageProcessor.from_pretrained(model folder)` give the same pixels."""
    crop = SiglipImageProcessorPil(
        **center_crop_settings(image_size), resample=resample, do_rescale=False, do_normalize=False
    )
    array = crop(images=[image], return_tensors="np")["pixel_values"][0]  # (3, S, S) uint8
    return Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)), mode="RGB")


def processor_resample(image_processor) -> int:
    """The PIL filter the image processor resizes with (bicubic when it names none)."""
    resample = getattr(image_processor, "resample", None)
    return int(resample) if resample is not None else int(Image.Resampling.BICUBIC)


def processor_size(image_processor, image_size: int | None = None) -> int:
    """The side the image processor resizes to (`image_size` when given)."""
    if image_size is not None:
        return image_size
    size = getattr(image_processor, "size", None) or {}
    side = size.get("height") or size.get("shortest_edge")
    if not side:
        raise ValueError(f"Cannot read the image size from the image processor (size={size!r}); pass `image_size`.")
    return int(side)


def to_pixel_values(image_processor, images: list[Image.Image]) -> torch.Tensor:
    """`pixel_values` `(B, C, H, W)` float32 of RGB images, through the model's image processor. Refused when not
    finite (an image processor whose `image_std` holds a 0): checked here, on the CPU, so that training need not
    check each batch again on the accelerator (a host sync per step)."""
    pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"].float()
    if not torch.isfinite(pixel_values).all():
        raise ValueError(
            f"The image processor made NaN or infinite `pixel_values` (image_mean {image_processor.image_mean}, "
            f"image_std {image_processor.image_std}; every image_std must be > 0)."
        )
    return pixel_values


# ---------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------


def resolve_image_column(dataset, image_column: str | None) -> str:
    """The name of the image column: `image_column` if given, else the only `Image` column, else `image`. The column
    must exist and hold images (an `Image` feature, bytes, or paths to files); anything else is refused, naming the
    columns that do hold images."""
    features = dataset.features
    columns = list(features) if features is not None else list(getattr(dataset, "column_names", None) or [])
    first = None
    if not columns and isinstance(dataset, datasets.IterableDataset):  # a stream of unknown features: peek at it
        first = next(iter(dataset), None) or {}
        columns = list(first)
    image_columns = [name for name, feature in (features or {}).items() if isinstance(feature, datasets.Image)]
    if image_column is not None and columns and image_column not in columns:
        raise UsageError(f"`image_column` {image_column!r} is not a column of the dataset (columns: {columns}).")
    column = image_column or (image_columns[0] if len(image_columns) == 1 else "image" if "image" in columns else None)
    if column is None:
        raise UsageError(
            f"Cannot tell which column holds the images: the dataset has the columns {columns}, of which Image "
            f"columns: {image_columns}; pass --image_column with the one that holds the images."
        )
    feature = (features or {}).get(column)
    if feature is None or isinstance(feature, datasets.Image):
        return column
    if isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary"):
        return column
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        value = _first_value(dataset, column) if first is None else first.get(column)
        if value is None or os.path.isfile(value):  # paths to image files
            return column
        feature = f"{feature} (e.g. {value[:40]!r}, not a file)"
    hint = (
        "pass --image_column with one of them"
        if image_columns
        else "pass --image_column with a column of images, image bytes or paths"
    )
    raise UsageError(
        f"`image_column` {column!r} is not an image column: it holds {feature}; the columns that hold images: "
        f"{image_columns} (columns: {columns}); {hint}."
    )


def _first_value(dataset, column: str):
    """The first value of `column` (None when the dataset is empty)."""
    if hasattr(dataset, "__len__"):
        return dataset[0][column] if len(dataset) else None
    return next(iter(dataset.select_columns([column])), {}).get(column)


def load_image_dataset(
    split: str,
    *,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    data_files: list[str] | None = None,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    image_column: str | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
    revision: str | None = None,
    split_option: str = "--split",
):
    """Load one split of images as a `datasets` dataset whose image column is left undecoded
    (`{"bytes", "path"}` values), so unreadable images can be skipped rather than crash the run.

    Which source: `train_dir`/`validation_dir` (local image folders, `imagefolder`) when given, else
    `dataset_name` (`None` or `BUILTIN_DATASET_NAME`: the built-in photos; a folder written by `save_to_disk`: read
    with `datasets.load_from_disk`; anything else: a Hub dataset or a local dataset folder). For folders,
    `split="train"` reads `train_dir` and any other split reads `validation_dir`. `split_option` is how the caller's
    command line chooses a split (named when the split is missing). `data_files` (brace-expanded, see
    `expand_braces`) go to `datasets.load_dataset` with a named dataset or builder (`webdataset`, `parquet`, ...):
    a flat list makes its `train` split.

    Returns `(dataset, image_column)`. Raises `ValueError` for an unknown split, a missing image column or an
    empty dataset.
    """
    named = not (train_dir or validation_dir or dataset_name in (None, *BUILTIN_DATASET_NAMES))
    if data_files and not (named and not _saved_to_disk(dataset_name)):
        raise UsageError(
            f"`data_files` {list(data_files)} needs a `dataset_name` that datasets loads them with (e.g. webdataset, "
            f"parquet, imagefolder; got dataset_name={dataset_name!r}, train_dir={train_dir!r})."
        )
    if train_dir is not None or validation_dir is not None:
        folder = train_dir if split == "train" else validation_dir
        dataset, source = _load_image_folder(folder, split, streaming, cache_dir), folder
    elif dataset_name is None or dataset_name in BUILTIN_DATASET_NAMES:
        dataset = builtin_photos(split, colour=dataset_name == BUILTIN_COLOUR_DATASET_NAME)
        if streaming:
            dataset = dataset.to_iterable_dataset(num_shards=1)
        source = dataset_name or BUILTIN_DATASET_NAME
    elif _saved_to_disk(dataset_name):
        dataset = _load_saved_split(dataset_name, split, split_option)
        if streaming:
            dataset = dataset.to_iterable_dataset()
        source = dataset_name
    else:
        load = {"split": split, "streaming": streaming, "cache_dir": cache_dir, "revision": revision}
        if data_files:
            load["data_files"] = [name for pattern in data_files for name in expand_braces(pattern)]
        dataset, source = _load_named_dataset(dataset_name, dataset_config_name, split_option, **load), dataset_name

    column = resolve_image_column(dataset, image_column)
    if isinstance(dataset, datasets.Dataset) and len(dataset) == 0:
        raise UsageError(f"The {split!r} split of {source!r} is empty: there are no images to use.")
    features = dataset.features
    if features is not None and isinstance(features.get(column), datasets.Image):
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset, column


def _load_image_folder(folder: str | None, split: str, streaming: bool, cache_dir: str | None):
    """A local folder of images (`imagefolder`) as one split: `--train_dir` for `train`, else `--validation_dir`."""
    option = "--train_dir" if split == "train" else "--validation_dir"
    if folder is None:
        raise UsageError(f"Loading the {split!r} split from local folders needs {option}.")
    if not os.path.isdir(folder):
        name = option.lstrip("-")
        raise UsageError(f"`{name}` must be a folder of images (got {folder!r}, which is not a folder).")
    try:
        return datasets.load_dataset(
            "imagefolder", data_dir=folder, split="train", streaming=streaming, cache_dir=cache_dir
        )
    except (FileNotFoundError, datasets.exceptions.DataFilesNotFoundError, ValueError) as error:
        # A folder of only non-image files gives datasets' 'Instruction "train" corresponds to no data!'.
        if isinstance(error, ValueError) and "corresponds to no data" not in str(error):
            raise
        raise UsageError(f"`{option.lstrip('-')}` {folder!r} holds no images ({error}).") from error


def _load_named_dataset(dataset_name: str, dataset_config_name: str | None, split_option: str, **load):
    """A Hub dataset or a local dataset folder, through `datasets.load_dataset` (`load`: its split, streaming,
    cache_dir and revision)."""
    try:
        return datasets.load_dataset(dataset_name, dataset_config_name, **load)
    except ValueError as error:
        if "split" not in str(error).lower():
            raise
        missing = f"{dataset_name!r} has no split {load['split']!r} ({error}); choose one with {split_option}."
        raise MissingSplitError(missing) from error
    except (FileNotFoundError, ConnectionError) as error:
        # datasets' DatasetNotFoundError is a FileNotFoundError; offline, a Hub id not in the cache is a
        # ConnectionError.
        if load.get("data_files"):
            raise UsageError(f"`data_files` of {dataset_name!r} could not be loaded ({error}).") from error
        where = "a folder here" if not os.path.exists(dataset_name) else "a dataset folder datasets can read"
        raise UsageError(
            f"`dataset_name` {dataset_name!r} is not {where} and could not be loaded from the Hub ({error})."
        ) from error


def _saved_to_disk(folder: str) -> bool:
    """Whether `folder` was written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    names = (datasets.config.DATASET_STATE_JSON_FILENAME, datasets.config.DATASETDICT_JSON_FILENAME)
    return os.path.isdir(folder) and any(os.path.isfile(os.path.join(folder, name)) for name in names)


def _load_saved_split(folder: str, split: str, split_option: str):
    """Split `split` (a slice such as `train[:10]` too) of a folder written by `save_to_disk`. A saved `Dataset` is
    one split, named by its own `split` (`train` when it has none)."""
    saved = datasets.load_from_disk(folder)
    splits = {str(saved.split or "train"): saved} if isinstance(saved, datasets.Dataset) else dict(saved)
    try:
        instructions = datasets.ReadInstruction.from_spec(split).to_absolute(
            {name: len(dataset) for name, dataset in splits.items()}
        )
    except (ValueError, KeyError) as error:
        raise MissingSplitError(
            f"{folder!r} (saved with save_to_disk) has no split {split!r} (splits: {sorted(splits)}); choose one with "
            f"{split_option}."
        ) from error
    parts = [splits[part.splitname].select(range(part.from_, part.to)) for part in instructions]
    whole = len(parts) == 1 and len(parts[0]) == len(splits[instructions[0].splitname])
    return splits[instructions[0].splitname] if whole else datasets.concatenate_datasets(parts)


# The held-out share does not depend on `--seed`, so runs with other seeds are evaluated on the same images. It salts
# the hash that puts each example on its side.
HOLD_OUT_SEED = 0x5EED_0DD5

# Columns that name an example in a `datasets` dataset, looked for in this order (see `example_identity`).
ID_COLUMNS = ("id", "image_id")


def id_column(dataset) -> str | None:
    """The dataset's id column (the first of `ID_COLUMNS` it has), or None."""
    columns = dataset.column_names or []
    return next((name for name in ID_COLUMNS if name in columns), None)


def example_identity(row: dict, image_column: str, *, id_name: str | None = None, root: str | None = None) -> str:
    """What names an example whatever else is in the data: its id (`row[id_name]`, the dataset's id column), else
    `image_name` of its image (`row[image_column]`, undecoded)."""
    if id_name is not None and row.get(id_name) is not None:
        return str(row[id_name])
    return image_name(row[image_column], root, image_column)


def _hold_out_fraction(identity: str) -> float:
    """A number in [0, 1) fixed by the example's identity alone (and `HOLD_OUT_SEED`): its place in the hold-out."""
    digest = hashlib.sha256(f"{HOLD_OUT_SEED}:{identity}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def example_identities(dataset, image_column: str, root: str | None = None, max_samples: int | None = None):
    """The identity (`example_identity`) of each example of `dataset`, in order (the first `max_samples` of them
    when given), read without decoding any image."""
    id_name = id_column(dataset)
    source = dataset.select_columns([image_column] + ([id_name] if id_name else []))
    if max_samples is not None:
        source = (
            source.take(max_samples)
            if not hasattr(source, "__len__")
            else source.select(range(min(max_samples, len(source))))
        )
    return [example_identity(row, image_column, id_name=id_name, root=root) for row in source]


def hold_out(dataset, percentage: float, image_column: str, root: str | None = None):
    """Split `dataset` into `(train, validation, info)`, holding out about `percentage` % of its examples.

    Each example's side is fixed by a hash of its identity (`example_identity`: its id column, else its file's path
    relative to `root`, the folder, else its image's bytes) salted with `HOLD_OUT_SEED`: the same whatever
    `--seed`, the number of processes, shards or shuffling, and no example changes side when others are added or
    removed. An example is held out when its hash falls in the lowest `percentage` %, so the share holds in
    expectation. A map-style dataset in which no example falls there holds out the one with the lowest hash (so small
    sets keep one validation image; it moves to training only if an added image takes its place), and one where
    every example falls there is refused. Both parts keep the dataset's order. `info` says what was held out (for
    the log and `eval_results.json`): `{"percentage", "num_examples", "of"}` (`None` counts for a stream).
    """
    if not 0 < percentage < 100:
        raise UsageError(f"`validation_split_percentage` must be a number in (0, 100) (got {percentage!r}).")
    threshold = percentage / 100
    info = {"percentage": float(percentage), "num_examples": None, "of": None}
    if isinstance(dataset, datasets.IterableDataset):
        # Filtered by identity on each example, before any sharding or shuffling, so both sides agree everywhere.
        id_name = id_column(dataset)

        def is_held_out(row) -> bool:
            identity = example_identity(row, image_column, id_name=id_name, root=root)
            return _hold_out_fraction(identity) < threshold

        return dataset.filter(lambda row: not is_held_out(row)), dataset.filter(is_held_out), info
    fractions = np.array(
        [_hold_out_fraction(identity) for identity in example_identities(dataset, image_column, root)]
    )
    chosen = fractions < threshold
    if not chosen.any():
        chosen[np.argmin(fractions)] = True
    total, count = len(dataset), int(chosen.sum())
    if count >= total:
        raise UsageError(
            f"Holding out {percentage}% of {total} training image(s) for validation leaves none to train on (each "
            "image's side is fixed by a hash of its name); pass more images, a validation split or folder, or a "
            "smaller --validation_split_percentage."
        )
    info.update(num_examples=count, of=total)
    return dataset.select(np.flatnonzero(~chosen)), dataset.select(np.flatnonzero(chosen)), info


def dataset_identity(dataset, **source) -> dict:
    """What identifies the training data of a run: `source` (name or folder, config, revision, split, held-out
    share, sample cap) plus, for a map-style dataset, its number of examples and `datasets`' fingerprint (which
    changes when the files change: an image added to a folder, a new revision)."""
    identity = {key: value for key, value in source.items() if value is not None}
    if hasattr(dataset, "__len__"):
        identity["num_examples"] = len(dataset)
        identity["fingerprint"] = getattr(dataset, "_fingerprint", None)
    return identity


# ---------------------------------------------------------------------------------------------------------------
# Validation images
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ValidationImages:
    """This process's share of a validation set, ready to evaluate.

    Args:
        images: 8-bit RGB PIL images of `image_size` x `image_size` (fixed centre crops).
        indices: the position of each image in the split; metrics are gathered and ordered by it, so any number of
            processes gives the same figures.
        num_unreadable: images of this process's share that could not be read (skipped).
        dataset_name, dataset_split, image_size: where the images come from and their size.
        total: how many examples of the split were read, over all processes (unreadable ones included); `None`
            for a streamed split. Example pictures are spread over this range.
        held_out: when the images were held out of the training split (`hold_out`), what was held out; else None.
    """

    images: list[Image.Image]
    indices: list[int]
    num_unreadable: int
    dataset_name: str
    dataset_split: str
    image_size: int
    total: int | None = None
    held_out: dict | None = None


def load_validation_images(
    dataset,
    image_column: str,
    image_size: int,
    *,
    dataset_name: str,
    dataset_split: str,
    max_samples: int | None = None,
    process_index: int = 0,
    num_processes: int = 1,
    resample: int = Image.Resampling.BICUBIC,
    held_out: dict | None = None,
) -> ValidationImages:
    """Decode this process's share of the first `max_samples` examples of `dataset` (every `num_processes`-th
    example, starting at `process_index`), each cut to its largest centred square at `image_size` (`center_square`,
    with `resample`, the image processor's filter). Unreadable images are skipped and counted. `held_out` (from
    `hold_out`) is carried into the results."""
    counter = ImageDecodeCounter()
    images, indices, total = [], [], None
    if hasattr(dataset, "__len__"):
        total = len(dataset) if max_samples is None else min(max_samples, len(dataset))
        rows = ((i, dataset[i]) for i in range(process_index, total, num_processes))
    else:
        source = dataset.take(max_samples) if max_samples is not None else dataset
        rows = ((i, row) for i, row in enumerate(source) if i % num_processes == process_index)
    for index, row in rows:
        image = try_decode(row[image_column], counter)
        if image is None:
            continue
        images.append(center_square(image, image_size, resample))
        indices.append(index)
    return ValidationImages(
        images=images,
        indices=indices,
        num_unreadable=counter.unreadable,
        dataset_name=dataset_name,
        dataset_split=dataset_split,
        image_size=image_size,
        total=total,
        held_out=held_out,
    )
