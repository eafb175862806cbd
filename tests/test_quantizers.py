"""FSQ and VQ quantizers: the exact grid, the oracle, float32 under autocast, chunked search, losses."""

import itertools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vqrae import VQRAEFSQuantizer, VQRAEVectorQuantizer, codebook_statistics

LEVELS = [8, 8, 8, 5, 5, 5]


def expected_grid(levels):
    """Per DESIGN.md: L levels -> {-(L-1)/2 .. (L-1)/2} / ((L-1)/2), first dimension least significant."""
    per_dim = [[(i - (L - 1) / 2) / ((L - 1) / 2) for i in range(L)] for L in levels]
    # itertools.product varies the last factor fastest; reverse so the first dimension varies fastest.
    return torch.tensor([list(reversed(c)) for c in itertools.product(*reversed(per_dim))], dtype=torch.float32)


def test_codebook_size_and_grid_values():
    fsq = VQRAEFSQuantizer(LEVELS, dim=len(LEVELS))
    assert fsq.codebook_size == 64000
    assert isinstance(fsq.project_in, torch.nn.Identity) and isinstance(fsq.project_out, torch.nn.Identity)
    codes = fsq.implicit_codebook()
    assert codes.shape == (64000, 6)
    torch.testing.assert_close(codes, expected_grid(LEVELS), rtol=0, atol=0)
    # L=8: -3.5 .. 3.5 scaled by 3.5; L=5: -2 .. 2 scaled by 2. Symmetric, in [-1, 1].
    eight = torch.tensor([v / 3.5 for v in (-3.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5)], dtype=torch.float32)
    assert sorted(set(codes[:, 0].tolist())) == eight.tolist()
    assert sorted(set(codes[:, 5].tolist())) == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert len({tuple(row) for row in codes.tolist()}) == 64000
    indices = torch.arange(64000)
    assert torch.equal(fsq.codes_to_indices(codes), indices)
    # The forward pass on a code's atanh lands on that code's index.
    z = torch.atanh(codes.clamp(-0.999999, 0.999999))
    out = fsq(z)
    assert torch.equal(out.indices, indices)
    assert out.indices.dtype == torch.int64


def test_first_dimension_is_least_significant():
    fsq = VQRAEFSQuantizer([8, 5], dim=2)
    assert fsq.indices_to_level_indices(torch.tensor([1, 8])).tolist() == [[1, 0], [0, 1]]


@pytest.mark.parametrize("levels", [LEVELS, [8, 8, 8], [2, 3, 4], [7, 5, 5, 5, 5]])
def test_indices_agree_with_vector_quantize_pytorch(levels):
    import vector_quantize_pytorch as vqp  # a test dependency: missing, it must fail, not skip

    torch.manual_seed(0)
    oracle = vqp.FSQ(levels=levels, dim=len(levels), preserve_symmetry=True)
    ours = VQRAEFSQuantizer(levels, dim=len(levels))
    z = torch.randn(4, 1000, len(levels)) * 2
    expected_codes, expected_indices = oracle(z)
    out = ours(z)
    assert torch.equal(out.indices, expected_indices.long())
    torch.testing.assert_close(out.quantized, expected_codes, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.lookup(out.indices), oracle.indices_to_codes(expected_indices))


def _rounding_boundaries(levels) -> torch.Tensor:
    """Float32 inputs whose tanh lies on or within 4 floats of a rounding boundary of any dimension (where
    `(tanh(z) + 1) * h + 1/2` is an integer), each value in every dimension, plus 0, +-inf and huge values."""
    values = [torch.tensor([0.0, -0.0, math.inf, -math.inf, 1e30, -1e30, 20.0, -20.0])]
    for L in set(levels):
        h = (L - 1) / 2
        edges = torch.tensor([(m - 0.5) / h - 1 for m in range(1, L)], dtype=torch.float32)
        for step in range(-4, 5):
            shifted = edges
            for _ in range(abs(step)):
                shifted = torch.nextafter(shifted, torch.tensor(math.copysign(2.0, step)))
            z = torch.atanh(shifted)
            values += [z, torch.nextafter(z, torch.tensor(math.inf)), torch.nextafter(z, torch.tensor(-math.inf))]
    column = torch.cat(values)
    return column.unsqueeze(-1).expand(-1, len(levels)).roll(shifts=1, dims=0).clone()


