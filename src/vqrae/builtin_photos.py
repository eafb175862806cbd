"""The built-in photographs (`BUILTIN_DATASET_NAME`): real photos that ship inside scikit-image and scikit-learn,
split *by photo* into training photos and held-out validation photos (`BUILTIN_TRAIN_PHOTOS`,
`BUILTIN_VALIDATION_PHOTOS`). The validation split holds fixed square tiles of the held-out photos at three scales
(`validation_tiles`: 324 tiles of the four photos). `BUILTIN_COLOUR_DATASET_NAME` adds scikit-image's two synthetic
colour images to the training photos (`BUILTIN_COLOUR_IMAGES`), with the same validation split. Needs scikit-image and
scikit-learn, the `[train]` extra."""

from __future__ import annotations

import functools
import io
import os

import datasets
from PIL import Image

from .errors import MissingSplitError
from .image_decoding import decode_image

__all__ = [
    "BUILTIN_COLOUR_DATASET_NAME",
    "BUILTIN_COLOUR_IMAGES",
    "BUILTIN_DATASET_NAME",
    "BUILTIN_DATASET_NAMES",
    "BUILTIN_TRAIN_PHOTOS",
    "BUILTIN_VALIDATION_PHOTOS",
    "VALIDATION_TILE_SCALES",
    "builtin_photos",
    "validation_tiles",
]

BUILTIN_DATASET_NAME = "builtin:photos"
"""`dataset_name` of the built-in photographs (not a Hub id: the colon keeps it from clashing with one)."""
BUILTIN_COLOUR_DATASET_NAME = "builtin:photos+colour"
"""`dataset_name` of the built-in photographs with `BUILTIN_COLOUR_IMAGES` added to the training split."""
BUILTIN_DATASET_NAMES = (BUILTIN_DATASET_NAME, BUILTIN_COLOUR_DATASET_NAME)

# (package, file) of the real photographs shipped with scikit-image (`skimage/data`) and scikit-learn
# (`sklearn/datasets/images`). Synthetic images are left out (two of them, for colour: `BUILTIN_COLOUR_IMAGES`).
# The two motorcycle frames are a stereo pair: they stay together, in training.
BUILTIN_TRAIN_PHOTOS = (
    ("skimage", "astronaut.png"),
    ("skimage", "rocket.jpg"),
    ("skimage", "motorcycle_left.png"),
    ("skimage", "motorcycle_right.png"),
    ("skimage", "hubble_deep_field.jpg"),
    ("skimage", "ihc.png"),
    ("skimage", "retina.jpg"),
    ("skimage", "brick.png"),
    ("skimage", "grass.png"),
    ("skimage", "gravel.png"),
    ("skimage", "coins.png"),
    ("skimage", "moon.png"),
    ("skimage", "clock_motion.png"),
    ("skimage", "page.png"),
    ("skimage", "text.png"),
    ("sklearn", "china.jpg"),
)
BUILTIN_VALIDATION_PHOTOS = (
    ("skimage", "chelsea.png"),
    ("skimage", "coffee.png"),
    ("skimage", "camera.png"),
    ("sklearn", "flower.jpg"),
)
# Synthetic images of saturated colour that ship with scikit-image: its colour wheel (every hue at every saturation)
# and its logo (a green and an orange field). The photos' palette is narrow (reds, oranges, greys); these two give the
# training crops every hue.
BUILTIN_COLOUR_IMAGES = (
    ("skimage", "color.png"),
    ("skimage", "logo.png"),
)
# The built-in photos are stored with their shorter side at most this long (the largest is 1411 px): decoding
# stays cheap, and a 10% crop of a 384 px photo still has ~120 px to shrink from at the default resolution.
BUILTIN_MAX_SHORT_SIDE = 384


