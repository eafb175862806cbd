"""Bad input is refused loudly: each case checks the error type and the words that tell the user what to fix.

Covers config fields, config.json files, weights that do not match their config, truncated or corrupted
safetensors, pixel values, token indices and image datasets. (tests/test_config.py and tests/test_modeling.py hold
further config, pixel and index cases; they are not repeated here.)
"""

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from conftest import TINY_VISION, save_model, tiny_config, tiny_model
from vqrae import VQRAEConfig, VQRAEModel
from vqrae.image_data import load_image_dataset, load_validation_images, resolve_image_column
from vqrae.image_decoding import decode_image
from vqrae.loading import load_model
from vqrae.training.data import TrainingBatches

# ---------------------------------------------------------------------------------------------------------------
# Config fields
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        # Types are checked by transformers' `@strict` from the annotations: its message names field, type, value.
        ({"use_simvq": "true"}, TypeError, r"Field 'use_simvq' expected bool, got str \(value: 'true'\)"),
        ({"normalize_codes": 0}, TypeError, r"Field 'normalize_codes' expected bool, got int \(value: 0\)"),
        ({"use_fsq": None}, TypeError, r"Field 'use_fsq' expected bool, got NoneType"),
        ({"fsq_levels": [True, 8]}, TypeError, r"Field 'fsq_levels'.*Invalid item at index 0"),
        ({"fsq_levels": [8, -5]}, ValueError, r"`fsq_levels`.*\(got \[8, -5\]\)"),
        ({"fsq_levels": 8}, TypeError, r"Field 'fsq_levels' with value 8 doesn't match any type in \(list\[int\]"),
        ({"num_embeddings": 16384.0}, TypeError, r"Field 'num_embeddings' expected int, got float"),
        ({"num_embeddings": True}, TypeError, r"Field 'num_embeddings' expected int, got bool"),
        ({"codebook_dim": "8"}, TypeError, r"Field 'codebook_dim' with value '8' doesn't match"),
        ({"commitment_cost": "0.25"}, TypeError, r"Field 'commitment_cost' with value '0.25' doesn't match"),
        ({"commitment_cost": float("nan")}, ValueError, r"`commitment_cost` must be a finite number >= 0 \(got nan\)"),
        ({"post_quant_conv_kernel_size": 3.0}, TypeError, r"Field 'post_quant_conv_kernel_size' expected int"),
        ({"decoder_hidden_size": 0}, ValueError, r"`decoder_hidden_size` must be an integer >= 1 \(got 0\)"),
        ({"decoder_num_attention_heads": 0}, ValueError, r"`decoder_num_attention_heads` must be an integer >= 1"),
        (
            {"decoder_num_attention_heads": 5},
            ValueError,
            r"`decoder_hidden_size` must be divisible by `decoder_num_attention_heads` \(got 32 and 5\)",
        ),
        ({"decoder_intermediate_size": -1}, ValueError, r"`decoder_intermediate_size` must be an integer >= 1"),
        ({"decoder_hidden_act": None}, TypeError, r"Field 'decoder_hidden_act' expected str, got NoneType"),
        ({"decoder_hidden_act": "gelu_fast_typo"}, ValueError, r"`decoder_hidden_act` must be one of \[.*'gelu'"),
        ({"initializer_range": -0.02}, ValueError, r"`initializer_range` must be a finite number > 0 \(got -0.02\)"),
        (
            {"initializer_range": float("nan")},
            ValueError,
            r"`initializer_range` must be a finite number > 0 \(got nan\)",
        ),
        (
            {"vision_config": dict(TINY_VISION, num_attention_heads=5)},
            ValueError,
            r"`vision_config.hidden_size` must be divisible by `vision_config.num_attention_heads` \(got 32 and 5\)",
        ),
        (
            {"vision_config": dict(TINY_VISION, patch_size=5)},
            ValueError,
            r"`vision_config.image_size` must be a multiple of `vision_config.patch_size`.*patch_size=5",
        ),
        # SigLIP's own config is a strict dataclass; its error comes back as a TypeError naming the field and type.
        (
            {"vision_config": dict(TINY_VISION, hidden_size="32")},
            TypeError,
            r"(?s)`vision_config` holds a field of the wrong type.*'hidden_size' expected int, got str",
        ),
        ({"encoder_name_or_path": ["google/siglip"]}, TypeError, r"Field 'encoder_name_or_path' with value \["),
    ],
)
def test_config_field_out_of_range_or_of_wrong_type(overrides, error, match):
    with pytest.raises(error, match=match):
        tiny_config(**overrides)


