"""Quantizers for VQRAE: finite scalar quantization (FSQ) and a learned vector-quantized codebook (VQ).

This file depends on torch only, so it can travel with a model to the Hub and be used on its own.

Both quantizers share one surface: ``forward(z)`` returns a :class:`VQRAEQuantizerOutput` with the
straight-through ``quantized`` vectors (same width as ``z``), the integer ``indices`` and a scalar ``loss``;
``indices_to_codes(indices)`` maps indices back to vectors of the same width; ``codebook_size`` counts the codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "VQRAEFSQuantizer",
    "VQRAEQuantizerOutput",
    "VQRAEVectorQuantizer",
    "codebook_statistics",
]


@dataclass
class VQRAEQuantizerOutput:
    """What a quantizer returns.

    Args:
        quantized (`torch.Tensor` of shape `(..., dim)`):
            The quantized vectors, carrying straight-through gradients to the input in training.
        indices (`torch.LongTensor` of shape `(...)`):
            The index of each vector's code, in `[0, codebook_size)`.
        loss (`torch.Tensor`, scalar):
            The quantizer's own loss (zero for FSQ; codebook + commitment for VQ).
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor


def _float32_region(device_type: str):
    """Autocast off: quantization always runs in float32 (bf16 cannot even hold every index above 256)."""
    return torch.autocast(device_type=device_type, enabled=False)


def _check_indices(indices: torch.Tensor, codebook_size: int) -> None:
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"`indices` must be a torch.Tensor of integers (got {type(indices).__name__}).")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"`indices` must hold integers (torch.int32 or torch.int64), got dtype {indices.dtype}.")
    if indices.numel() == 0:
        return
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= codebook_size:
        raise ValueError(
            f"`indices` must lie in [0, {codebook_size}) for a codebook of {codebook_size} codes "
            f"(got values from {low} to {high})."
        )


