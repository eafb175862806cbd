"""VQRAEModel: the three seed flows, the encode/decode invariant, gradients, save/load, resolutions, errors."""

import pytest
import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel

from conftest import SEED_PRESETS, save_model, tiny_config, tiny_model
from vqrae import VQRAE, VQRAEConfig, VQRAEDecoderOutput, VQRAEEncoderOutput, VQRAEModel, VQRAEModelOutput

PRESETS = sorted(SEED_PRESETS)


def images(batch=2, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1


@pytest.mark.parametrize("preset", PRESETS)
def test_forward_shapes(preset):
    model = tiny_model(**SEED_PRESETS[preset])
    out = model(images())
    assert isinstance(out, VQRAEModelOutput)
    assert out.reconstruction.shape == (2, 3, 32, 32)
    assert out.indices.shape == (2, 4, 4) and out.indices.dtype == torch.int64
    assert out.quantized.shape == (2, 32, 4, 4)
    assert out.last_hidden_state.shape == (2, 16, 32)
    assert out.quantizer_loss.shape == ()
    assert int(out.indices.max()) < model.codebook_size
    assert (model.post_quant_conv is not None) == SEED_PRESETS[preset].get("use_post_quant_conv", False)
    tuple_out = model(images(), return_dict=False)
    assert isinstance(tuple_out, tuple) and len(tuple_out) == 5
    torch.testing.assert_close(tuple_out[0], out.reconstruction)


@pytest.mark.parametrize("preset", PRESETS)
def test_decode_from_indices_equals_forward_in_eval(preset):
    model = tiny_model(**SEED_PRESETS[preset]).eval()
    x = images(batch=3)
    with torch.no_grad():
        forward = model(x).reconstruction
        encoded = model.encode(x)
        assert isinstance(encoded, VQRAEEncoderOutput)
        decoded = model.decode_from_indices(encoded.indices)
    assert isinstance(decoded, VQRAEDecoderOutput)
    torch.testing.assert_close(decoded.reconstruction, forward, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.indices_to_codes(encoded.indices), encoded.quantized, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", PRESETS)
def test_gradients_reach_every_trainable_parameter(preset):
    model = tiny_model(**SEED_PRESETS[preset]).train()
    with torch.no_grad():  # a new VQ codebook is placed on the first batch's latents (a zero codebook loss there)
        model(images(seed=1))
    out = model(images())
    (out.reconstruction.pow(2).mean() + out.quantizer_loss).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached: {missing}"


@pytest.mark.parametrize("preset", PRESETS)
def test_frozen_encoder_gets_no_gradient(preset):
    model = tiny_model(**SEED_PRESETS[preset]).train()
    model.freeze_encoder()
    assert not model.encoder.training  # frozen encoder stays in eval mode, also after .train()
    out = model(images())
    assert not out.last_hidden_state.requires_grad  # ran under no_grad
    (out.reconstruction.pow(2).mean() + out.quantizer_loss).backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    trainable = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    assert all(p.grad is not None for p in trainable)
    model.freeze_encoder(False)
    assert all(p.requires_grad for p in model.encoder.parameters())


@pytest.mark.parametrize("preset", PRESETS)
def test_save_and_load_round_trip(preset, tmp_path):
    model = tiny_model(**SEED_PRESETS[preset]).eval()
    save_model(model, tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "configuration_vqrae.py",
        "modeling_vqrae.py",
        "quantizers.py",
    } <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(reloaded, VQRAEModel) and not reloaded.training
    original_state, reloaded_state = model.state_dict(), reloaded.state_dict()
    assert original_state.keys() == reloaded_state.keys()
    for name, tensor in original_state.items():
        assert torch.equal(tensor, reloaded_state[name]), name
    x = images()
    with torch.no_grad():
        a, b = model(x), reloaded(x)
    torch.testing.assert_close(a.reconstruction, b.reconstruction)
    assert torch.equal(a.indices, b.indices)
    loaded_config = AutoConfig.from_pretrained(tmp_path).to_dict()
    expected_config = model.config.to_dict()
    for config_dict in (loaded_config, expected_config):
        config_dict.pop("_name_or_path")
    assert loaded_config == expected_config


def test_image_processor_matches_the_encoder(tmp_path):
    from PIL import Image

    model = tiny_model()
    save_model(model, tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    image = Image.new("RGB", (50, 70), color=(255, 0, 128))
    pixel_values = processor(images=[image], return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 32, 32)
    torch.testing.assert_close(pixel_values[0, :, 10, 10], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]))
    from vqrae import to_pil_images

    back = to_pil_images(pixel_values, processor)[0]
    assert back.size == (32, 32) and back.getpixel((10, 10)) == (255, 0, 128)


IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}


