"""How `vqrae-tokenize` turns source images into tokens, one shard at a time: each image prepared as the model's
validation images are (`ImagePreparation`), the encoder's precision (`resolve_precision`, `autocast_context`), the
token grid's shape, and the digest that identifies the weights that made the tokens (`weights_digest`). The job
that runs them is `vqrae.tokenize`."""

from __future__ import annotations

import hashlib
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .image_data import center_square, processor_resample, processor_size
from .image_decoding import UNREADABLE_ERRORS, decode_image, relative_path
from .modeling_vqrae import center_crop_settings

__all__ = [
    "ImagePreparation",
    "ShardBatches",
    "autocast_context",
    "collate_rows",
    "resolve_precision",
    "token_grid",
    "weights_digest",
]

logger = logging.getLogger(__name__)


def image_identifier(value, index: int, root: Path | None) -> str:
    """The file the image came from (relative to `root` when inside it), or its index when it has no name."""
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    return relative_path(os.fspath(path), root) if path else str(index)


@dataclass
class ImagePreparation:
    """How a source image becomes `pixel_values`: decoded to RGB (`vqrae.image_decoding.decode_image`), cut to its
    largest centred square at the model's resolution (`crop="center"`: `vqrae.image_data.center_square`, as
    validation images and the model's own image processor cut it) or squeezed whole to that square
    (`crop="none"`), with the processor's resampling, then passed through the model's image processor."""

    processor: object
    image_column: str
    keep_columns: list[str]
    crop: str
    root: Path | None

    def __call__(self, row: dict, index: int):
        value = row[self.image_column]
        identifier = image_identifier(value, index, self.root)
        kept = {name: row[name] for name in self.keep_columns}
        try:
            image = decode_image(value)
        except UNREADABLE_ERRORS as error:
            logger.warning("Skipping unreadable image %s (index %d): %s", identifier, index, error)
            return index, identifier, None, kept
        side = processor_size(self.processor, None)
        if self.crop == "none":  # squeezed to a square, whatever crop the processor is set to
            image = image.resize((side, side), processor_resample(self.processor))
        elif not cuts_center_square(self.processor, side):
            image = center_square(image, side, processor_resample(self.processor))
        # else the processor cuts that same square itself, in the same steps: one pass instead of two.
        pixel_values = self.processor(images=[image], return_tensors="pt")["pixel_values"][0].float()
        return index, identifier, pixel_values, kept


def cuts_center_square(processor, side: int) -> bool:
    """Whether `processor` resizes and cuts the largest centred `side` square itself (`center_crop_settings`, as a
    VQRAE model's saved processor does), so `center_square` before it would only repeat its work."""

    def setting(name):
        value = getattr(processor, name, None)
        return _as_dict(value) if name in ("size", "crop_size") else value

    return bool(getattr(processor, "do_resize", False)) and all(
        setting(name) == value for name, value in center_crop_settings(side).items()
    )


def _as_dict(size) -> dict | None:
    """A processor's `size` / `crop_size` (a dict, or transformers' `SizeDict`) as a plain dict of its set keys."""
    if size is None:
        return None
    items = size.items() if hasattr(size, "items") else vars(size).items()
    return {key: value for key, value in items if value is not None}


class ShardBatches(torch.utils.data.Dataset):
    """The rows of one shard as a map-style dataset: item `i` is `(index, id, pixel_values or None, kept columns)`,
    `pixel_values` None for an unreadable image (skipped, and named in the manifest)."""

    def __init__(self, rows: list[dict], first_index: int, prepare: ImagePreparation):
        self.rows, self.first_index, self.prepare = rows, first_index, prepare

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int):
        return self.prepare(self.rows[position], self.first_index + position)


def collate_rows(items):
    """`(items, pixel_values)`: the shard's items and the readable ones' `pixel_values` stacked into one batch (None
    when none is readable), in the DataLoader's worker, so the main process only moves it to the device (pinned on
    CUDA)."""
    readable = [item[2] for item in items if item[2] is not None]
    return items, torch.stack(readable) if readable else None


def weights_digest(model) -> str:
    """SHA-256 of the model's state dict: each tensor's name, dtype, shape and bytes, in name order. It identifies
    the weights the same way whether the model came from a folder, the Hub or an object in memory, and does not
    depend on how they were stored (safetensors metadata, sharding); the same weights in another dtype differ, as
    their tokens may."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def resolve_precision(mixed_precision: str, device: torch.device) -> str:
    """The precision the encoder runs in, `"bf16"` or `"float32"`: `auto` is bf16 on a GPU that supports it."""
    if mixed_precision == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    else:
        use_bf16 = mixed_precision == "bf16"
    return "bf16" if use_bf16 else "float32"


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast for `precision="bf16"` (see `resolve_precision`), nothing for float32. The quantizer turns
    autocast off for itself, so FSQ indices are computed in float32 either way; the encoder's features are not, so
    a small share of bf16 tokens differs from float32 ones."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def token_grid(model, processor) -> tuple[tuple[int, int], tuple[int, int]]:
    """`(h, w)` of the token grid and `(h * w, D)` of the features for images as `processor` prepares them."""
    height, width = processor(images=[Image.new("RGB", (8, 8))], return_tensors="pt")["pixel_values"].shape[-2:]
    patch = model.config.vision_config.patch_size
    grid = (height // patch, width // patch)
    return grid, (grid[0] * grid[1], model.config.vision_config.hidden_size)
