"""Reading images: any value a `datasets` image column holds (a PIL image, `{"bytes", "path"}`, a path, bytes)
decoded to RGB (grayscale, palette, RGBA and 16-bit images converted), the name that identifies it, the
bookkeeping of unreadable images, which are skipped and counted (`UNREADABLE_ERRORS`) rather than crash a run, and
the file names a brace pattern of shards stands for (`expand_braces`)."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import UsageError

logger = logging.getLogger(__name__)

__all__ = [
    "expand_braces",
    "ImageDecodeCounter",
    "UNREADABLE_ERRORS",
    "decode_image",
    "decode_images",
    "image_name",
    "relative_path",
    "try_decode",
]

UNREADABLE_ERRORS = (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError)


@dataclass
class ImageDecodeCounter:
    """How many images were decoded and which were unreadable (skipped), on this process. An unreadable image is
    counted once however often it is read (epochs, retries); `failed` holds their names (`image_name`)."""

    decoded: int = 0
    examples: list[str] = field(default_factory=list)
    failed: set[str] = field(default_factory=set)
    new_failures: list[str] = field(default_factory=list)  # names not yet handed on by `take_new_failures`

    @property
    def unreadable(self) -> int:
        return len(self.failed)

    def record_failure(self, name: str, what: str) -> None:
        if name in self.failed:
            return
        self.failed.add(name)
        self.new_failures.append(name)
        if len(self.examples) < 5:
            self.examples.append(what)
        if self.unreadable == 1:
            logger.warning("Skipping an unreadable image (%s); skipped images are counted and reported.", what)

    def take_new_failures(self) -> list[str]:
        """The names of the images found unreadable since the last call (each once)."""
        new, self.new_failures = self.new_failures, []
        return new


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited onto white (RGBA, LA, palette images with a transparent colour)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale the format's range (not the image's own maximum, which would turn a uniform
        # grey white) to 8 bits instead of clipping. Mode "I" holds 16-bit files in older Pillows.
        array = np.asarray(image, dtype=np.float64)
        top = float(array.max()) if array.size else 0.0
        peak = 65535.0 if image.mode != "I" or 255 < top <= 65535 else max(top, 255.0)
        return Image.fromarray((array * (255.0 / peak)).round().clip(0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def decode_image(value) -> Image.Image:
    """An RGB PIL image from what a `datasets` image column holds: a PIL image, `{"bytes", "path"}`, a path or
    raw bytes. Raises one of `OSError`/`ValueError`/`UnidentifiedImageError` when the image cannot be read."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict) and (value.get("bytes") is not None or value.get("path")):
        image = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") is not None else Image.open(value["path"])
    elif isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, (str, os.PathLike)):
        image = Image.open(value)
    else:
        raise ValueError(f"not an image: {type(value).__name__}")
    image.load()  # read the pixels now, so a truncated file fails here and not later
    return _to_rgb(image)


def _describe(value) -> str:
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    return f"{type(value).__name__} value"


def try_decode(value, counter: ImageDecodeCounter) -> Image.Image | None:
    """`decode_image(value)`, or None (counted in `counter`) when it is unreadable."""
    try:
        image = decode_image(value)
    except UNREADABLE_ERRORS as error:
        try:
            name = image_name(value)
        except UsageError:  # no file and no bytes (a missing image): named by its type
            name = _describe(value)
        counter.record_failure(name, f"{_describe(value)}: {error}")
        return None
    counter.decoded += 1
    return image


def decode_images(dataset, image_column: str, max_samples: int | None = None) -> tuple[list[Image.Image], int]:
    """The first `max_samples` images of `dataset` (all when `None`), decoded whole as RGB, and the number of
    unreadable ones skipped."""
    counter = ImageDecodeCounter()
    images = []
    for position, row in enumerate(dataset):  # a streamed dataset too: stop after `max_samples`
        if max_samples is not None and position >= max_samples:
            break
        image = try_decode(row[image_column], counter)
        if image is not None:
            images.append(image)
    return images, counter.unreadable


def image_name(value, root: str | None = None, image_column: str = "image") -> str:
    """What names an undecoded image value (`{"bytes", "path"}`, a path or bytes): the file it is read from
    (relative to the folder `root` when inside it), else the SHA-256 of its bytes."""
    data = value.get("bytes") if isinstance(value, dict) else value if isinstance(value, (bytes, bytearray)) else None
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, (str, os.PathLike)) else None
    if data is None and path:
        return relative_path(os.fspath(path), root)
    if data is not None:
        return "sha256:" + hashlib.sha256(data).hexdigest()
    raise UsageError(f"Column {image_column!r} holds a {type(value).__name__}, not an image; pass --image_column.")


def relative_path(path: str, root: str | None) -> str:
    """`path` relative to the folder `root` (as given or with its links resolved) when inside it, in `/` form."""
    if root is not None:
        for folder, file in ((os.path.abspath(root), os.path.abspath(path)), (os.path.realpath(root), path)):
            if file.startswith(folder + os.sep):
                return os.path.relpath(file, folder).replace(os.sep, "/")
    return path


_BRACES = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """The names a shell-style brace pattern stands for, in order, as webdataset's shard lists are written (datasets
    does not expand them): `{00000..00999}` a range of numbers, zero-padded to the width of its ends when they have
    equal widths; `{a,b}` a list. Other braces are kept as they are (datasets' globs then see them)."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), expand_braces(pattern[match.end() :])
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        first, last = numbers.groups()
        if int(last) < int(first):
            raise UsageError(f"The range {{{body}}} in `data_files` {pattern!r} runs backwards.")
        width = len(first) if len(first) == len(last) else 0
        items = [f"{number:0{width}d}" for number in range(int(first), int(last) + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        return [head + "{" + body + "}" + rest for rest in tail]
    return [head + item + rest for item in items for rest in tail]