def _every_value(dtype) -> torch.Tensor:
    """Every finite value of a 16-bit float type."""
    values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    return values[torch.isfinite(values)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("levels", [LEVELS, [2, 3, 4], [7, 5, 5, 5, 5], [16, 16]])
def test_indices_and_codes_at_rounding_boundaries(levels, dtype):
    """Identical indices to vector-quantize-pytorch, and codes exactly on the grid, for inputs on and next to every
    rounding boundary (float32) and for every finite bf16 / fp16 value in each dimension: the quantizer rounds in
    float32 whatever dtype comes in."""
    import vector_quantize_pytorch as vqp

    oracle = vqp.FSQ(levels=levels, dim=len(levels), preserve_symmetry=True)
    ours = VQRAEFSQuantizer(levels, dim=len(levels))
    if dtype == torch.float32:
        z = torch.cat([_rounding_boundaries(levels), torch.randn(20000, len(levels)) * 3])
    else:
        column = _every_value(dtype)
        z = torch.stack([column.roll(shifts=97 * k) for k in range(len(levels))], dim=-1)
    z = z.unsqueeze(0)  # (batch, tokens, dim), as the oracle takes it
    with torch.no_grad():
        out = ours(z)
        _, expected_indices = oracle(z)
    assert out.quantized.dtype == torch.float32
    assert torch.equal(out.indices, expected_indices.long())
    level_indices = ours.indices_to_level_indices(out.indices).double()
    half_width = (torch.tensor(levels, dtype=torch.float64) - 1) / 2
    grid = ((level_indices - half_width) / half_width).float()
    assert torch.equal(out.quantized, grid)
    assert torch.equal(ours.lookup(out.indices), grid)
    assert torch.equal(ours.codes_to_indices(grid), out.indices)


def test_projection_and_shapes():
    torch.manual_seed(0)
    fsq = VQRAEFSQuantizer(LEVELS, dim=32)
    assert isinstance(fsq.project_in, torch.nn.Linear) and fsq.project_in.in_features == 32
    z = torch.randn(2, 5, 7, 32, requires_grad=True)
    out = fsq(z)
    assert out.quantized.shape == (2, 5, 7, 32)
    assert out.indices.shape == (2, 5, 7) and out.indices.dtype == torch.int64
    assert out.loss.item() == 0.0
    torch.testing.assert_close(fsq.lookup(out.indices), out.quantized, atol=1e-6, rtol=0)
    assert fsq.lookup(out.indices, project_out=False).shape == (2, 5, 7, 6)
    out.quantized.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # straight-through gradients reach the input


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fsq_noise_substitution_in_training_only(dtype):
    """`noise_probability`: in training, about that share of tokens reaches the decoder as `tanh(z)` plus noise
    within half a level step (off the grid), the rest as the rounded codes; the indices are the rounded ones either
    way, the gradient is `tanh`'s for both, and in eval mode nothing changes."""
    torch.manual_seed(0)
    plain = VQRAEFSQuantizer(LEVELS, dim=48, project_out=False)
    noisy = VQRAEFSQuantizer(LEVELS, dim=48, project_out=False, noise_probability=0.25)
    noisy.load_state_dict(plain.state_dict())
    z = torch.randn(64, 32, 48).to(dtype)
    reference = plain(z)
    noisy.eval()
    evaluated = noisy(z)
    assert torch.equal(evaluated.quantized, reference.quantized) and torch.equal(evaluated.indices, reference.indices)

    noisy.train()
    z = z.requires_grad_()
    out = noisy(z)
    assert out.quantized.dtype == torch.float32
    assert torch.equal(out.indices, reference.indices)
    on_grid = (out.quantized == reference.quantized).all(dim=-1)
    substituted = ~on_grid
    assert 0.2 < substituted.float().mean().item() < 0.3  # 2048 tokens: 0.25 +- 0.05 is > 5 standard deviations
    bounded = torch.tanh(noisy.project_in(z.float()))
    step = 1 / noisy._half_width
    offset = (out.quantized - bounded)[substituted]
    assert (offset.abs() <= step / 2 + 1e-6).all()
    assert offset.abs().max() > 0.45 * step.min()  # spread over the step, not a rounding in disguise
    torch.testing.assert_close(out.quantized[on_grid], reference.quantized[on_grid], rtol=0, atol=0)
    # The same gradient as the rounded codes': that of tanh (straight-through), whichever way a token went.
    (grad,) = torch.autograd.grad(out.quantized.sum(), z)
    (expected,) = torch.autograd.grad(torch.tanh(noisy.project_in(z.float())).sum(), z)
    torch.testing.assert_close(grad, expected)


def test_fsq_is_float32_under_bf16_autocast():
    torch.manual_seed(0)
    fsq = VQRAEFSQuantizer(LEVELS, dim=48)
    z = torch.randn(4096, 48)
    reference = fsq(z).indices
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fsq(z)
        # What the quantizer would compute if autocast reached its projection: bf16 matmul, other indices.
        bf16_projection = fsq.project_in(z)
    assert out.quantized.dtype == torch.float32
    assert torch.equal(out.indices, reference)
    assert bf16_projection.dtype == torch.bfloat16
    assert not torch.equal(fsq.quantize(bf16_projection.float())[1], reference)  # the comparison has power
    # Indices above 256 survive (bf16 could not represent them exactly).
    assert reference.max() > 256


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantizers_keep_float32_weights_when_cast(dtype):
    torch.manual_seed(0)
    for quantizer in (
        VQRAEFSQuantizer(LEVELS, dim=48),
        VQRAEVectorQuantizer(num_embeddings=300, dim=48, codebook_dim=8),
        VQRAEVectorQuantizer(num_embeddings=300, dim=48, codebook_dim=8, use_simvq=True),
    ):
        before = {name: tensor.clone() for name, tensor in quantizer.state_dict().items()}
        z = torch.randn(2048, 48).to(dtype)
        reference = quantizer(z.float())
        quantizer.to(dtype)
        # Moved, not rounded: every float32 tensor is bit-identical after the cast.
        for name, tensor in quantizer.state_dict().items():
            assert tensor.dtype == before[name].dtype and torch.equal(tensor, before[name]), name
        with torch.no_grad():
            out = quantizer(z)
            assert torch.equal(quantizer.lookup(out.indices), quantizer(z.float()).quantized)
        assert out.quantized.dtype == torch.float32
        assert torch.equal(out.indices, reference.indices)
    # Without float32 weights the indices of a cast quantizer would differ (the test above has power).
    fsq = VQRAEFSQuantizer(LEVELS, dim=48)
    projection = torch.nn.Linear(48, 6).to(dtype)
    projection.load_state_dict({k: v.to(dtype) for k, v in fsq.project_in.state_dict().items()})
    z = torch.randn(2048, 48)
    assert not torch.equal(fsq.quantize(projection(z.to(dtype)).float())[1], fsq(z.to(dtype)).indices)


class _TensorSizes(TorchDispatchMode):
    """Records the shape of every tensor that any torch operation returns while it is active (factories such as
    `arange`, views, in-place results, backward ops): a real record of what was allocated, whatever the code path."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in torch.utils._pytree.tree_leaves(out):
            if isinstance(value, torch.Tensor):
                self.shapes.append((str(func), tuple(value.shape)))
        return out

    def codebook_sized(self, codebook_size: int) -> list[tuple[str, tuple[int, ...]]]:
        """The recorded tensors with `codebook_size` or more elements, or a dimension of `codebook_size`."""
        return [(op, size) for op, size in self.shapes if math.prod(size) >= codebook_size or codebook_size in size]


def test_fsq_does_not_materialise_codebook():
    fsq = VQRAEFSQuantizer(LEVELS, dim=32)  # a fresh quantizer: its lookup tables are built inside the recording
    z = torch.randn(10, 32, requires_grad=True)
    with _TensorSizes() as recorded:
        out = fsq(z)
        out.quantized.sum().backward()
        codes = fsq.lookup(out.indices)
        with torch.no_grad():
            fsq(z)
    assert recorded.shapes and codes.shape == (10, 32)
    assert recorded.codebook_sized(fsq.codebook_size) == [], "a codebook-sized tensor was allocated"
    assert not any(buffer.numel() >= fsq.codebook_size for buffer in fsq.buffers())
    # The recording sees a codebook built by the same code path (`implicit_codebook` is `lookup` of every
    # index), so a lookup written as `implicit_codebook()[indices]` would fail the assertion above.
    with _TensorSizes() as recorded:
        fsq.implicit_codebook()
    assert (fsq.codebook_size, 6) in [shape for _, shape in recorded.codebook_sized(fsq.codebook_size)]


@pytest.mark.parametrize("use_simvq", [False, True])
def test_vq_nearest_neighbour_and_losses(use_simvq):
    torch.manual_seed(0)
    vq = VQRAEVectorQuantizer(num_embeddings=50, dim=16, codebook_dim=8, use_simvq=use_simvq)
    z = torch.randn(3, 10, 16, requires_grad=True)
    out = vq(z)
    assert out.indices.shape == (3, 10) and out.indices.dtype == torch.int64
    latents = vq.project_in(z).reshape(-1, 8)
    expected = torch.cdist(latents, vq.codebook).argmin(dim=1)
    assert torch.equal(out.indices.reshape(-1), expected)
    codes = vq.codebook[out.indices]
    expected_loss = (1 + 0.25) * torch.mean((latents.reshape(3, 10, 8) - codes) ** 2)
    torch.testing.assert_close(out.loss, expected_loss)
    (out.quantized.sum() + out.loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    learned = vq.codebook_transform.weight if use_simvq else vq.embedding.weight
    assert learned.grad is not None and learned.grad.abs().sum() > 0
    if use_simvq:
        assert not any(p is vq.frozen_codebook for p in vq.parameters())
    with torch.no_grad():
        torch.testing.assert_close(vq.lookup(out.indices), vq(z).quantized)


def test_vq_search_is_chunked_and_exact():
    torch.manual_seed(0)
    vq = VQRAEVectorQuantizer(num_embeddings=1000, dim=24, max_distance_elements=5000)
    vectors = torch.randn(333, 24)
    chunked = vq.nearest_indices(vectors)
    full = torch.cdist(vectors, vq.codebook.detach()).argmin(dim=1)
    assert torch.equal(chunked, full)


def test_vq_search_memory_is_bounded(monkeypatch):
    """A 16384-code codebook against 64 x 256 tokens never builds the full 16384 x 16384 distance matrix."""
    vq = VQRAEVectorQuantizer(num_embeddings=16384, dim=64)
    largest = []
    real_addmm = torch.addmm

    def recording_addmm(*args, **kwargs):
        result = real_addmm(*args, **kwargs)
        largest.append(result.numel())
        return result

    monkeypatch.setattr(torch, "addmm", recording_addmm)
    vq.nearest_indices(torch.randn(64 * 256, 64))
    assert largest and max(largest) <= vq.max_distance_elements
    assert len(largest) > 1


def test_codebook_statistics():
    stats = codebook_statistics(torch.tensor([0, 0, 1, 1]), codebook_size=8)
    assert stats["used_codes"] == 2 and stats["utilization"] == 0.25
    assert math.isclose(stats["perplexity"], 2.0, rel_tol=1e-9)
    uniform = codebook_statistics(torch.arange(16).repeat(3), codebook_size=16)
    assert uniform["utilization"] == 1.0 and math.isclose(uniform["perplexity"], 16.0, rel_tol=1e-9)


def test_quantizer_bad_indices():
    fsq = VQRAEFSQuantizer([8, 8, 8], dim=3)
    with pytest.raises(TypeError, match="must hold integers"):
        fsq.lookup(torch.zeros(3))
    with pytest.raises(ValueError, match=r"must lie in \[0, 512\)"):
        fsq.lookup(torch.tensor([0, 512]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 512\)"):
        fsq.lookup(torch.tensor([-1]))