@pytest.mark.parametrize(
    "settings",
    [None, IMAGENET, {"rescale_factor": 1 / 127.5, "image_mean": [1.0, 1.0, 1.0], "image_std": [1.0, 1.0, 1.0]}],
    ids=["siglip", "imagenet", "rescale"],
)
def test_to_pil_images_undoes_the_models_own_normalisation(tmp_path, settings):
    """Pixels prepared by the model's processor come back as the same 8-bit image, whatever mean, std and rescale
    the encoder uses: from the saved processor, the model or its config; without one nothing is assumed."""
    import numpy as np
    from PIL import Image

    from vqrae import to_pil_images

    model = tiny_model(preprocessor_config=settings)
    save_model(model, tmp_path)
    array = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    pixel_values = processor(images=[Image.fromarray(array)], return_tensors="pt")["pixel_values"]
    for source in (processor, model, model.config):
        np.testing.assert_array_equal(np.asarray(to_pil_images(pixel_values, source)[0]), array)
    with pytest.raises(TypeError):
        to_pil_images(pixel_values)
    with pytest.raises(TypeError, match="must be the model's image processor"):
        to_pil_images(pixel_values, 0.5)


def test_other_resolutions_follow_the_image():
    model = tiny_model(use_post_quant_conv=True, post_quant_conv_kernel_size=3).eval()
    x = torch.rand(1, 3, 48, 24) * 2 - 1
    with torch.no_grad():
        out = model(x)
        assert out.indices.shape == (1, 6, 3)
        assert out.reconstruction.shape == (1, 3, 48, 24)
        torch.testing.assert_close(
            model.decode_from_indices(out.indices).reconstruction, out.reconstruction, atol=1e-5, rtol=0
        )


def test_sdpa_and_eager_agree_and_checkpointing_matches():
    x = images()
    eager = tiny_model(use_post_quant_conv=True)
    eager.set_attn_implementation("eager")
    sdpa = tiny_model(use_post_quant_conv=True)
    sdpa.set_attn_implementation("sdpa")
    assert sdpa.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(eager(x).reconstruction, sdpa(x).reconstruction, atol=1e-5, rtol=1e-4)

    model = tiny_model(use_post_quant_conv=True).train()
    model(x).reconstruction.mean().backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.decoder.layers)
    model(x).reconstruction.mean().backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, reference[name], atol=1e-6, rtol=1e-4)


def test_initialisation_is_deterministic():
    a, b = tiny_model(seed=3), tiny_model(seed=3)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    c = tiny_model(seed=4)
    assert not torch.equal(a.decoder.in_proj.weight, c.decoder.in_proj.weight)


