"""Quantizers for VQRAE: finite scalar quantization (FSQ) and a learned vector-quantized codebook (VQ).

This file depends on torch only, so it can travel with a model to the Hub and be used on its own.

Both quantizers share one surface: ``forward(z)`` returns a :class:`VQRAEQuantizerOutput` with the
straight-through ``quantized`` vectors (``output_dim`` wide: the width of ``z``, or the codes' own width for a
quantizer built with ``project_out=False``), the integer ``indices`` and a scalar ``loss``;
``lookup(indices)`` maps indices `(...)` back to vectors `(..., output_dim)`; ``codebook_size`` counts the codes.
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


def _linear_float32(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` in float32 whatever dtype `layer`'s weights arrive in: FSDP's mixed precision hands the forward
    bf16 copies of every parameter, `_Float32Module` notwithstanding. For float32 weights this is `layer(x)` itself
    (`.float()` of a float32 tensor is the tensor)."""
    if isinstance(layer, nn.Identity):
        return x.float()
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


def _check_indices(indices: torch.Tensor, codebook_size: int) -> None:
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"`indices` must be a torch.Tensor of integers (got {type(indices).__name__}).")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"`indices` must hold integers (torch.int32 or torch.int64), got dtype {indices.dtype}.")
    if indices.numel() == 0 or torch.compiler.is_compiling():  # the range check reads values: not traceable
        return
    low, high = (int(value) for value in torch.aminmax(indices))
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