def codebook_statistics(indices: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Codebook usage of a set of indices.

    Returns a dict with `used_codes` (how many distinct codes appear), `utilization` (their share of the
    codebook, in [0, 1]) and `perplexity` (exp of the entropy of the code histogram: the effective number of
    codes in use; `codebook_size` at most).
    """
    counts = torch.bincount(indices.reshape(-1).long(), minlength=codebook_size).double()
    total = counts.sum()
    if total == 0:
        return {"used_codes": 0, "utilization": 0.0, "perplexity": 0.0}
    probs = counts[counts > 0] / total
    used = int((counts > 0).sum())
    return {
        "used_codes": used,
        "utilization": used / codebook_size,
        "perplexity": float(torch.exp(-(probs * probs.log()).sum())),
    }


# ---------------------------------------------------------------------------------------------------------------
# Finite scalar quantization
# ---------------------------------------------------------------------------------------------------------------


class VQRAEFSQuantizer(nn.Module):
    """Finite scalar quantization with an implicit codebook (Mentzer et al., 2023, "Finite Scalar Quantization:
    VQ-VAE Made Simple"), in the symmetric form used by NVIDIA Cosmos-Tokenizer.

    A dimension with `L` levels is bounded by `tanh` and rounded to one of `L` evenly spaced values in [-1, 1]:
    level index `i = floor((tanh(z) + 1) / 2 * (L - 1) + 1/2)` (round half up) and code `2 i / (L - 1) - 1`.
    The index of a token is `sum_k i_k * basis_k` with `basis = cumprod([1] + levels[:-1])`: the first dimension
    is the least significant, as in Cosmos-Tokenizer and vector-quantize-pytorch (`FSQ(preserve_symmetry=True)`).
    The codebook (`prod(levels)` codes) is never built unless :meth:`implicit_codebook` is called.

    Args:
        levels (`list[int]`): number of levels per dimension, each >= 2.
        dim (`int`): width of the vectors to quantize. When it differs from `len(levels)`, `project_in`
            and `project_out` are learned `nn.Linear` maps; otherwise they are identities.
    """

    def __init__(self, levels: list[int] | tuple[int, ...], dim: int):
        super().__init__()
        levels = list(levels) if isinstance(levels, (list, tuple)) else levels
        if (
            not isinstance(levels, list)
            or len(levels) == 0
            or any(isinstance(lv, bool) or not isinstance(lv, int) or lv < 2 for lv in levels)
        ):
            raise ValueError(f"`levels` must be a non-empty list of integers >= 2 (got {levels!r}).")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"`dim` must be a positive integer (got {dim!r}).")
        self.levels = levels
        self.dim = dim
        self.codebook_dim = len(levels)
        self.codebook_size = math.prod(levels)

        for name, table in self.level_tables().items():
            self.register_buffer(name, table, persistent=False)
        self._float_indices_exact = self.codebook_size <= 2**24

        needs_projection = dim != self.codebook_dim
        self.project_in = nn.Linear(dim, self.codebook_dim) if needs_projection else nn.Identity()
        self.project_out = nn.Linear(self.codebook_dim, dim) if needs_projection else nn.Identity()

    def level_tables(self) -> dict[str, torch.Tensor]:
        """The constant tables of the grid, kept as non-persistent buffers. A model loaded with
        `from_pretrained` is built on the meta device, so its `_init_weights` refills them from here."""
        basis = [math.prod(self.levels[:i]) for i in range(len(self.levels))]
        return {
            "_levels": torch.tensor(self.levels, dtype=torch.int64),
            "_basis": torch.tensor(basis, dtype=torch.int64),
            # (L - 1) / 2: maps codes in [-1, 1] to level indices and back.
            "_half_width": (torch.tensor(self.levels, dtype=torch.float32) - 1) / 2,
            # Float basis for a one-matmul index when every index is exact in float32 (below 2**24).
            "_basis_float": torch.tensor(basis, dtype=torch.float32),
        }

    def extra_repr(self) -> str:
        return f"levels={self.levels}, dim={self.dim}, codebook_size={self.codebook_size}"

    # -- level indices <-> codes <-> indices ---------------------------------------------------------------

    def _level_indices_to_index(self, level_indices: torch.Tensor) -> torch.Tensor:
        if self._float_indices_exact:
            return (level_indices @ self._basis_float).long()
        return (level_indices.long() * self._basis).sum(dim=-1)

    def _level_indices_to_codes(self, level_indices: torch.Tensor) -> torch.Tensor:
        # (i - (L-1)/2) / ((L-1)/2): one rounding, so codes are the closest floats to the exact grid values.
        return (level_indices - self._half_width) / self._half_width

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes `(..., len(levels))` on the grid (values in [-1, 1]) to indices `(...)` (int64)."""
        if codes.shape[-1] != self.codebook_dim:
            raise ValueError(
                f"`codes` must have {self.codebook_dim} values in its last dimension, one per FSQ level "
                f"(got shape {tuple(codes.shape)})."
            )
        with _float32_region(codes.device.type):
            level_indices = torch.round((codes.float() + 1) * self._half_width)
            return self._level_indices_to_index(level_indices)

    def indices_to_level_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices `(...)` to per-dimension level indices `(..., len(levels))` in `{0, ..., L - 1}`."""
        return (indices.long().unsqueeze(-1) // self._basis) % self._levels

    def indices_to_codes(self, indices: torch.Tensor, project_out: bool = True) -> torch.Tensor:
        """Indices `(...)` to codes: `(..., len(levels))` on the grid, or `(..., dim)` after `project_out`."""
        _check_indices(indices, self.codebook_size)
        with _float32_region(indices.device.type):
            codes = self._level_indices_to_codes(self.indices_to_level_indices(indices).float())
            if project_out:
                codes = self.project_out(codes)
        return codes

    def implicit_codebook(self) -> torch.Tensor:
        """All `codebook_size` codes, `(codebook_size, len(levels))`, in index order. Materialised on request."""
        return self.indices_to_codes(torch.arange(self.codebook_size, device=self._levels.device), project_out=False)

    # -- forward ---------------------------------------------------------------------------------------------

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bound and round `z` `(..., len(levels))`: returns straight-through codes and indices."""
        bounded = torch.tanh(z)
        level_indices = torch.floor((bounded + 1) * self._half_width + 0.5)
        codes = self._level_indices_to_codes(level_indices)
        if torch.is_grad_enabled() and bounded.requires_grad:
            codes = bounded + (codes - bounded).detach()
        return codes, self._level_indices_to_index(level_indices)

    def forward(self, z: torch.Tensor) -> VQRAEQuantizerOutput:
        """Quantize `z` of shape `(..., dim)`."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"The quantizer expects vectors of width {self.dim} (got shape {tuple(z.shape)}).")
        with _float32_region(z.device.type):
            codes, indices = self.quantize(self.project_in(z.float()))
            quantized = self.project_out(codes)
        return VQRAEQuantizerOutput(quantized=quantized, indices=indices, loss=quantized.new_zeros(()))


# ---------------------------------------------------------------------------------------------------------------
# Vector quantization with a learned codebook
# ---------------------------------------------------------------------------------------------------------------


class VQRAEVectorQuantizer(nn.Module):
    """Vector quantization with a learned codebook (van den Oord et al., 2017, "Neural Discrete Representation
    Learning"): nearest code by L2 distance, codebook loss `||sg(z) - e||^2` plus commitment loss
    `commitment_cost * ||z - sg(e)||^2`, straight-through gradients to `z`.

    With `use_simvq=True` the codebook is SimVQ's reparameterisation (Zhu et al., 2024, "Addressing Representation
    Collapse in Vector Quantized Models with One Linear Layer"), the setting of the VQRAE paper: a frozen random
    codebook `C` times a learned linear map `W`, so every code moves with every update and the codebook does not
    collapse onto a few entries.

    The nearest-code search is one matmul per chunk of tokens, each chunk's distance matrix holding at most
    `max_distance_elements` numbers, so a 16384 x 1536 codebook against 16384 tokens never allocates the
    full 16384 x 16384 matrix.

    Args:
        num_embeddings (`int`): number of codes, >= 2.
        dim (`int`): width of the vectors to quantize.
        codebook_dim (`int`, *optional*): width of the codes; `project_in`/`project_out` are learned maps when it
            differs from `dim`. Defaults to `dim`.
        commitment_cost (`float`, *optional*, defaults to 0.25): weight of the commitment loss.
        use_simvq (`bool`, *optional*, defaults to `False`): use the SimVQ codebook.
        max_distance_elements (`int`, *optional*, defaults to 2**24): bound on the size of one chunk's distance
            matrix (64 MiB in float32).
    """

    def __init__(
        self,
        num_embeddings: int,
        dim: int,
        codebook_dim: int | None = None,
        commitment_cost: float = 0.25,
        use_simvq: bool = False,
        max_distance_elements: int = 2**24,
    ):
        super().__init__()
        if isinstance(num_embeddings, bool) or not isinstance(num_embeddings, int) or num_embeddings < 2:
            raise ValueError(f"`num_embeddings` must be an integer >= 2 (got {num_embeddings!r}).")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"`dim` must be a positive integer (got {dim!r}).")
        codebook_dim = dim if codebook_dim is None else codebook_dim
        if isinstance(codebook_dim, bool) or not isinstance(codebook_dim, int) or codebook_dim < 1:
            raise ValueError(f"`codebook_dim` must be a positive integer or None (got {codebook_dim!r}).")
        if not isinstance(commitment_cost, (int, float)) or isinstance(commitment_cost, bool) or commitment_cost < 0:
            raise ValueError(f"`commitment_cost` must be a number >= 0 (got {commitment_cost!r}).")
        if not isinstance(max_distance_elements, int) or max_distance_elements < 1:
            raise ValueError(f"`max_distance_elements` must be a positive integer (got {max_distance_elements!r}).")
        self.num_embeddings = num_embeddings
        self.codebook_size = num_embeddings
        self.dim = dim
        self.codebook_dim = codebook_dim
        self.commitment_cost = float(commitment_cost)
        self.use_simvq = bool(use_simvq)
        self.max_distance_elements = max_distance_elements

        needs_projection = dim != codebook_dim
        self.project_in = nn.Linear(dim, codebook_dim) if needs_projection else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if needs_projection else nn.Identity()
        if self.use_simvq:
            # Saved with the weights (persistent) so a reloaded model has the very same codebook.
            self.register_buffer("frozen_codebook", torch.randn(num_embeddings, codebook_dim) * codebook_dim**-0.5)
            self.codebook_transform = nn.Linear(codebook_dim, codebook_dim, bias=False)
            self.embedding = None
        else:
            self.embedding = nn.Embedding(num_embeddings, codebook_dim)
            self.codebook_transform = None

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, dim={self.dim}, codebook_dim={self.codebook_dim}, "
            f"use_simvq={self.use_simvq}"
        )

    @property
    def codebook(self) -> torch.Tensor:
        """The effective codebook, `(num_embeddings, codebook_dim)`."""
        if self.use_simvq:
            return self.codebook_transform(self.frozen_codebook)
        return self.embedding.weight

    @torch.no_grad()
    def nearest_indices(self, vectors: torch.Tensor, codebook: torch.Tensor | None = None) -> torch.Tensor:
        """Index of the nearest code (L2) for each row of `vectors` `(n, codebook_dim)`, in bounded-memory chunks."""
        codebook = (self.codebook if codebook is None else codebook).float()
        vectors = vectors.float()
        # argmin ||x - e||^2 = argmin (||e||^2 - 2 x.e): the ||x||^2 term is the same for every code.
        codebook_sq = codebook.pow(2).sum(dim=1)
        codebook_t = codebook.t()
        chunk = max(1, self.max_distance_elements // self.num_embeddings)
        indices = torch.empty(vectors.shape[0], dtype=torch.int64, device=vectors.device)
        for start in range(0, vectors.shape[0], chunk):
            block = vectors[start : start + chunk]
            distances = torch.addmm(codebook_sq, block, codebook_t, beta=1.0, alpha=-2.0)
            indices[start : start + chunk] = distances.argmin(dim=1)
        return indices

    def indices_to_codes(self, indices: torch.Tensor, project_out: bool = True) -> torch.Tensor:
        """Indices `(...)` to codes `(..., codebook_dim)`, or `(..., dim)` after `project_out`."""
        _check_indices(indices, self.codebook_size)
        with _float32_region(indices.device.type):
            codes = F.embedding(indices.long(), self.codebook.float())
            if project_out:
                codes = self.project_out(codes)
        return codes

    def forward(self, z: torch.Tensor) -> VQRAEQuantizerOutput:
        """Quantize `z` of shape `(..., dim)`."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"The quantizer expects vectors of width {self.dim} (got shape {tuple(z.shape)}).")
        with _float32_region(z.device.type):
            latents = self.project_in(z.float())
            codebook = self.codebook.float()
            flat = latents.reshape(-1, self.codebook_dim)
            indices = self.nearest_indices(flat.detach(), codebook.detach())
            codes = F.embedding(indices, codebook).view_as(latents)
            loss = F.mse_loss(codes, latents.detach()) + self.commitment_cost * F.mse_loss(latents, codes.detach())
            if torch.is_grad_enabled():
                # Straight-through: the decoder's gradient reaches `z`; the codebook learns from `loss` alone. Written
                # as codes + (latents - latents) so the forward value is exactly the code, even for huge latents.
                codes = codes.detach() + (latents - latents.detach())
            quantized = self.project_out(codes)
        return VQRAEQuantizerOutput(quantized=quantized, indices=indices.view(latents.shape[:-1]), loss=loss)
