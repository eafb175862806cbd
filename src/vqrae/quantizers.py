"""Quantizers for VQRAE: finite scalar quantization (FSQ) and a learned vector-quantized codebook (VQ).

This file depends on torch only, so it can travel with a model to the Hub and be used on its own.

Both quantizers share one surface: ``forward(z)`` returns a :class:`VQRAEQuantizerOutput` with the
straight-through ``quantized`` vectors (``output_dim`` wide: the width of ``z``, or the codes' own width for a
quantizer built with ``project_out=False``), the integer ``indices`` and a scalar ``loss``;
``indices_to_codes(indices)`` maps indices back to vectors of that width; ``codebook_size`` counts the codes.
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


class _Float32Module(nn.Module):
    """A module whose floating-point weights and buffers stay float32 whatever the rest of the model is cast to.

    `model.to(torch.bfloat16)`, `.half()` and transformers' loading with `dtype=` move it between devices but keep
    its dtype, without a round trip through the lower precision: a float32 tensor is moved as it is. (Loading with
    `dtype=` is also covered by `VQRAEPreTrainedModel._keep_in_fp32_modules_strict`.)
    """

    def _apply(self, fn, recurse=True):
        def keep_float32(tensor: torch.Tensor) -> torch.Tensor:
            converted = fn(tensor)
            if not tensor.is_floating_point() or converted.dtype == torch.float32:
                return converted
            if tensor.dtype == torch.float32:  # a cast: move the float32 original instead of the rounded copy
                return tensor.to(device=converted.device)
            return converted.float()

        return super()._apply(keep_float32, recurse)


def _check_indices(indices: torch.Tensor, codebook_size: int) -> None:
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"`indices` must be a torch.Tensor of integers (got {type(indices).__name__}).")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"`indices` must hold integers (torch.int32 or torch.int64), got dtype {indices.dtype}.")
    if indices.numel() == 0:
        return
    low, high = (int(value) for value in torch.aminmax(indices))
    if low < 0 or high >= codebook_size:
        raise ValueError(
            f"`indices` must lie in [0, {codebook_size}) for a codebook of {codebook_size} codes "
            f"(got values from {low} to {high})."
        )


def _floor_divider(divisor: int, index_bits: int) -> tuple[int, int, int]:
    """`(divisor, multiplier, shift)` for :func:`_floor_divide` of int64 tensors of `0 <= i < 2**index_bits`.

    Integer division has no vector instruction, so where the product fits in int64 it becomes a multiply and a shift
    (Granlund & Montgomery, 1994): with `shift = index_bits + ceil(log2 divisor)` and `multiplier =
    ceil(2**shift / divisor)`, the error `multiplier * divisor - 2**shift` is below `divisor`, so `i * error` stays
    below `2**shift` and `(i * multiplier) >> shift == i // divisor` exactly. `multiplier` is 0 where it could
    overflow (plain division then).
    """
    shift = index_bits + (divisor - 1).bit_length()
    multiplier = -(-(1 << shift) // divisor)
    return (divisor, multiplier, shift) if multiplier.bit_length() + index_bits <= 62 else (divisor, 0, 0)


def _floor_divide(indices: torch.Tensor, divider: tuple[int, int, int]) -> torch.Tensor:
    divisor, multiplier, shift = divider
    if multiplier:
        return (indices * multiplier) >> shift
    return torch.div(indices, divisor, rounding_mode="floor")


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

# A per-dimension constant broadcast over an `(n, d)` tensor with d = len(levels) (about 6) runs ATen's scalar loop
# d elements at a time. Viewed as `(n / 256, 256 d)` against the constant tiled 256 times, the very same IEEE
# operations vectorise: bit-identical results, several times faster (see bench/bench_fsq.py).
_TILE_ROWS = 256
# `indices_to_codes` gathers grid codes from tables of groups of dimensions, each group with at most this many
# codes ([8, 8, 8, 5, 5, 5]: 512 + 125 rows), instead of dividing every index once per dimension.
_MAX_GROUP_CODES = 1024


class VQRAEFSQuantizer(_Float32Module):
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
        project_out (`bool`, *optional*, defaults to `True`): map the codes back to `dim`. `False` hands on the
            grid codes themselves (`len(levels)` wide), for a model whose next layer reads them (Cosmos-Tokenizer's
            `post_quant_conv`).
    """

    def __init__(self, levels: list[int] | tuple[int, ...], dim: int, project_out: bool = True):
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
        # Per-device cache of `_grid_code_tables` (a few KB; a plain attribute, so never in the state dict).
        self._grid_code_tables_cache: dict[torch.device, tuple] = {}

        needs_projection = dim != self.codebook_dim
        self.project_in = nn.Linear(dim, self.codebook_dim) if needs_projection else nn.Identity()
        self.project_out = nn.Linear(self.codebook_dim, dim) if needs_projection and project_out else nn.Identity()
        # The width of `quantized` and of `indices_to_codes` (with `project_out=True`).
        self.output_dim = dim if project_out else self.codebook_dim

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

    def _tiled_blocks(self, *tensors: torch.Tensor) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
        """Views of contiguous `(n, len(levels))` tensors for per-dimension arithmetic: the first `n - n % 256`
        rows as `(n // 256, 256 * len(levels))` paired with `_half_width` tiled 256 times, then the remaining rows
        paired with `_half_width` itself."""
        rows = tensors[0].shape[0]
        full = rows - rows % _TILE_ROWS
        blocks = []
        if full:
            width = _TILE_ROWS * self.codebook_dim
            blocks.append(([t[:full].view(-1, width) for t in tensors], self._half_width.repeat(_TILE_ROWS)))
        if full < rows:
            blocks.append(([t[full:] for t in tensors], self._half_width))
        return blocks

    def _round_to_grid(self, bounded: torch.Tensor, reuse_input: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Level indices `floor((b + 1) * h + 1/2)` and codes `(i - h) / h` of bounded values `(..., len(levels))`,
        both float32 `(n, len(levels))`; `(i - h) / h` is one rounding, so codes are the closest floats to the exact
        grid values. `reuse_input=True` lets the level indices overwrite `bounded`."""
        flat = bounded.detach().reshape(-1, self.codebook_dim)
        # `bounded + 1` in the input's own dtype, exactly as the formula is written; float32 from there on.
        shifted = flat.add_(1) if reuse_input else flat + 1
        level_indices = shifted.float().contiguous()
        codes = torch.empty_like(level_indices)
        for (levels, grid), half_width in self._tiled_blocks(level_indices, codes):
            levels.mul_(half_width).add_(0.5).floor_()
            torch.sub(levels, half_width, out=grid).div_(half_width)
        return level_indices, codes

    def _grid_code_tables(self, device: torch.device) -> tuple[torch.Tensor, list[tuple]]:
        """Codes of the grid, per group of consecutive dimensions: one `(sum of group sizes, len(levels))` table in
        which group `g` holds, at rows `offset_g + j`, the codes of its own dimensions for sub-index `j` and zeros
        elsewhere; plus `(size_g, offset_g, divider of the next group's basis or None)` per group. The code of index
        `i` is the sum over groups of the row `offset_g + (i // basis_g) % size_g`: one gather per group instead of
        one division per dimension, and exactly the arithmetic grid (adding zeros is exact). Cached per device."""
        cached = self._grid_code_tables_cache.get(device)
        if cached is not None:
            return cached
        bounds, start = [], 0
        for end in range(1, self.codebook_dim + 1):
            if end == self.codebook_dim or math.prod(self.levels[start : end + 1]) > _MAX_GROUP_CODES:
                bounds.append((start, end))
                start = end
        half_width = (torch.tensor(self.levels, dtype=torch.float32, device=device) - 1) / 2
        index_bits = (self.codebook_size - 1).bit_length()
        tables, groups, offset = [], [], 0
        for start, end in bounds:
            size = math.prod(self.levels[start:end])
            sub_basis = torch.tensor([math.prod(self.levels[start:k]) for k in range(start, end)], device=device)
            sub_levels = torch.tensor(self.levels[start:end], device=device)
            level_indices = (torch.arange(size, device=device).unsqueeze(-1) // sub_basis) % sub_levels
            table = torch.zeros(size, self.codebook_dim, dtype=torch.float32, device=device)
            table[:, start:end] = (level_indices.float() - half_width[start:end]) / half_width[start:end]
            tables.append(table)
            next_divider = (
                _floor_divider(math.prod(self.levels[:end]), index_bits) if end < self.codebook_dim else None
            )
            groups.append((size, offset, next_divider))
            offset += size
        cached = (torch.cat(tables), groups)
        self._grid_code_tables_cache[device] = cached
        return cached

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes `(..., len(levels))` on the grid (values in [-1, 1]) to indices `(...)` (int64)."""
        if codes.shape[-1] != self.codebook_dim:
            raise ValueError(
                f"`codes` must have {self.codebook_dim} values in its last dimension, one per FSQ level "
                f"(got shape {tuple(codes.shape)})."
            )
        with _float32_region(codes.device.type):
            # round((c + 1) * h), blockwise as in `_round_to_grid`.
            level_indices = (codes.detach().float().reshape(-1, self.codebook_dim) + 1).contiguous()
            for (levels,), half_width in self._tiled_blocks(level_indices):
                levels.mul_(half_width).round_()
            return self._level_indices_to_index(level_indices).reshape(codes.shape[:-1])

    def indices_to_level_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices `(...)` to per-dimension level indices `(..., len(levels))` in `{0, ..., L - 1}`."""
        return (indices.long().unsqueeze(-1) // self._basis) % self._levels

    def indices_to_codes(self, indices: torch.Tensor, project_out: bool = True) -> torch.Tensor:
        """Indices `(...)` to codes: `(..., len(levels))` on the grid, or `(..., dim)` after `project_out`."""
        _check_indices(indices, self.codebook_size)
        with _float32_region(indices.device.type):
            table, groups = self._grid_code_tables(indices.device)
            flat = indices.reshape(-1).long()
            quotient, rows = flat, []  # quotient: index // basis of the current group
            for size, offset, next_divider in groups:
                if next_divider is None:  # the last group: indices < codebook_size, so no modulo
                    row = quotient
                else:
                    next_quotient = _floor_divide(flat, next_divider)
                    row = quotient - next_quotient * size  # == quotient % size
                    quotient = next_quotient
                rows.append(row + offset if offset else row)
            if len(rows) == 1:
                codes = F.embedding(rows[0], table)
            else:
                codes = F.embedding_bag(torch.stack(rows, dim=1), table, mode="sum")
            codes = codes.view(*indices.shape, self.codebook_dim)
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
        needs_graph = torch.is_grad_enabled() and bounded.requires_grad
        # Without a graph the fresh tanh output is not needed again, so it becomes the level-index buffer.
        level_indices, codes = self._round_to_grid(bounded, reuse_input=not needs_graph)
        codes = codes.view(z.shape)
        if needs_graph:
            codes = bounded + (codes - bounded).detach()
        return codes, self._level_indices_to_index(level_indices).reshape(z.shape[:-1])

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


class VQRAEVectorQuantizer(_Float32Module):
    """Vector quantization with a learned codebook (van den Oord et al., 2017, "Neural Discrete Representation
    Learning"): nearest code by L2 distance, codebook loss `||sg(z) - e||^2` plus commitment loss
    `commitment_cost * ||z - sg(e)||^2`, straight-through gradients to `z`.

    With `use_simvq=True` the codebook is SimVQ's reparameterisation (Zhu et al., 2024, "Addressing Representation
    Collapse in Vector Quantized Models with One Linear Layer"), the setting of the VQRAE paper: a frozen random
    Gaussian codebook `C` times a learned linear map `W` (initialised to the identity, so the codes start as `C`),
    so every code moves with every update. The effective codebook `C W^T` is computed once per weight update
    outside training (cached), not on every `indices_to_codes` call.

    Two options against a codebook collapsing onto a few codes (restarts, on in VQRAEConfig, are measured in
    BENCHMARKS.md sections 6 and 6b; cosine lookup is off by default and not benchmarked there):

    - `cosine_lookup`: the latents and the codes are l2-normalised before the search, so the nearest code is the one
      of the closest direction and no code is out of reach for its norm (Yu et al., 2022, "Vector-quantized Image
      Modeling with Improved VQGAN").
    - `restart_unused_steps`: a usage counter (the buffer `steps_unused`, saved with the weights) counts the
      training forward passes since each code was last chosen; a code unused for that many passes is restarted at
      a latent of the current batch (Dhariwal et al., 2020, "Jukebox"; Zeghidour et al., 2021, "SoundStream").
      A new quantizer starts with every code counted unused, so the first training batch initialises the whole
      codebook from encoder outputs. Under `torch.distributed` the usage is summed over processes and the
      replacement latents come from process 0, so every process keeps the same codebook. For SimVQ, the restarted
      rows of `C` are solved for so that `C W^T` holds the latents.

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
        cosine_lookup (`bool`, *optional*, defaults to `False`): l2-normalised latents and codes.
        restart_unused_steps (`int`, *optional*, defaults to 0): restart a code unused for this many training
            forward passes (0: never, and no initialisation from data).
        project_out (`bool`, *optional*, defaults to `True`): map the codes back to `dim`; `False` hands on the
            `codebook_dim`-wide codes themselves.
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
        cosine_lookup: bool = False,
        restart_unused_steps: int = 0,
        project_out: bool = True,
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
        if (
            not isinstance(restart_unused_steps, int)
            or isinstance(restart_unused_steps, bool)
            or restart_unused_steps < 0
        ):
            raise ValueError(f"`restart_unused_steps` must be an integer >= 0 (got {restart_unused_steps!r}).")
        if not isinstance(max_distance_elements, int) or max_distance_elements < 1:
            raise ValueError(f"`max_distance_elements` must be a positive integer (got {max_distance_elements!r}).")
        self.num_embeddings = num_embeddings
        self.codebook_size = num_embeddings
        self.dim = dim
        self.codebook_dim = codebook_dim
        self.commitment_cost = float(commitment_cost)
        self.use_simvq = bool(use_simvq)
        self.cosine_lookup = bool(cosine_lookup)
        self.restart_unused_steps = restart_unused_steps
        self.max_distance_elements = max_distance_elements

        needs_projection = dim != codebook_dim
        self.project_in = nn.Linear(dim, codebook_dim) if needs_projection else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if needs_projection and project_out else nn.Identity()
        self.output_dim = dim if project_out else codebook_dim
        if self.use_simvq:
            # Saved with the weights (persistent) so a reloaded model has the very same codebook.
            self.register_buffer("frozen_codebook", torch.randn(num_embeddings, codebook_dim) * codebook_dim**-0.5)
            self.codebook_transform = nn.Linear(codebook_dim, codebook_dim, bias=False)
            nn.init.eye_(self.codebook_transform.weight)
            self.embedding = None
        else:
            self.embedding = nn.Embedding(num_embeddings, codebook_dim)
            self.codebook_transform = None
        # Training forward passes since each code was last chosen; every code starts unused, so the first training
        # batch initialises the codebook (when restarts are on). Saved with the weights: a resumed or fine-tuned
        # model keeps its counts.
        self.register_buffer("steps_unused", torch.full((num_embeddings,), restart_unused_steps, dtype=torch.int64))
        self._codebook_cache: tuple | None = None

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, dim={self.dim}, codebook_dim={self.codebook_dim}, "
            f"use_simvq={self.use_simvq}, cosine_lookup={self.cosine_lookup}, "
            f"restart_unused_steps={self.restart_unused_steps}"
        )

    @property
    def codebook(self) -> torch.Tensor:
        """The effective codebook, `(num_embeddings, codebook_dim)` (l2-normalised rows with `cosine_lookup`).
        Outside autograd it is computed once per weight update and cached (SimVQ's `C W^T` is a 16384 x D x D
        product, cosine lookup normalises every row)."""
        if torch.is_grad_enabled():
            return self._compute_codebook()
        tensors = [self.frozen_codebook, self.codebook_transform.weight] if self.use_simvq else [self.embedding.weight]
        key = tuple((tensor.data_ptr(), tensor._version, tensor.device, tensor.dtype) for tensor in tensors)
        if self._codebook_cache is None or self._codebook_cache[0] != key:
            self._codebook_cache = (key, self._compute_codebook())
        return self._codebook_cache[1]

    def _compute_codebook(self) -> torch.Tensor:
        codebook = self.codebook_transform(self.frozen_codebook) if self.use_simvq else self.embedding.weight
        return F.normalize(codebook.float(), dim=-1) if self.cosine_lookup else codebook

    @torch.no_grad()
    def nearest_indices(self, vectors: torch.Tensor, codebook: torch.Tensor | None = None) -> torch.Tensor:
        """Index of the nearest code (L2) for each row of `vectors` `(n, codebook_dim)`, in bounded-memory chunks.
        With `cosine_lookup`, pass normalised vectors (as `forward` does): the nearest code is then the closest in
        angle."""
        codebook = (self.codebook if codebook is None else codebook).float()
        vectors = vectors.float()
        # argmin ||x - e||^2 = argmin (||e||^2 - 2 x.e): the ||x||^2 term is the same for every code.
        # Row blocks of at most `max_distance_elements` numbers: `codebook.pow(2)` at once would be a temporary as
        # large as the codebook (96 MiB for 16384 x 1536), more than one chunk's distance matrix.
        rows = max(1, self.max_distance_elements // codebook.shape[1])
        codebook_sq = torch.cat([block.pow(2).sum(dim=1) for block in codebook.split(rows)])
        codebook_t = codebook.t()
        chunk = max(1, self.max_distance_elements // self.num_embeddings)
        indices = torch.empty(vectors.shape[0], dtype=torch.int64, device=vectors.device)
        # One distance buffer for every chunk: a fresh 64 MiB matrix per chunk is page-faulted in again each time.
        buffer = vectors.new_empty(min(chunk, vectors.shape[0]), codebook.shape[0])
        for start in range(0, vectors.shape[0], chunk):
            block = vectors[start : start + chunk]
            distances = torch.addmm(codebook_sq, block, codebook_t, beta=1.0, alpha=-2.0, out=buffer[: block.shape[0]])
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

    @torch.no_grad()
    def restart_unused_codes(self, latents: torch.Tensor) -> int:
        """Move every code unused for `restart_unused_steps` training passes to a latent of `latents`
        `(n, codebook_dim)`, drawn at random (with replacement when there are fewer latents than such codes), and
        reset its count. Returns the number of codes restarted."""
        dead = self.steps_unused >= self.restart_unused_steps
        count = int(dead.sum())
        if count == 0:
            return 0
        picks = torch.randint(latents.shape[0], (count,), device=latents.device)
        replacements = latents[picks].float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(replacements, src=0)  # the same codebook on every process
        if self.use_simvq:
            # Rows X of the frozen codebook with X W^T = replacements: solve W X^T = replacements^T.
            weight = self.codebook_transform.weight.float()
            rows = torch.linalg.lstsq(weight, replacements.t()).solution.t()
            self.frozen_codebook[dead] = rows.to(self.frozen_codebook.dtype)
        else:
            self.embedding.weight[dead] = replacements.to(self.embedding.weight.dtype)
        self.steps_unused[dead] = 0
        return count

    @torch.no_grad()
    def _count_usage(self, indices: torch.Tensor) -> None:
        used = torch.zeros(self.num_embeddings, dtype=torch.int64, device=indices.device)
        used.index_fill_(0, indices, 1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(used)
        self.steps_unused.add_(1).masked_fill_(used > 0, 0)

    def forward(self, z: torch.Tensor) -> VQRAEQuantizerOutput:
        """Quantize `z` of shape `(..., dim)`. In training mode, with `restart_unused_steps`, first restart the
        codes unused for that long, then count this pass's usage."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"The quantizer expects vectors of width {self.dim} (got shape {tuple(z.shape)}).")
        with _float32_region(z.device.type):
            latents = self.project_in(z.float())
            if self.cosine_lookup:
                latents = F.normalize(latents, dim=-1)
            flat = latents.reshape(-1, self.codebook_dim)
            restarting = self.training and self.restart_unused_steps > 0
            if restarting:
                self.restart_unused_codes(flat.detach())
            codebook = self.codebook.float()
            indices = self.nearest_indices(flat.detach(), codebook.detach())
            if restarting:
                self._count_usage(indices)
            codes = F.embedding(indices, codebook).view_as(latents)
            loss = F.mse_loss(codes, latents.detach()) + self.commitment_cost * F.mse_loss(latents, codes.detach())
            if torch.is_grad_enabled():
                # Straight-through: the decoder's gradient reaches `z`; the codebook learns from `loss` alone. Written
                # as codes + (latents - latents) so the forward value is exactly the code, even for huge latents.
                codes = codes.detach() + (latents - latents.detach())
            quantized = self.project_out(codes)
        return VQRAEQuantizerOutput(quantized=quantized, indices=indices.view(latents.shape[:-1]), loss=loss)