class VQRAEFSQuantizer(_Float32Module):
    """Finite scalar quantization with an implicit codebook (Mentzer et al., 2023, "Finite Scalar Quantization:
    VQ-VAE Made Simple"), in the symmetric form used by NVIDIA Cosmos-Tokenizer.

    A dimension with `L` levels is bounded by `tanh` and rounded to one of `L` evenly spaced values in [-1, 1]:
    with `h = (L - 1) / 2`, level index `i = floor((tanh(z) + 1) * h + 1/2)` (round half up) and code `(i - h) / h`
    (one rounding: the closest float to the exact grid value). The index of a token is `sum_k i_k * basis_k` with
    `basis = cumprod([1] + levels[:-1])`: the first dimension is the least significant, as in Cosmos-Tokenizer and
    vector-quantize-pytorch (`FSQ(preserve_symmetry=True)`), whose indices these are. The codebook (`prod(levels)`
    codes) is never built unless :meth:`implicit_codebook` is called.

    The arguments are the values `VQRAEConfig` has validated (`fsq_levels`, the encoder width, and
    `post_quant_conv_on_codes`), which `VQRAEModel` builds the quantizer from; they are not checked again here.

    Args:
        levels (`list[int]`): number of levels per dimension, each >= 2.
        dim (`int`): width of the vectors to quantize. When it differs from `len(levels)`, `project_in`
            and `project_out` are learned `nn.Linear` maps; otherwise they are identities.
        project_out (`bool`, *optional*, defaults to `True`): map the codes back to `dim`. `False` hands on the
            grid codes themselves (`len(levels)` wide), for a model whose next layer reads them (Cosmos-Tokenizer's
            `post_quant_conv`).
        noise_probability (`float`, *optional*, defaults to 0.0): in training mode only, the chance that a token
            is not rounded but passed on as its bounded values plus uniform noise one level step wide (noise
            substitution: Ballé et al., 2017, "End-to-end Optimized Image Compression"), each token drawn
            independently. The decoder learns from values between the grid points too, and the encoder's gradient
            is the same either way (that of `tanh`). The indices are always the rounded ones; evaluation and
            inference always round.
    """

    def __init__(
        self, levels: list[int] | tuple[int, ...], dim: int, project_out: bool = True, noise_probability: float = 0.0
    ):
        super().__init__()
        self.levels = list(levels)
        self.dim = dim
        self.noise_probability = noise_probability
        self.codebook_dim = len(self.levels)
        self.codebook_size = math.prod(self.levels)
        for name, table in self.level_tables().items():
            self.register_buffer(name, table, persistent=False)

        needs_projection = dim != self.codebook_dim
        self.project_in = nn.Linear(dim, self.codebook_dim) if needs_projection else nn.Identity()
        self.project_out = nn.Linear(self.codebook_dim, dim) if needs_projection and project_out else nn.Identity()
        # The width of `quantized` and of `lookup` (with `project_out=True`).
        self.output_dim = dim if project_out else self.codebook_dim

    def level_tables(self) -> dict[str, torch.Tensor]:
        """The constant tables of the grid, kept as non-persistent buffers. A model loaded with
        `from_pretrained` is built on the meta device, so its `_init_weights` refills them from here."""
        return {
            "_levels": torch.tensor(self.levels, dtype=torch.int64),
            "_basis": torch.tensor([math.prod(self.levels[:i]) for i in range(len(self.levels))], dtype=torch.int64),
            # h = (L - 1) / 2: level index i <-> code (i - h) / h.
            "_half_width": (torch.tensor(self.levels, dtype=torch.float32) - 1) / 2,
        }

    def extra_repr(self) -> str:
        noise = f", noise_probability={self.noise_probability}" if self.noise_probability else ""
        return f"levels={self.levels}, dim={self.dim}, codebook_size={self.codebook_size}{noise}"

    def _check_width(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.shape[-1] != self.codebook_dim:
            raise ValueError(
                f"`{name}` must have {self.codebook_dim} values in its last dimension, one per FSQ level "
                f"(got shape {tuple(tensor.shape)})."
            )

    def _level_indices_to_codes(self, level_indices: torch.Tensor) -> torch.Tensor:
        return (level_indices.float() - self._half_width) / self._half_width

    def _level_indices_to_indices(self, level_indices: torch.Tensor) -> torch.Tensor:
        return (level_indices.long() * self._basis).sum(dim=-1)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes `(..., len(levels))` on the grid (values in [-1, 1]) to indices `(...)` (int64)."""
        self._check_width("codes", codes)
        with _float32_region(codes.device.type):
            return self._level_indices_to_indices(((codes.detach().float() + 1) * self._half_width).round())

    def indices_to_level_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices `(...)` to per-dimension level indices `(..., len(levels))` in `{0, ..., L - 1}`."""
        return (indices.long().unsqueeze(-1) // self._basis) % self._levels

    def lookup(self, indices: torch.Tensor, project_out: bool = True) -> torch.Tensor:
        """Indices `(...)` to codes: `(..., len(levels))` on the grid, or `(..., dim)` after `project_out`."""
        _check_indices(indices, self.codebook_size)
        with _float32_region(indices.device.type):
            codes = self._level_indices_to_codes(self.indices_to_level_indices(indices))
            return _linear_float32(self.project_out, codes) if project_out else codes

    def implicit_codebook(self) -> torch.Tensor:
        """All `codebook_size` codes, `(codebook_size, len(levels))`, in index order. Materialised on request."""
        return self.lookup(torch.arange(self.codebook_size, device=self._levels.device), project_out=False)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bound and round `z` `(..., len(levels))` in float32: returns straight-through codes and indices."""
        self._check_width("z", z)
        with _float32_region(z.device.type):
            bounded = torch.tanh(z.float())
            level_indices = torch.floor((bounded.detach() + 1) * self._half_width + 0.5)
            codes = self._level_indices_to_codes(level_indices)
            if torch.is_grad_enabled() and bounded.requires_grad:
                # Straight-through: the forward value of the code, the gradient of `tanh`.
                codes = bounded + (codes - bounded).detach()
            return codes, self._level_indices_to_indices(level_indices)

    def substitute_noise(self, z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """`codes` (the straight-through codes of `z`, `(..., len(levels))`) with each token replaced, with
        probability `noise_probability`, by `tanh(z)` plus noise uniform over one level step (`1 / h`) around it,
        in float32; the gradient is that of `tanh`, as for the rounded codes."""
        bounded = torch.tanh(z.float())
        noisy = bounded + (torch.rand_like(bounded) - 0.5) / self._half_width
        substituted = torch.rand(bounded.shape[:-1] + (1,), device=bounded.device) < self.noise_probability
        return torch.where(substituted, noisy, codes)

    def forward(self, z: torch.Tensor) -> VQRAEQuantizerOutput:
        """Quantize `z` of shape `(..., dim)`."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"The quantizer expects vectors of width {self.dim} (got shape {tuple(z.shape)}).")
        with _float32_region(z.device.type):
            projected = _linear_float32(self.project_in, z)
            codes, indices = self.quantize(projected)
            if self.training and self.noise_probability > 0:
                codes = self.substitute_noise(projected, codes)
            quantized = _linear_float32(self.project_out, codes)
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
    outside training (cached), not on every `lookup` call.

    Two options against a codebook collapsing onto a few codes (restarts are on in VQRAEConfig, cosine lookup off):

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

    The arguments but `max_distance_elements` are the values `VQRAEConfig` has validated (`num_embeddings`,
    `codebook_dim`, `commitment_cost`, `use_simvq`, `vq_cosine_lookup`, `vq_restart_unused_steps`, the encoder width),
    which `VQRAEModel` builds the quantizer from; they are not checked again here.

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
        codebook_dim = dim if codebook_dim is None else codebook_dim
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
        # (counts tensor, its version, restart_unused_steps, n): the next n training passes cannot find a code unused
        # for `restart_unused_steps`, so they skip reading the counts back (a host sync). Valid only while the counts
        # are that very tensor at that version (loading a state dict or editing them invalidates it).
        self._quiet_passes: tuple | None = None

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
        product, cosine lookup normalises every row). Traced (torch.compile / torch.export), it is computed: the
        cache is eager bookkeeping."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._compute_codebook()
        tensors = [self.frozen_codebook, self.codebook_transform.weight] if self.use_simvq else [self.embedding.weight]
        key = tuple((tensor.data_ptr(), tensor._version, tensor.device, tensor.dtype) for tensor in tensors)
        if self._codebook_cache is None or self._codebook_cache[0] != key:
            self._codebook_cache = (key, self._compute_codebook())
        return self._codebook_cache[1]

    def _compute_codebook(self) -> torch.Tensor:
        codebook = (
            _linear_float32(self.codebook_transform, self.frozen_codebook) if self.use_simvq else self.embedding.weight
        )
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
        if torch.compiler.is_compiling():  # a loop over the rows would fix the batch size of a traced graph
            return torch.addmm(codebook_sq, vectors, codebook_t, beta=1.0, alpha=-2.0).argmin(dim=1)
        chunk = max(1, self.max_distance_elements // self.num_embeddings)
        indices = torch.empty(vectors.shape[0], dtype=torch.int64, device=vectors.device)
        # One distance buffer for every chunk: a fresh 64 MiB matrix per chunk is page-faulted in again each time.
        buffer = vectors.new_empty(min(chunk, vectors.shape[0]), codebook.shape[0])
        for start in range(0, vectors.shape[0], chunk):
            block = vectors[start : start + chunk]
            distances = torch.addmm(codebook_sq, block, codebook_t, beta=1.0, alpha=-2.0, out=buffer[: block.shape[0]])
            indices[start : start + chunk] = distances.argmin(dim=1)
        return indices

    def lookup(self, indices: torch.Tensor, project_out: bool = True) -> torch.Tensor:
        """Indices `(...)` to codes `(..., codebook_dim)`, or `(..., dim)` after `project_out`."""
        _check_indices(indices, self.codebook_size)
        with _float32_region(indices.device.type):
            codes = F.embedding(indices.long(), self.codebook.float())
            if project_out:
                codes = _linear_float32(self.project_out, codes)
        return codes

    @torch.no_grad()
    def restart_unused_codes(self, latents: torch.Tensor) -> int:
        """Move every code unused for `restart_unused_steps` training passes to a latent of `latents`
        `(n, codebook_dim)`, drawn at random (with replacement when there are fewer latents than such codes), and
        reset its count. Returns the number of codes restarted."""
        dead = self.steps_unused >= self.restart_unused_steps
        # One host sync for both: the number of codes to restart, and the largest count left after the restart (how
        # many passes may follow before a code can be due: see `_restart_may_be_due`).
        count, kept_max = torch.stack([dead.sum(), self.steps_unused.masked_fill(dead, 0).max()]).tolist()
        self._quiet_passes = (
            self.steps_unused,
            None,
            self.restart_unused_steps,
            self.restart_unused_steps - 1 - kept_max,
        )
        if count == 0:
            return 0
        picks = torch.randint(latents.shape[0], (count,), device=latents.device)
        rows = latents[picks].float()
        if self.use_simvq:
            # Rows X of the frozen codebook with X W^T = replacements: solve W X^T = replacements^T.
            weight = self.codebook_transform.weight.float()
            rows = torch.linalg.lstsq(weight, rows.t()).solution.t().contiguous()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # The very same codebook on every process (the rows as solved, not only the latents: neither DDP nor FSDP
            # broadcasts the frozen codebook, and lstsq need not agree to the bit across devices).
            torch.distributed.broadcast(rows, src=0)
        target = self.frozen_codebook if self.use_simvq else self.embedding.weight
        target[dead] = rows.to(target.dtype)
        self.steps_unused[dead] = 0
        return count

    def _restart_may_be_due(self) -> bool:
        """Whether a code may have gone unused for `restart_unused_steps` passes. After a restart check, with the
        largest count left at m, each pass adds at most 1, so the next `restart_unused_steps - 1 - m` passes cannot
        find one: they skip the check and its host sync (every process skips the same passes: the counts agree)."""
        quiet = self._quiet_passes
        if (
            quiet is None
            or quiet[0] is not self.steps_unused
            or quiet[1] != self.steps_unused._version
            or quiet[2] != self.restart_unused_steps
            or quiet[3] <= 0
        ):
            return True
        self._quiet_passes = (*quiet[:3], quiet[3] - 1)
        return False

    @torch.no_grad()
    def _count_usage(self, indices: torch.Tensor) -> None:
        used = torch.zeros(self.num_embeddings, dtype=torch.int64, device=indices.device)
        used.index_fill_(0, indices, 1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(used)
        self.steps_unused.add_(1).masked_fill_(used > 0, 0)
        if self._quiet_passes is not None and self._quiet_passes[0] is self.steps_unused:
            self._quiet_passes = (self.steps_unused, self.steps_unused._version, *self._quiet_passes[2:])

    def forward(self, z: torch.Tensor) -> VQRAEQuantizerOutput:
        """Quantize `z` of shape `(..., dim)`. In training mode, with `restart_unused_steps`, first restart the
        codes unused for that long, then count this pass's usage."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"The quantizer expects vectors of width {self.dim} (got shape {tuple(z.shape)}).")
        with _float32_region(z.device.type):
            latents = _linear_float32(self.project_in, z)
            if self.cosine_lookup:
                latents = F.normalize(latents, dim=-1)
            flat = latents.reshape(-1, self.codebook_dim)
            restarting = self.training and self.restart_unused_steps > 0
            if restarting and self._restart_may_be_due():
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
            quantized = _linear_float32(self.project_out, codes)
        return VQRAEQuantizerOutput(quantized=quantized, indices=indices.view(latents.shape[:-1]), loss=loss)
