"""Property tests (hypothesis) for both quantizers: any valid levels list or codebook, any finite input.

FSQ: indices lie in [0, codebook_size), `codes_to_indices(lookup(i)) == i`, codes lie on the grid of
DESIGN.md (`2 i / (L - 1) - 1`), indices follow DESIGN.md's formula, and huge inputs (up to the float32 maximum)
give neither an error nor NaN. VQ: indices lie in [0, num_embeddings) and pick the nearest code, the returned
vectors are exactly the codes of the indices (also in training, for huge inputs), a code quantizes to its own index,
and +-1e30 inputs give no NaN. Examples are derandomised, so every run checks the same cases.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from vqrae import VQRAEFSQuantizer, VQRAEVectorQuantizer

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

levels_lists = st.lists(st.integers(min_value=2, max_value=16), min_size=1, max_size=8)
finite_float32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
huge = st.sampled_from([1e30, -1e30, 3.4e38, -3.4e38, 0.0, 1e-30])


@st.composite
def fsq_inputs(draw, elements=finite_float32):
    levels = draw(levels_lists)
    rows = draw(st.integers(min_value=1, max_value=16))
    z = draw(arrays(np.float32, (rows, len(levels)), elements=elements))
    return levels, torch.from_numpy(z)


def _grid_codes(level_indices: torch.Tensor, levels: list[int]) -> torch.Tensor:
    """DESIGN.md's codes `2 i / (L - 1) - 1`, computed in float64 and rounded once to float32."""
    widths = torch.tensor(levels, dtype=torch.float64) - 1
    return (2 * level_indices.double() / widths - 1).float()


def _design_level_indices(z: torch.Tensor, levels: list[int]) -> torch.Tensor:
    """DESIGN.md's level index `round((tanh(z) + 1) / 2 * (L - 1))`, in float64 (halves round up)."""
    scaled = (torch.tanh(z.double()) + 1) / 2 * (torch.tensor(levels, dtype=torch.float64) - 1)
    return torch.floor(scaled + 0.5), scaled


# ---------------------------------------------------------------------------------------------------------------
# FSQ
# ---------------------------------------------------------------------------------------------------------------


@SETTINGS
@given(fsq_inputs())
def test_fsq_indices_codes_and_grid(data):
    levels, z = data
    quantizer = VQRAEFSQuantizer(levels, dim=len(levels))
    output = quantizer(z)
    size = math.prod(levels)
    assert output.indices.dtype == torch.int64
    assert int(output.indices.min()) >= 0 and int(output.indices.max()) < size

    # The returned codes are the grid codes of the returned indices, and they lie on DESIGN.md's grid.
    level_indices = quantizer.indices_to_level_indices(output.indices)
    assert torch.equal(output.quantized, _grid_codes(level_indices, levels))
    assert torch.equal(quantizer.lookup(output.indices), output.quantized)
    assert torch.equal(quantizer.codes_to_indices(output.quantized), output.indices)

    # Indices follow DESIGN.md's formula (away from a rounding boundary, where float32 and float64 may differ).
    expected, scaled = _design_level_indices(z, levels)
    clear = ((scaled - scaled.floor() - 0.5).abs() > 1e-4).all(dim=-1)
    assert torch.equal(level_indices[clear], expected[clear].long())


@SETTINGS
@given(levels=levels_lists, data=st.data())
def test_fsq_indices_round_trip(levels, data):
    quantizer = VQRAEFSQuantizer(levels, dim=len(levels))
    size = math.prod(levels)
    picks = data.draw(st.lists(st.integers(min_value=0, max_value=size - 1), min_size=1, max_size=32))
    indices = torch.tensor(picks + [0, size - 1], dtype=torch.int64)
    codes = quantizer.lookup(indices)
    assert torch.equal(quantizer.codes_to_indices(codes), indices)
    assert codes.abs().max() <= 1
    if size <= 4096:  # the materialised codebook lists the same codes in index order
        assert torch.equal(quantizer.implicit_codebook()[indices], codes)


@SETTINGS
@given(fsq_inputs(elements=huge), st.integers(min_value=0, max_value=2**16), st.data())
def test_fsq_huge_inputs_neither_fail_nor_give_nan(data, seed, draw):
    levels, z = data
    output = VQRAEFSQuantizer(levels, dim=len(levels))(z)
    assert not torch.isnan(output.quantized).any()
    # +-huge saturates a dimension to its last or first level.
    level_indices = VQRAEFSQuantizer(levels, dim=len(levels)).indices_to_level_indices(output.indices)
    top = (torch.tensor(levels) - 1).expand_as(z)
    assert torch.equal(level_indices[z >= 1e30], top[z >= 1e30])
    assert (level_indices[z <= -1e30] == 0).all()

    # With a learned projection in front (inputs up to +-1e30: a projection of 3.4e38 overflows float32).
    projected = draw.draw(
        arrays(np.float32, (z.shape[0], len(levels) + 3), elements=huge.filter(lambda v: abs(v) <= 1e30))
    )
    torch.manual_seed(seed)
    output = VQRAEFSQuantizer(levels, dim=len(levels) + 3)(torch.from_numpy(projected))
    assert not torch.isnan(output.quantized).any()
    assert int(output.indices.min()) >= 0 and int(output.indices.max()) < math.prod(levels)