def _builtin_photo_path(package: str, filename: str) -> str:
    """Where `filename` lies inside the installed `package` (scikit-image's data, scikit-learn's sample images)."""
    try:  # optional: the [train] extra
        if package == "skimage":
            import skimage.data

            return os.path.join(os.path.dirname(skimage.data.__file__), filename)
        import sklearn.datasets

        return os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", filename)
    except ImportError as error:
        raise ImportError(
            f"The built-in photos ship with scikit-image and scikit-learn, which are not installed ({error}). "
            'Install them with `pip install "vqrae[train]"`, or pass --dataset_name or --train_dir.'
        ) from error


# Held-out tiles: squares of these shares of a photo's shorter side, on a grid with a stride of half the side.
VALIDATION_TILE_SCALES = (1.0, 0.5, 0.25)


def validation_tiles(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """Fixed square tiles `(left, top, right, bottom)` of a held-out photo at several scales
    (`VALIDATION_TILE_SCALES` of its shorter side), each scale's tiles on a grid centred on the photo with a stride
    of half their side (rounded up). No two tiles share more than half of the larger one's area: tiles of one scale
    overlap by at most half, and a tile lies within one of the next larger scale as a quarter of it."""
    tiles = []
    for scale in VALIDATION_TILE_SCALES:
        side = int(min(width, height) * scale)
        stride = -(-side // 2)  # at least half the side: neighbours overlap by at most half
        grid = []
        for extent in (width, height):
            count = (extent - side) // stride + 1
            margin = (extent - side - (count - 1) * stride) // 2  # the grid centred on the photo
            grid.append([margin + i * stride for i in range(count)])
        tiles += [(left, top, left + side, top + side) for top in grid[1] for left in grid[0]]
    return tiles


@functools.lru_cache(maxsize=2)
def _builtin_photo_files(split: str, colour: bool = False) -> tuple[tuple[bytes, ...], tuple[str, ...]]:
    """PNG bytes and names of the built-in photos of `split` (decoded, resized and cut once per process); `colour`:
    with `BUILTIN_COLOUR_IMAGES` in the training split."""
    photos = BUILTIN_TRAIN_PHOTOS if split == "train" else BUILTIN_VALIDATION_PHOTOS
    if colour and split == "train":
        photos = photos + BUILTIN_COLOUR_IMAGES
    images, names = [], []
    for package, filename in photos:
        image = decode_image(_builtin_photo_path(package, filename))
        scale = BUILTIN_MAX_SHORT_SIDE / min(image.size)
        if scale < 1:
            size = (round(image.width * scale), round(image.height * scale))
            image = image.resize(size, Image.Resampling.LANCZOS)
        name = filename.rsplit(".", 1)[0]
        if split == "train":
            crops = [(name, image)]
        else:
            crops = [(f"{name}#{i}", image.crop(box)) for i, box in enumerate(validation_tiles(*image.size))]
        for crop_name, crop in crops:
            buffer = io.BytesIO()
            crop.save(buffer, format="PNG", compress_level=1)
            images.append(buffer.getvalue())
            names.append(crop_name)
    return tuple(images), tuple(names)


def builtin_photos(split: str = "train", colour: bool = False):
    """The built-in photographs as a `datasets.Dataset` with columns `image` (an `Image` feature) and `photo`.

    `split="train"` gives the training photos (`BUILTIN_TRAIN_PHOTOS`, and `BUILTIN_COLOUR_IMAGES` with `colour`),
    whole; `split="validation"` gives fixed
    square tiles of the held-out photos (`BUILTIN_VALIDATION_PHOTOS`) at three scales (`validation_tiles`), in photo
    order. No validation photo is ever seen in training. Requires scikit-image and scikit-learn
    (`pip install "vqrae[train]"`).
    """
    if split not in ("train", "validation"):
        raise MissingSplitError(f"The built-in photos have the splits 'train' and 'validation' (got split={split!r}).")
    images, names = _builtin_photo_files(split, colour)
    images = [{"bytes": data, "path": None} for data in images]
    features = datasets.Features({"image": datasets.Image(), "photo": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": images, "photo": list(names)}, features=features, split=split)