# ---------------------------------------------------------------------------------------------------------------
# Saved models: config.json and model.safetensors
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """One saved folder per preset; tests copy a folder before damaging it."""
    root = tmp_path_factory.mktemp("saved")
    for name, overrides in {"fsq": {}, "post_quant_conv": {"use_post_quant_conv": True}}.items():
        save_model(tiny_model(0, **overrides), root / name)
    return root


@pytest.fixture
def copy_of(saved_models, tmp_path):
    def copy(name: str):
        return shutil.copytree(saved_models / name, tmp_path / name)

    return copy


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_weights(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "changes, error, match",
    [
        (
            {"model_type": "vqrae_v2"},
            ValueError,
            r"config.json has `model_type` 'vqrae_v2', but VQRAEConfig reads only 'vqrae' configs",
        ),
        ({"model_type": "siglip_vision_model"}, ValueError, r"load it with the class it was written for"),
        ({"fsq_levels": [8, 8, 1]}, ValueError, r"`fsq_levels` must be a non-empty list of integers >= 2"),
        ({"use_fsq": "fsq"}, TypeError, r"Field 'use_fsq' expected bool, got str \(value: 'fsq'\)"),
        ({"num_embeddings": 0}, ValueError, r"`num_embeddings` must be an integer >= 2 \(got 0\)"),
        ({"post_quant_conv_kernel_size": 4}, ValueError, r"`post_quant_conv_kernel_size` must be a positive odd"),
    ],
)
def test_bad_config_json_is_refused(copy_of, changes, error, match):
    folder = copy_of("fsq")
    _edit_config(folder, **changes)
    with pytest.raises(error, match=match):
        VQRAEModel.from_pretrained(folder)
    with pytest.raises(error, match=match):
        VQRAEConfig.from_pretrained(folder)


def test_unknown_model_type_without_remote_code_is_refused_by_automodel(copy_of):
    folder = copy_of("fsq")
    config = json.loads((folder / "config.json").read_text())
    config.pop("auto_map")
    config["model_type"] = "vqrae_v2"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model type `vqrae_v2` but Transformers does not recognize"):
        AutoModel.from_pretrained(folder)


def test_truncated_config_json_is_refused(copy_of):
    folder = copy_of("fsq")
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(OSError, match=r"config.json' is not a valid JSON file"):
        VQRAEModel.from_pretrained(folder)


def test_post_quant_conv_in_config_but_not_in_weights(copy_of):
    folder = copy_of("post_quant_conv")
    _edit_weights(folder, lambda t: [t.pop(key) for key in ("post_quant_conv.weight", "post_quant_conv.bias")])
    match = r"do not match its configuration; tensors missing from the checkpoint: post_quant_conv.bias, post_q"
    with pytest.raises(ValueError, match=match):
        VQRAEModel.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"fix config.json so it describes the weights"):
        AutoModel.from_pretrained(folder)


def test_weights_with_post_quant_conv_but_config_without(copy_of):
    folder = copy_of("post_quant_conv")
    _edit_config(folder, use_post_quant_conv=False)
    with pytest.raises(ValueError, match=r"tensors not expected by the config: post_quant_conv.bias, post_quant"):
        VQRAEModel.from_pretrained(folder)