def test_seed_example_runs_as_written():
    model = VQRAE(use_fsq=True, fsq_levels=[8, 8, 8, 5, 5, 5], use_post_quant_conv=True)
    assert isinstance(model, VQRAEModel)
    assert model.config.codebook_size == 64000 and model.post_quant_conv.kernel_size == (1, 1)
    size = model.config.vision_config.image_size
    model.eval()
    with torch.no_grad():
        tokens = model.encode(torch.rand(1, 3, size, size) * 2 - 1).indices
        assert tokens.shape == (1, size // 16, size // 16)
        codes = model.quantizer.lookup(tokens)
        assert codes.shape == (1, size // 16, size // 16, 768)
        images_out = model.decode_from_indices(tokens).reconstruction
    assert images_out.shape == (1, 3, size, size)


def test_config_kwargs_spelling_and_config_object_agree():
    config = VQRAEConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "image_size": 16,
            "patch_size": 8,
        }
    )
    assert VQRAEModel(config).config.to_dict() == VQRAE(**config.to_dict()).config.to_dict()


# -- bad input ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return tiny_model().eval()


@pytest.mark.parametrize(
    "pixel_values, error, match",
    [
        (torch.zeros(3, 32, 32), ValueError, r"shape \(batch_size, 3, height, width\) \(got shape \(3, 32, 32\)\)"),
        (torch.zeros(1, 1, 32, 32), ValueError, r"shape \(batch_size, 3, height, width\)"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, r"must be floating point.*torch.uint8"),
        (torch.zeros(1, 3, 30, 32), ValueError, r"multiples of the patch size 8 \(got 30 x 32\)"),
        (torch.full((1, 3, 32, 32), float("nan")), ValueError, r"NaN or infinite"),
        (torch.full((1, 3, 32, 32), float("inf")), ValueError, r"NaN or infinite"),
        ([[1.0]], TypeError, r"must be a torch.Tensor"),
    ],
)
def test_bad_pixel_values(model, pixel_values, error, match):
    with pytest.raises(error, match=match):
        model(pixel_values)
    with pytest.raises(error, match=match):
        model.encode(pixel_values)


@pytest.mark.parametrize(
    "indices, error, match",
    [
        (torch.zeros(1, 4, 4), TypeError, r"must hold integers.*torch.float32"),
        (torch.full((1, 4, 4), -1), ValueError, r"must lie in \[0, 64000\).*from -1"),
        (torch.full((1, 4, 4), 64000), ValueError, r"must lie in \[0, 64000\).*to 64000"),
        (torch.zeros(4, 4, dtype=torch.long), ValueError, r"shape \(batch_size, h, w\) \(got shape \(4, 4\)\)"),
        (torch.zeros(1, 1, 4, 4, dtype=torch.long), ValueError, r"shape \(batch_size, h, w\)"),
    ],
)
def test_bad_indices(model, indices, error, match):
    with pytest.raises(error, match=match):
        model.decode_from_indices(indices)


def test_bad_codes_and_kwargs(model):
    with pytest.raises(ValueError, match=r"`codes` must have shape \(batch_size, 32, h, w\)"):
        model.decode(torch.zeros(1, 16, 4, 4))
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        model(images(), pixel_mask=None)


def test_the_decoder_conv_head_starts_as_the_identity_and_trains(tmp_path):
    model = tiny_model(decoder_conv_head_channels=8)
    head = model.decoder.conv_head
    assert head is not None and tiny_model().decoder.conv_head is None  # off unless asked for
    assert not head.conv_out.weight.any() and not head.conv_out.bias.any()
    x = images()
    with torch.no_grad():
        with_head = model(x).reconstruction
        model.decoder.conv_head = None
        without = model(x).reconstruction
        model.decoder.conv_head = head
    torch.testing.assert_close(with_head, without, atol=0, rtol=0)
    out = model.train()(x)
    out.reconstruction.pow(2).mean().backward()
    assert head.conv_out.weight.grad.abs().sum() > 0  # then conv_in, once conv_out has moved
    with torch.no_grad():
        head.conv_out.weight.normal_(std=0.1)
    save_model(model.eval(), tmp_path)
    loaded = VQRAEModel.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).reconstruction, model(x).reconstruction)
        # It reaches across patch borders: a change inside one 8 x 8 patch moves pixels of the neighbouring patch.
        pixels = torch.zeros(1, 3, 16, 16)
        changed = pixels.clone()
        changed[..., 7] = 1.0  # the last column of the left patches
        difference = (head(changed) + changed - head(pixels) - pixels).abs().sum(dim=(0, 1, 2))
    assert difference[8] > 0 and difference[10] == 0  # 5 x 5 receptive field: two pixels across the border


