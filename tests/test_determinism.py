"""Determinism: the same seed builds the same weights (also in a fresh interpreter), token indices do not depend on
the batch size or on the order of the images in a batch, and bf16 autocast gives the same indices as float32.

(Training determinism and kill/resume of training are tested with the training loop.)
"""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import SEED_PRESETS, tiny_config_kwargs, tiny_model

PRESETS = {
    **SEED_PRESETS,
    "vq": {"use_fsq": False, "num_embeddings": 256},
    "simvq": {"use_fsq": False, "num_embeddings": 256, "use_simvq": True, "codebook_dim": 8},
}


def _fingerprint(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _images(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, 32, 32, generator=generator) * 2 - 1


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_same_seed_same_weights(preset):
    first = _fingerprint(tiny_model(7, **PRESETS[preset]))
    tiny_model(8, **PRESETS[preset])  # another model in between changes nothing
    assert _fingerprint(tiny_model(7, **PRESETS[preset])) == first
    assert _fingerprint(tiny_model(8, **PRESETS[preset])) != first


def test_same_seed_same_weights_in_a_fresh_interpreter():
    # A fresh process with another hash seed: no hidden state (dict order, global RNG use at import) leaks in.
    script = textwrap.dedent(
        """
        import hashlib, json, sys
        import torch
        from vqrae import VQRAEConfig, VQRAEModel

        def fingerprint(model):
            digest = hashlib.sha256()
            for name, tensor in sorted(model.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().contiguous().numpy().tobytes())
            return digest.hexdigest()

        result = {}
        for name, kwargs in json.loads(sys.argv[1]).items():
            torch.manual_seed(7)
            result[name] = fingerprint(VQRAEModel(VQRAEConfig(**kwargs)))
        print(json.dumps(result))
        """
    )
    configs = {name: tiny_config_kwargs(**overrides) for name, overrides in PRESETS.items()}
    run = subprocess.run(
        [sys.executable, "-c", script, json.dumps(configs)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        timeout=300,
    )
    fresh = json.loads(run.stdout.strip().splitlines()[-1])
    assert fresh == {name: _fingerprint(tiny_model(7, **overrides)) for name, overrides in PRESETS.items()}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_indices_do_not_depend_on_batch_size_or_order(preset):
    model = tiny_model(0, **PRESETS[preset]).eval()
    images = _images(7)
    with torch.no_grad():
        together = model.encode(images).indices
        one_by_one = torch.cat([model.encode(image[None]).indices for image in images])
        in_pairs = torch.cat([model.encode(images[i : i + 2]).indices for i in range(0, 7, 2)])
        order = torch.randperm(7, generator=torch.Generator().manual_seed(1))
        shuffled = model.encode(images[order]).indices
        reconstruction = model.decode_from_indices(together).reconstruction
        reconstruction_alone = model.decode_from_indices(together[3:4]).reconstruction
    assert together.unique().numel() > 7  # the images give many different tokens: the comparison means something
    assert torch.equal(one_by_one, together)
    assert torch.equal(in_pairs, together)
    assert torch.equal(shuffled, together[order])
    torch.testing.assert_close(reconstruction_alone, reconstruction[3:4], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_bf16_autocast_gives_float32_indices(preset):
    model = tiny_model(0, **PRESETS[preset]).eval()
    grid = model.config.token_grid_size
    with torch.no_grad():
        features = model.get_image_features(_images(4, seed=2)).last_hidden_state
        reference = model.quantize(features, grid).indices
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = model.quantize(features, grid)
    # (A model whose weights are bf16: tests/test_dtypes.py.)
    assert torch.equal(under_autocast.indices, reference)
    if model.config.use_fsq:
        assert int(reference.max()) > 256  # beyond what bf16 can count exactly