def test_weights_of_another_shape(copy_of):
    folder = copy_of("fsq")
    _edit_config(folder, fsq_levels=[8, 8, 8])  # the weights project to 6 FSQ dimensions, the config to 3
    match = r"of another shape: quantizer.project_in.bias \(checkpoint \(6,\), config \(3,\)\)"
    with pytest.raises(ValueError, match=match):
        VQRAEModel.from_pretrained(folder)
    # Asked for explicitly, tensors of another shape are re-initialised instead (transformers' own option).
    model = VQRAEModel.from_pretrained(folder, ignore_mismatched_sizes=True)
    assert model.config.fsq_levels == [8, 8, 8]


def test_unmatched_weights_are_reported_under_output_loading_info(copy_of):
    # transformers' contract: with `output_loading_info=True`, weights that do not match are reported, not raised.
    folder = copy_of("post_quant_conv")
    _edit_weights(folder, lambda t: t.pop("post_quant_conv.bias"))
    model, info = VQRAEModel.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] == {"post_quant_conv.bias"} and info["unexpected_keys"] == set()
    assert model.post_quant_conv.bias.shape == (32,)
    with pytest.raises(ValueError, match=r"tensors missing from the checkpoint: post_quant_conv.bias\."):
        VQRAEModel.from_pretrained(folder)  # a plain load stays strict


def test_a_model_builds_from_a_state_dict_without_a_folder():
    model = tiny_model(0, use_post_quant_conv=True)
    loaded = VQRAEModel.from_pretrained(None, config=model.config, state_dict=model.state_dict())
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in loaded.state_dict().items())
    partial = {key: value for key, value in model.state_dict().items() if not key.startswith("decoder.")}
    with pytest.raises(ValueError, match=r"The weights of the given state_dict do not match .* decoder.in_proj.bias"):
        VQRAEModel.from_pretrained(None, config=model.config, state_dict=partial)


def test_matching_weights_load_and_report_nothing(copy_of):
    model, info = VQRAEModel.from_pretrained(copy_of("post_quant_conv"), output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    reference = tiny_model(0, use_post_quant_conv=True)
    assert all(torch.equal(value, reference.state_dict()[key]) for key, value in model.state_dict().items())


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[: len(data) // 2], id="truncated-in-the-tensors"),
        pytest.param(lambda data: data[:20], id="truncated-in-the-header"),
        pytest.param(lambda data: b"", id="empty"),
        pytest.param(lambda data: b"\xff" * 8 + data[8:], id="corrupted-header-length"),
        pytest.param(lambda data: data[:8] + b"#" * 16 + data[24:], id="corrupted-header-json"),
    ],
)
def test_damaged_safetensors_is_refused(copy_of, damage):
    folder = copy_of("fsq")
    path = folder / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(OSError, match=r"weights file is truncated or corrupted .*; download or save it again"):
        load_model(folder)


def test_missing_safetensors_is_refused(copy_of):
    folder = copy_of("fsq")
    (folder / "model.safetensors").unlink()
    with pytest.raises(OSError, match=r"no file named model.safetensors"):
        VQRAEModel.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------------
# Pixel values and token indices
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return tiny_model(0).eval()


@pytest.fixture(scope="module")
def vq_model():
    return tiny_model(0, use_fsq=False, num_embeddings=64).eval()


