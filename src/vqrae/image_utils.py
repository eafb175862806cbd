"""Turning model outputs back into images, undoing the model's own image processor (its rescale, mean and std)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .configuration_vqrae import VQRAEConfig
from .modeling_vqrae import image_processor_for

__all__ = ["to_pil_images", "denormalize"]


def _image_processor(processor):
    """The image processor whose normalisation to undo: `processor` itself, or a VQRAE model's or config's own."""
    if isinstance(processor, VQRAEConfig):
        return image_processor_for(processor)
    if hasattr(processor, "get_image_processor"):
        return processor.get_image_processor()
    if hasattr(processor, "image_mean") and hasattr(processor, "image_std"):
        return processor
    raise TypeError(
        "`processor` must be the model's image processor (`AutoImageProcessor.from_pretrained(model folder)`), a "
        f"VQRAE model or its VQRAEConfig (got {type(processor).__name__})."
    )


def denormalize(pixel_values: torch.Tensor, processor) -> torch.Tensor:
    """Undo the image processor's normalisation and rescale: `(B, C, H, W)` in the model's range -> `[0, 1]`,
    clamped. `processor`: the image processor that made the pixels, or the VQRAE model or config (its own)."""
    processor = _image_processor(processor)
    pixels = pixel_values.detach().float()
    if getattr(processor, "do_normalize", True):
        mean, std = (
            torch.as_tensor(values, dtype=torch.float32, device=pixels.device).reshape(-1, 1, 1)
            for values in (processor.image_mean, processor.image_std)
        )
        pixels = pixels * std + mean
    # Pixels were rescaled by `rescale_factor` (1/255: already [0, 1]); another factor is undone to [0, 1] too.
    scale = 1.0 / (255.0 * processor.rescale_factor) if getattr(processor, "do_rescale", True) else 1.0 / 255.0
    if scale != 1.0:
        pixels = pixels * scale
    return pixels.clamp(0, 1)


def to_pil_images(pixel_values: torch.Tensor, processor) -> list[Image.Image]:
    """Reconstructions (or normalised inputs) `(B, 3, H, W)` to a list of 8-bit RGB PIL images.

    `processor` is the model's image processor (`AutoImageProcessor.from_pretrained(model folder)`), or the VQRAE
    model or its config: its mean, std and rescale are undone, so an encoder's own normalisation (ImageNet's, say)
    gives the right colours. Required: no normalisation is assumed.
    """
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"`pixel_values` must be a tensor of shape (batch_size, 3, height, width) (got {shape}).")
    unit = denormalize(pixel_values, processor)
    arrays = (unit * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(array), mode="RGB") for array in arrays]
