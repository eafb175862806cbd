"""A model in bf16 or fp16 works wherever float32 does: cast with `.to()`, loaded with `dtype=`, or built around a
bf16 encoder. The quantizer keeps float32 weights and arithmetic, so the FSQ indices of a bf16 model equal those of
the same model in float32 on the same features."""

import copy

import numpy as np
import pytest
import torch
from transformers import AutoModel, SiglipVisionConfig, SiglipVisionModel

import vqrae
from conftest import TINY_VISION, save_model, tiny_model

PRESETS = {
    "cosmos_fsq": {"fsq_levels": [8, 8, 8, 5, 5, 5], "use_post_quant_conv": True},
    "cosmos_fsq_3x3": {
        "fsq_levels": [8, 8, 8, 5, 5, 5],
        "use_post_quant_conv": True,
        "post_quant_conv_kernel_size": 3,
    },
    "standard_fsq": {"fsq_levels": [8, 8, 8], "normalize_codes": True},
    # The tiny preset's decoder: overlapping patches blended by F.fold, and the conv head.
    "blended_decoder": {"use_post_quant_conv": True, "decoder_patch_overlap": 3, "decoder_conv_head_channels": 8},
    "cosmos_on_codes": {"use_post_quant_conv": True, "post_quant_conv_on_codes": True},
    "vq": {"use_fsq": False, "num_embeddings": 256},
    "simvq": {"use_fsq": False, "num_embeddings": 256, "use_simvq": True, "codebook_dim": 8},
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _images(count=4, seed=0):
    return torch.rand(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _assert_quantizer_float32(model):
    for name, tensor in [*model.quantizer.named_parameters(), *model.quantizer.named_buffers()]:
        assert not tensor.is_floating_point() or tensor.dtype == torch.float32, name


def _assert_same_quantizer(model, reference):
    expected = reference.quantizer.state_dict()
    for name, tensor in model.quantizer.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def _train_step(model, dtype):
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    output = model(_images(2).to(dtype))
    loss = (output.reconstruction.float() - _images(2)).abs().mean() + output.quantizer_loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert {name.split(".")[0] for name in changed} >= {"encoder", "decoder"}


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_cast_model_encodes_decodes_and_trains(preset, dtype):
    dtype = DTYPES[dtype]
    reference = tiny_model(0, **PRESETS[preset]).eval()
    model = copy.deepcopy(reference).to(dtype)
    assert model.encoder.dtype == dtype and model.decoder.in_proj.weight.dtype == dtype
    _assert_quantizer_float32(model)
    # Moved, not rounded through bf16: the quantizer's weights are those of the float32 model bit for bit.
    _assert_same_quantizer(model, reference)
    with torch.no_grad():
        encoded = model.encode(_images().to(dtype))
        codes = model.indices_to_codes(encoded.indices)
        decoded = model.decode_from_indices(encoded.indices).reconstruction
        forward = model(_images().to(dtype))
    assert encoded.quantized.dtype == dtype and codes.dtype == dtype
    assert decoded.dtype == dtype and decoded.shape == (4, 3, 32, 32) and torch.isfinite(decoded).all()
    # Eval mode: decoding the indices is the forward pass.
    torch.testing.assert_close(forward.reconstruction, decoded)
    # The codes of a bf16 model are the float32 model's codes, rounded once to bf16.
    torch.testing.assert_close(codes, reference.indices_to_codes(encoded.indices).to(dtype), rtol=0, atol=0)
    _train_step(model, dtype)


@pytest.mark.parametrize("preset", ["cosmos_fsq", "standard_fsq"])
def test_bf16_model_gives_the_float32_models_fsq_indices_on_the_same_features(preset):
    reference = tiny_model(0, **PRESETS[preset]).eval()
    with torch.no_grad():  # a trained projection spreads the features over the whole grid; a fresh one does not
        reference.quantizer.project_in.weight.mul_(100)
    model = copy.deepcopy(reference).to(torch.bfloat16)
    grid = model.config.token_grid_size
    with torch.no_grad():
        features = model.get_image_features(_images(8, seed=3).bfloat16()).last_hidden_state
        ours = model.quantize(features, grid).indices
        theirs = reference.quantize(features.float(), grid).indices
        # The features of the bf16 encoder differ from float32 ones; what is equal is the quantization of them.
        assert not torch.equal(features.float(), reference.get_image_features(_images(8, seed=3)).last_hidden_state)
    assert torch.equal(ours, theirs)
    assert ours.unique().numel() > 16 and int(ours.max()) > 256  # many codes, beyond what bf16 counts exactly


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_from_pretrained_with_dtype_keeps_the_quantizer_in_float32(tmp_path, dtype):
    dtype = DTYPES[dtype]
    reference = tiny_model(0, **PRESETS["cosmos_fsq"]).eval()
    save_model(reference, tmp_path / "model")
    model = AutoModel.from_pretrained(tmp_path / "model", dtype=dtype)
    assert model.dtype == dtype and model.decoder.in_proj.weight.dtype == dtype
    _assert_quantizer_float32(model)
    _assert_same_quantizer(model, reference)
    with torch.no_grad():
        indices = model.encode(_images().to(dtype)).indices
        reconstruction = model.decode_from_indices(indices).reconstruction
    assert reconstruction.dtype == dtype and torch.isfinite(reconstruction).all()
    # Saved again in bf16, it reloads in bf16 with the same float32 quantizer.
    save_model(model, tmp_path / "again")
    again = AutoModel.from_pretrained(tmp_path / "again")
    assert again.dtype == dtype
    _assert_quantizer_float32(again)
    with torch.no_grad():
        assert torch.equal(again.encode(_images().to(dtype)).indices, indices)


def test_model_built_around_a_bf16_encoder(tmp_path):
    torch.manual_seed(0)
    encoder = SiglipVisionModel(SiglipVisionConfig(**TINY_VISION, vision_use_head=False))
    encoder.save_pretrained(tmp_path / "siglip")
    model = vqrae.VQRAEModel.from_encoder_pretrained(
        str(tmp_path / "siglip"), encoder_kwargs={"dtype": torch.bfloat16}, use_post_quant_conv=True
    )
    assert model.encoder.dtype == torch.bfloat16 and model.decoder.in_proj.weight.dtype == torch.float32
    _assert_quantizer_float32(model)
    model.eval()
    with torch.no_grad():
        encoded = model.encode(_images())
        reconstruction = model.decode_from_indices(encoded.indices).reconstruction
    assert encoded.last_hidden_state.dtype == torch.bfloat16
    assert encoded.quantized.dtype == torch.float32 and reconstruction.dtype == torch.float32
    _train_step(model, torch.float32)


def test_default_model_loaded_in_bf16_tokenizes_and_decodes_a_folder(tmp_path):
    from tqdm import tqdm

    from conftest import photo_folder
    from vqrae.cli.train import parse_train_args
    from vqrae.token_encoding import ImagePreparation, ShardBatches
    from vqrae.tokenize import TokenizeArguments, encode_shard, load_source
    from vqrae.training.trainer import build_model

    folder = tmp_path / "model"
    save_model(build_model(parse_train_args([])[0]), folder)  # the default run's model (untrained weights)
    model = AutoModel.from_pretrained(folder, dtype=torch.bfloat16)
    reference = AutoModel.from_pretrained(folder)
    assert model.dtype == torch.bfloat16
    args = TokenizeArguments(
        model=str(folder), output_dir=str(tmp_path / "tokens"), train_dir=str(photo_folder(tmp_path / "photos", 6))
    )
    dataset, column, _ = load_source(args)
    rows = [dataset[i] for i in range(len(dataset))]
    prepare = ImagePreparation(model.get_image_processor(), column, [], "center", None)
    tokens = {}
    for name, tokenizer in (("bf16", model), ("float32", reference)):
        columns, skipped = encode_shard(tokenizer, ShardBatches(rows, 0, prepare), args, "cpu", tqdm(disable=True))
        tokens[name] = torch.as_tensor(np.stack(columns["indices"]))
    assert tokens["bf16"].shape == (6, 8, 8) and not skipped
    assert (tokens["bf16"] == tokens["float32"]).float().mean() > 0.9  # bf16 features: a few tokens move
    with torch.no_grad():
        images = model.decode_from_indices(tokens["bf16"].long()).reconstruction
    assert images.dtype == torch.bfloat16 and images.shape == (6, 3, 64, 64) and torch.isfinite(images).all()


@pytest.mark.parametrize("preset", ["cosmos_fsq", "standard_fsq", "simvq"])
def test_the_quantizer_computes_in_float32_under_bf16_autocast(preset):
    """A float32 model under bf16 autocast (training with `--mixed_precision bf16`, `vqrae-tokenize` on a GPU): the
    quantizer turns autocast off for itself, so its indices and codes are those computed without autocast."""
    model = tiny_model(0, **PRESETS[preset]).eval()
    with torch.no_grad():
        if preset != "simvq":  # a trained projection spreads the features over the whole grid; a fresh one does not
            model.quantizer.project_in.weight.mul_(100)
        features = model.get_image_features(_images(8, seed=3)).last_hidden_state
        expected = model.quantizer(features)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            output = model.quantizer(features)
    assert output.quantized.dtype == torch.float32
    assert torch.equal(output.indices, expected.indices)
    assert torch.equal(output.quantized, expected.quantized)
    assert expected.indices.unique().numel() > 16