@pytest.mark.parametrize(
    "pixel_values, error, match",
    [
        (torch.zeros(1, 1, 3, 32, 32), ValueError, r"shape \(batch_size, 3, height, width\) \(got shape \(1, 1, 3,"),
        (torch.zeros(1, 4, 32, 32), ValueError, r"shape \(batch_size, 3, height, width\) \(got shape \(1, 4, 32,"),
        (torch.zeros(1, 32, 32, 3), ValueError, r"shape \(batch_size, 3, height, width\)"),
        (torch.zeros(0, 3, 32, 32), ValueError, r"holds no images \(batch size 0\); pass at least one image"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.int64), TypeError, r"floating point.*AutoImageProcessor"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.bool), TypeError, r"must be floating point.*torch.bool"),
        (torch.zeros(1, 3, 0, 32), ValueError, r"positive multiples of the patch size 8 \(got 0 x 32\)"),
        (torch.zeros(1, 3, 32, 36), ValueError, r"positive multiples of the patch size 8 \(got 32 x 36\)"),
        (torch.zeros(1, 3, 32, 32).index_fill(3, torch.tensor([5]), float("-inf")), ValueError, r"NaN or infinite"),
        (np.zeros((1, 3, 32, 32), dtype=np.float32), TypeError, r"must be a torch.Tensor \(got ndarray\)"),
    ],
)
def test_bad_pixel_values(model, pixel_values, error, match):
    for entry_point in (model, model.encode, model.get_image_features):
        with pytest.raises(error, match=match):
            entry_point(pixel_values)


@pytest.mark.parametrize(
    "indices, error, match",
    [
        (torch.zeros(1, 4, 4, dtype=torch.float64), TypeError, r"must hold integers .*got dtype torch.float64"),
        (torch.zeros(1, 4, 4, dtype=torch.bool), TypeError, r"must hold integers .*got dtype torch.bool"),
        ([[[0]]], TypeError, r"`indices` must be a torch.Tensor of integers \(got list\)"),
        (torch.zeros(16, dtype=torch.long), ValueError, r"`indices` must have shape \(batch_size, h, w\)"),
        (torch.zeros(0, 4, 4, dtype=torch.long), ValueError, r"`indices` is empty \(shape \(0, 4, 4\)\)"),
        (torch.tensor([[[0, 63999], [64000, 5]]]), ValueError, r"must lie in \[0, 64000\).*from 0 to 64000"),
        (torch.tensor([[[-5]]], dtype=torch.int32), ValueError, r"must lie in \[0, 64000\).*from -5"),
    ],
)
def test_bad_indices(model, indices, error, match):
    with pytest.raises(error, match=match):
        model.decode_from_indices(indices)
    with pytest.raises(error, match=match):
        model.indices_to_codes(indices)


def test_vq_indices_outside_the_codebook(vq_model):
    with pytest.raises(
        ValueError, match=r"must lie in \[0, 64\) for a codebook of 64 codes \(got values from 0 to 64\)"
    ):
        vq_model.decode_from_indices(torch.tensor([[[0, 64]]]))


# ---------------------------------------------------------------------------------------------------------------
# Image datasets
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor():
    return tiny_model(0).get_image_processor()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _image_dataset(values: list, column: str = "image"):
    import datasets

    return datasets.Dataset.from_dict({column: values}, features=datasets.Features({column: datasets.Image()}))


def test_missing_image_column():
    dataset = _image_dataset([_png(Image.new("RGB", (8, 8)))], column="picture")
    with pytest.raises(ValueError, match=r"`image_column` 'image' is not a column of the dataset.*'picture'"):
        resolve_image_column(dataset, "image")


def test_no_image_column_at_all():
    import datasets

    dataset = datasets.Dataset.from_dict({"caption": ["a", "b"], "label": [0, 1]})
    with pytest.raises(ValueError, match=r"Cannot tell which column holds the images.*pass --image_column"):
        resolve_image_column(dataset, None)


def test_folder_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("no pictures here")
    with pytest.raises(ValueError, match=r"`train_dir` .* holds no images|is empty: there are no images"):
        load_image_dataset("train", train_dir=str(tmp_path))


def test_empty_dataset(processor):
    with pytest.raises(ValueError, match=r"The training dataset is empty: there are no images to train on"):
        TrainingBatches(_image_dataset([]), "image", processor, batch_size=2, seed=0)


