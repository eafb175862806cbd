"""Turning model outputs back into images."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

__all__ = ["to_pil_images", "denormalize"]


def denormalize(
    pixel_values: torch.Tensor, mean: float | list[float] = 0.5, std: float | list[float] = 0.5
) -> torch.Tensor:
    """Undo the image processor's normalisation: `(B, C, H, W)` in the model's range -> `[0, 1]`, clamped."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=pixel_values.device).reshape(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=pixel_values.device).reshape(-1, 1, 1)
    return (pixel_values.detach().float() * std_t + mean_t).clamp(0, 1)


def to_pil_images(
    pixel_values: torch.Tensor, mean: float | list[float] = 0.5, std: float | list[float] = 0.5
) -> list[Image.Image]:
    """Reconstructions (or normalised inputs) `(B, 3, H, W)` to a list of 8-bit RGB PIL images.

    `mean` and `std` are the image processor's (`processor.image_mean`, `processor.image_std`); SigLIP uses 0.5.
    """
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"`pixel_values` must be a tensor of shape (batch_size, 3, height, width) (got {shape}).")
    arrays = (denormalize(pixel_values, mean, std) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(array), mode="RGB") for array in arrays]