@SETTINGS
@given(fsq_inputs(elements=st.floats(-50, 50, width=32)))
def test_fsq_training_forward_matches_inference(data):
    levels, z = data
    quantizer = VQRAEFSQuantizer(levels, dim=len(levels))
    z = z.clone().requires_grad_(True)
    output = quantizer(z)
    with torch.no_grad():
        inference = quantizer(z)
    assert torch.equal(output.indices, inference.indices)
    assert torch.allclose(output.quantized, inference.quantized, atol=1e-6)
    output.quantized.sum().backward()
    assert torch.isfinite(z.grad).all()


# ---------------------------------------------------------------------------------------------------------------
# VQ
# ---------------------------------------------------------------------------------------------------------------


@st.composite
def vq_cases(draw, magnitude: float):
    num_embeddings = draw(st.integers(min_value=2, max_value=48))
    dim = draw(st.integers(min_value=1, max_value=8))
    codebook_dim = draw(st.one_of(st.none(), st.integers(min_value=1, max_value=8)))
    use_simvq = draw(st.booleans())
    seed = draw(st.integers(min_value=0, max_value=2**16))
    rows = draw(st.integers(min_value=1, max_value=12))
    bound = float(np.float32(magnitude))
    elements = st.floats(-bound, bound, width=32) | st.sampled_from([bound, -bound])
    z = torch.from_numpy(draw(arrays(np.float32, (rows, dim), elements=elements)))
    torch.manual_seed(seed)
    quantizer = VQRAEVectorQuantizer(num_embeddings, dim, codebook_dim=codebook_dim, use_simvq=use_simvq)
    return quantizer, z


@SETTINGS
@given(vq_cases(magnitude=1e30))
def test_vq_nearest_code_and_no_nan(case):
    quantizer, z = case
    with torch.no_grad():
        output = quantizer(z)
        codes = quantizer.lookup(output.indices)
        latents = quantizer.project_in(z).double()
        codebook = quantizer.codebook.double()
    assert int(output.indices.min()) >= 0 and int(output.indices.max()) < quantizer.num_embeddings
    assert not torch.isnan(output.quantized).any() and not torch.isnan(output.loss)
    assert torch.equal(output.quantized, codes)
    # The chosen code is the nearest one: float64 distances, up to the float32 rounding of the search, which
    # compares ||e||^2 - 2 x.e. The reference drops ||x||^2 too (the same for every code): at |x| ~ 1e16 it is
    # ~1e32, where float64's own spacing (~1e16) would hide the differences between codes.
    distances = codebook.pow(2).sum(dim=1) - 2 * latents @ codebook.T
    chosen = distances.gather(1, output.indices.view(-1, 1)).squeeze(1)
    best = distances.min(dim=1).values
    code_norm = codebook.norm(dim=1).max()
    rounding = 1e-5 * latents.shape[1] * (latents.norm(dim=1) * code_norm + code_norm**2)
    assert (chosen - best <= rounding).all()


@SETTINGS
@given(vq_cases(magnitude=1e30))
def test_vq_training_forward_gives_the_codes_exactly(case):
    quantizer, z = case
    z = z.clone().requires_grad_(True)
    output = quantizer(z)
    with torch.no_grad():
        codes = quantizer.lookup(output.indices)
    assert torch.equal(output.quantized.detach(), codes)
    assert not torch.isnan(output.loss)
    output.quantized.sum().backward()
    assert not torch.isnan(z.grad).any()


@SETTINGS
@given(
    st.integers(min_value=2, max_value=48), st.integers(min_value=2, max_value=8), st.booleans(), st.integers(0, 2**16)
)
def test_vq_code_quantizes_to_its_own_index(num_embeddings, dim, use_simvq, seed):
    torch.manual_seed(seed)
    quantizer = VQRAEVectorQuantizer(num_embeddings, dim, use_simvq=use_simvq)
    with torch.no_grad():
        codebook = quantizer.codebook
        gaps = torch.cdist(codebook, codebook) + torch.eye(num_embeddings) * 1e9
        assume(gaps.min() > 1e-2)
        indices = torch.arange(num_embeddings)
        assert torch.equal(quantizer(quantizer.lookup(indices)).indices, indices)


@pytest.mark.parametrize("value", [1e30, -1e30])
def test_vq_huge_uniform_input_picks_the_most_aligned_code(value):
    torch.manual_seed(0)
    quantizer = VQRAEVectorQuantizer(32, 6)
    with torch.no_grad():
        output = quantizer(torch.full((1, 6), value))
        alignment = quantizer.codebook.sum(dim=1) * math.copysign(1, value)
    assert int(output.indices) == int(alignment.argmax())
    assert torch.isfinite(output.quantized).all()