def test_corrupted_images_are_skipped_and_counted(tmp_path, processor):
    good = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    good.save(tmp_path / "good.png")
    (tmp_path / "truncated.png").write_bytes(_png(good)[:200])
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    dataset, column = load_image_dataset("train", train_dir=str(tmp_path))
    assert len(dataset) == 3
    batches = TrainingBatches(dataset, column, processor, batch_size=6, seed=0)
    assert batches[0]["pixel_values"].shape == (6, 3, 32, 32)
    assert batches.counter.unreadable == 2 and batches.counter.decoded == 1
    assert {example.split(":")[0].rsplit("/", 1)[-1] for example in batches.counter.examples} == {
        "truncated.png",
        "garbage.jpg",
    }
    validation = load_validation_images(dataset, column, 32, dataset_name="folder", dataset_split="train")
    assert len(validation.images) == 1 and validation.num_unreadable == 2


def test_only_corrupted_images(processor):
    dataset = _image_dataset([{"bytes": b"not an image", "path": "a.png"}, {"bytes": b"\x89PNG", "path": "b.png"}])
    dataset = dataset.cast_column("image", type(dataset.features["image"])(decode=False))
    batches = TrainingBatches(dataset, "image", processor, batch_size=1, seed=0)
    with pytest.raises(ValueError, match=r"None of the 2 training images can be read"):
        batches[0]


@pytest.mark.parametrize("size", [(1, 1), (5, 3), (31, 200)])
def test_images_smaller_than_the_crop_are_upsampled(processor, size):
    dataset = _image_dataset([_png(Image.new("RGB", size, (200, 30, 90)))])
    pixel_values = TrainingBatches(dataset, "image", processor, batch_size=2, seed=0)[0]["pixel_values"]
    assert pixel_values.shape == (2, 3, 32, 32)
    expected = torch.tensor([200, 30, 90]) / 255 * 2 - 1
    assert torch.allclose(pixel_values.mean(dim=(0, 2, 3)), expected, atol=0.02)


def test_grayscale_images_become_grey_rgb():
    image = decode_image(_png(Image.fromarray(np.array([[0, 128], [200, 255]], dtype=np.uint8), mode="L")))
    array = np.asarray(image)
    assert image.mode == "RGB" and (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    assert array[..., 0].tolist() == [[0, 128], [200, 255]]


def test_rgba_images_are_composited_onto_white():
    pixels = np.array([[[255, 0, 0, 255], [0, 0, 255, 0]], [[0, 0, 0, 128], [10, 20, 30, 255]]], dtype=np.uint8)
    array = np.asarray(decode_image(_png(Image.fromarray(pixels, mode="RGBA"))))
    assert array[0, 0].tolist() == [255, 0, 0]  # opaque red stays red
    assert array[0, 1].tolist() == [255, 255, 255]  # fully transparent becomes the white background
    assert array[1, 0].tolist() == [127, 127, 127]  # half-transparent black over white is mid grey
    assert array[1, 1].tolist() == [10, 20, 30]


def test_16_bit_images_keep_their_brightness():
    # 16-bit values map to 8 bits by the format's range: a uniform 61% grey stays 61% grey (not white).
    levels = np.array([[0, 257], [40000, 65535]], dtype=np.uint16)
    array = np.asarray(decode_image(_png(Image.fromarray(levels))))
    assert array[..., 0].tolist() == [[0, 1], [156, 255]]
    uniform = np.asarray(decode_image(_png(Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16)))))
    assert (uniform == 156).all()


def test_a_model_folder_that_does_not_exist_is_named(tmp_path, monkeypatch):
    (tmp_path / "outputs").mkdir()
    monkeypatch.chdir(tmp_path)
    for name in ("outputs/vqrae-tiny-cpu", "./model", str(tmp_path / "gone")):
        with pytest.raises(OSError, match="is not a folder: .* does not exist"):
            load_model(name)
    # Not a path and not a repo id either: transformers' "Repo id must be in the form" becomes our message.
    with pytest.raises(OSError, match="'a/b/c' is not a folder here .* could not be loaded as a model from the Hub"):
        load_model("a/b/c")
