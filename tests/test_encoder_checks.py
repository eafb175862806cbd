"""A pretrained encoder either loads whole or is refused in one line: a VQRAE folder passed as the encoder, a
checkpoint whose keys carry a prefix, tensors of another shape and a NaFlex SigLIP2 encoder would otherwise give a
randomly initialised (and, in stage 1, frozen) encoder or a traceback."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    Siglip2VisionConfig,
    Siglip2VisionModel,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from conftest import TINY_VISION, save_model, tiny_model
from test_cli import _one_error_line, _train
from test_hub_loading import _tiny_siglip_text
from vqrae import VQRAEConfig, VQRAEModel

TINY_NAFLEX = {k: v for k, v in TINY_VISION.items() if k != "image_size"} | {"num_patches": 16}


def _vision_folder(folder):
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**TINY_VISION)).save_pretrained(folder)
    return folder


def _prefixed_folder(folder, tmp_path):
    """A real SigLIP checkpoint whose tensors were saved as `model.<name>` (e.g. from a wrapper module)."""
    plain = _vision_folder(tmp_path / "plain")
    folder.mkdir()
    tensors = load_file(plain / "model.safetensors")
    save_file(
        {f"model.{key}": value for key, value in tensors.items()}, folder / "model.safetensors", {"format": "pt"}
    )
    shutil.copy(plain / "config.json", folder / "config.json")
    return folder


def _vqrae_folder(folder, tmp_path):
    save_model(tiny_model(), folder)
    return folder


def _naflex_folder(folder, tmp_path):
    Siglip2VisionModel(Siglip2VisionConfig(**TINY_NAFLEX)).save_pretrained(folder)
    return folder


REFUSED = {
    "vqrae_folder": (
        _vqrae_folder,
        r"'[^']*enc' is a VQRAE model \(its config.json has model_type 'vqrae'\), not a SigLIP encoder: .*"
        r"`VQRAEModel.from_pretrained` \(in vqrae-train: `--init_from`\)",
    ),
    "prefixed_keys": (
        _prefixed_folder,
        r"lacks weights of the SigLIP vision tower: embeddings.patch_embedding.bias, .* and \d+ more\. Its keys carry "
        r"a prefix \('model.embeddings.patch_embedding.bias' instead of 'embeddings.patch_embedding.bias'\)",
    ),
    "naflex_siglip2": (
        _naflex_folder,
        r"must be a SigLIP vision config \(SiglipVisionConfig, .*\): fixed-resolution SigLIP and SigLIP2 "
        r"checkpoints are supported; got Siglip2VisionConfig \(model_type 'siglip2_vision_model'\), a "
        r"variable-resolution \(NaFlex\)",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_from_encoder_pretrained_refuses_what_is_not_a_whole_siglip_encoder(case, tmp_path):
    build, match = REFUSED[case]
    folder = build(tmp_path / "enc", tmp_path)
    with pytest.raises(ValueError, match=match):
        VQRAEModel.from_encoder_pretrained(str(folder), decoder_intermediate_size=37)


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_vqrae_train_refuses_it_in_one_line(case, tmp_path):
    build, match = REFUSED[case]
    folder = build(tmp_path / "enc", tmp_path)
    result = _train("--encoder_name_or_path", str(folder), "--output_dir", str(tmp_path / "run"))
    line = _one_error_line(result)
    assert line.startswith("vqrae-train: error: ")
    assert re.search(match, line), line
    assert "LOAD REPORT" not in result.stderr and "MISSING" not in result.stderr  # no table of transformers' own
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_weights_of_another_shape_are_refused(tmp_path):
    folder = _vision_folder(tmp_path / "enc")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"intermediate_size": 41}))
    with pytest.raises(ValueError, match=r"another shape than its config.json says: encoder.layers.0.mlp.fc1.bias"):
        VQRAEModel.from_encoder_pretrained(str(folder), decoder_intermediate_size=37)


def test_a_full_siglip_checkpoint_with_head_and_text_tower_still_loads(tmp_path):
    torch.manual_seed(0)
    vision = dict(TINY_VISION, vision_use_head=True)
    SiglipModel(SiglipConfig(text_config=_tiny_siglip_text(), vision_config=vision)).save_pretrained(tmp_path / "enc")
    saved = load_file(tmp_path / "enc" / "model.safetensors")
    assert any(".head." in key for key in saved) and any(key.startswith("text_model.") for key in saved)
    model = VQRAEModel.from_encoder_pretrained(str(tmp_path / "enc"), decoder_intermediate_size=37)
    for name, tensor in model.encoder.state_dict().items():
        assert torch.equal(tensor, saved[f"vision_model.{name}"]), name


def test_a_naflex_vision_config_is_refused_by_the_config(tmp_path):
    with pytest.raises(ValueError, match=REFUSED["naflex_siglip2"][1]):
        VQRAEConfig(vision_config=Siglip2VisionConfig(**TINY_NAFLEX))
    with pytest.raises(ValueError, match=r"^`vision_config` must be a SigLIP vision config .* got CLIPVisionConfig"):
        VQRAEConfig(vision_config={"model_type": "clip_vision_model"})