@pytest.mark.parametrize("quantizer", [{"use_fsq": True}, {"use_fsq": False, "num_embeddings": 64, "codebook_dim": 8}])
def test_cosmos_placement_puts_post_quant_conv_on_the_quantizers_codes(quantizer, tmp_path):
    model = tiny_model(
        use_post_quant_conv=True, post_quant_conv_kernel_size=3, post_quant_conv_on_codes=True, **quantizer
    )
    width = 6 if quantizer["use_fsq"] else 8  # the FSQ levels' count, or the VQ code width
    assert model.post_quant_conv.in_channels == width and model.post_quant_conv.out_channels == 32
    assert not [name for name, _ in model.named_parameters() if "project_out" in name]
    model.eval()
    x = images(batch=3)
    with torch.no_grad():
        encoded = model.encode(x)
        assert encoded.quantized.shape == (3, width, 4, 4)
        codes = model.indices_to_codes(encoded.indices)
        torch.testing.assert_close(codes, encoded.quantized, atol=1e-6, rtol=0)
        reconstruction = model.decode_from_indices(encoded.indices).reconstruction
        torch.testing.assert_close(reconstruction, model(x).reconstruction, atol=1e-5, rtol=0)
        if quantizer["use_fsq"]:  # the grid codes themselves, in [-1, 1]
            assert torch.equal(codes, model.quantizer.lookup(encoded.indices, project_out=False).permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match=rf"`codes` must have shape \(batch_size, {width}, h, w\)"):
        model.decode(torch.zeros(1, 32, 4, 4))
    save_model(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(VQRAEModel.from_pretrained(tmp_path)(x).reconstruction, model(x).reconstruction)
    with pytest.raises(ValueError, match="needs `use_post_quant_conv=True`"):
        tiny_config(post_quant_conv_on_codes=True)


@pytest.mark.parametrize("overlap", [1, 2, 4])
def test_overlapping_patches_blend_into_a_partition_of_unity(overlap, tmp_path):
    model = tiny_model(decoder_patch_overlap=overlap)
    decoder = model.decoder
    side = 8 + 2 * overlap
    assert decoder.out_proj.out_features == 3 * side * side
    # Every token predicting one constant: the image is that constant everywhere, borders and edges included.
    constant = torch.full((2, 16, 3 * side * side), 0.7)
    torch.testing.assert_close(decoder._overlap_add(constant, 4, 4), torch.full((2, 3, 32, 32), 0.7))
    # Tokens with different constants: far from any neighbour's reach a pixel is its own token's value, and across
    # a border the image ramps from one to the other in steps no larger than the jump over the blended width.
    values = torch.arange(16.0).view(1, 16, 1).expand(1, 16, 3 * side * side)
    image = decoder._overlap_add(values, 4, 4)[0, 0]
    if overlap < 4:
        assert image[12, 12] == 5.0  # token (1, 1), 4 pixels from each border of its patch
    row = image[12, 8:24]  # across the border between tokens 5 and 6
    assert (row.diff() >= 0).all() and row.diff().max() <= 1.0 / (2 * overlap) + 1e-6
    x = images()
    with torch.no_grad():
        eval_model = model.eval()
        torch.testing.assert_close(
            eval_model.decode_from_indices(eval_model.encode(x).indices).reconstruction, eval_model(x).reconstruction
        )
    save_model(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(VQRAEModel.from_pretrained(tmp_path)(x).reconstruction, model(x).reconstruction)
    with pytest.raises(
        ValueError, match=r"`decoder_patch_overlap` must be an integer from 0 to half the patch size \(4\)"
    ):
        tiny_config(decoder_patch_overlap=5)
