"""Loading through the Hub machinery, offline: remote code without vqrae, a Hub cache folder, pretrained SigLIP."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

from conftest import SEED_PRESETS, TINY_VISION, save_model, tiny_model
from hub_cache import write_hub_cache
from vqrae import VQRAEModel


def _subprocess_env():
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.mark.parametrize("preset", ["cosmos_fsq", "vq"])
def test_remote_code_loads_without_vqrae(preset, tmp_path):
    model = tiny_model(**SEED_PRESETS[preset]).eval()
    folder = tmp_path / "model"
    save_model(model, folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_vqrae.VQRAEConfig",
        "AutoModel": "modeling_vqrae.VQRAEModel",
    }
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        out = model(x)
    save_file(
        {"x": x, "reconstruction": out.reconstruction, "indices": out.indices}, tmp_path / "expected.safetensors"
    )
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["vqrae"] = None  # any import of the installed package fails: only the folder's code may run
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModel
        expected = load_file({str(tmp_path / "expected.safetensors")!r})
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            out = model(expected["x"])
            rec = model.decode_from_indices(out.indices).reconstruction
        assert torch.equal(out.indices, expected["indices"])
        torch.testing.assert_close(out.reconstruction, expected["reconstruction"])
        torch.testing.assert_close(rec, expected["reconstruction"], atol=1e-5, rtol=0)
        print("REMOTE-CODE-OK", type(model).__module__)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE-CODE-OK" in result.stdout


def test_automodel_from_hub_cache_offline(tmp_path):
    model = tiny_model(**SEED_PRESETS["cosmos_fsq"]).eval()
    save_model(model, tmp_path / "saved")
    write_hub_cache(tmp_path / "saved", "org/vqrae-cosmos")
    loaded = AutoModel.from_pretrained("org/vqrae-cosmos")
    assert isinstance(loaded, VQRAEModel)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).reconstruction, model(x).reconstruction)


def _tiny_siglip_text():
    return {
        "vocab_size": 99,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 16,
    }


@pytest.mark.parametrize("checkpoint", ["full", "vision_only"])
def test_from_encoder_pretrained_through_the_hub_cache(checkpoint, tmp_path):
    torch.manual_seed(0)
    if checkpoint == "full":
        siglip = SiglipModel(SiglipConfig(text_config=_tiny_siglip_text(), vision_config=dict(TINY_VISION)))
    else:
        siglip = SiglipVisionModel(SiglipVisionConfig(**TINY_VISION))
    siglip.save_pretrained(tmp_path / "siglip")
    repo_id = f"google/siglip-tiny-test-{checkpoint}".replace("-full", "")
    write_hub_cache(tmp_path / "siglip", repo_id)
    model = VQRAEModel.from_encoder_pretrained(
        repo_id, use_fsq=True, fsq_levels=[8, 8, 8, 5, 5, 5], use_post_quant_conv=True, decoder_intermediate_size=37
    )
    assert model.config.encoder_name_or_path == repo_id
    assert model.config.vision_config.vision_use_head is False
    assert model.post_quant_conv is not None and model.codebook_size == 64000
    reference = load_file(tmp_path / "siglip" / "model.safetensors")
    prefix = "vision_model."
    encoder_state = model.encoder.state_dict()
    compared = 0
    for key, tensor in reference.items():
        name = key[len(prefix) :] if key.startswith(prefix) else key
        if name in encoder_state:
            assert torch.equal(encoder_state[name], tensor), name
            compared += 1
    assert compared == len(encoder_state)  # every encoder tensor came from the checkpoint
    assert not any("head" in name for name in encoder_state)
    # The whole model is one checkpoint: a reload never touches the SigLIP repo.
    save_model(model, tmp_path / "vqrae")
    reloaded = AutoModel.from_pretrained(tmp_path / "vqrae")
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_from_encoder_pretrained_rejects_vision_config(tmp_path):
    SiglipVisionModel(SiglipVisionConfig(**TINY_VISION)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="`vision_config` comes from the pretrained encoder"):
        VQRAEModel.from_encoder_pretrained(str(tmp_path), vision_config={})


def test_missing_encoder_repo_offline_is_a_clear_error():
    with pytest.raises(OSError, match="google/siglip-does-not-exist"):
        VQRAEModel.from_encoder_pretrained("google/siglip-does-not-exist")


# A fixed-resolution SigLIP2 checkpoint's own preprocessor_config.json (google/siglip2-base-patch16-256, resized).
SIGLIP2_PREPROCESSOR = {
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "SiglipImageProcessor",
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "SiglipProcessor",
    "resample": 2,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 32, "width": 32},
}


def test_encoder_preprocessing_travels_with_the_model(tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor

    torch.manual_seed(0)
    siglip = SiglipModel(SiglipConfig(text_config=_tiny_siglip_text(), vision_config=dict(TINY_VISION)))
    siglip.save_pretrained(tmp_path / "siglip2")
    (tmp_path / "siglip2" / "preprocessor_config.json").write_text(json.dumps(SIGLIP2_PREPROCESSOR))
    write_hub_cache(tmp_path / "siglip2", "google/siglip2-tiny-test")
    model = VQRAEModel.from_encoder_pretrained("google/siglip2-tiny-test", decoder_intermediate_size=37)
    assert model.config.preprocessor_config["resample"] == 2
    assert model.get_image_processor().resample == Image.Resampling.BILINEAR
    save_model(model, tmp_path / "vqrae")
    saved = json.loads((tmp_path / "vqrae" / "preprocessor_config.json").read_text())
    assert saved["resample"] == 2 and saved["size"] == {"shortest_edge": 32}  # then the centred 32 px square
    assert saved["do_center_crop"] is True and saved["crop_size"] == {"height": 32, "width": 32}
    assert AutoImageProcessor.from_pretrained(tmp_path / "vqrae").resample == Image.Resampling.BILINEAR
    reloaded = AutoModel.from_pretrained(tmp_path / "vqrae")
    assert reloaded.get_image_processor().resample == Image.Resampling.BILINEAR
    # Trained from it, the run resizes bilinearly and its output says so.
    from conftest import run
    from vqrae.image_data import load_image_dataset
    from vqrae.training.data import TrainingBatches

    dataset, column = load_image_dataset("train")
    batches = TrainingBatches(dataset, column, model.get_image_processor(), batch_size=2, seed=0)
    assert batches.resample == Image.Resampling.BILINEAR
    run(tmp_path / "trained", "--encoder_name_or_path", str(tmp_path / "siglip2"), sizes=False)
    trained = json.loads((tmp_path / "trained" / "preprocessor_config.json").read_text())
    assert trained["resample"] == 2
    # An encoder without preprocessor_config.json keeps SigLIP's bicubic default.
    siglip.save_pretrained(tmp_path / "siglip")
    plain = VQRAEModel.from_encoder_pretrained(str(tmp_path / "siglip"), decoder_intermediate_size=37)
    assert plain.config.preprocessor_config is None
    assert plain.get_image_processor().resample == Image.Resampling.BICUBIC


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"resample": 9}, r"preprocessor_config.resample` must be a PIL resampling filter"),
        ({"image_std": [0.5, 0.0, 0.5]}, r"preprocessor_config.image_std` must be a list of 3 positive numbers"),
        ({"image_processor_type": "Siglip2ImageProcessor"}, "NaFlex"),
        ({"crop_size": 3}, r"unknown fields \['crop_size'\]"),
    ],
)
def test_bad_preprocessor_config_is_refused(settings, match):
    from conftest import tiny_config

    with pytest.raises(ValueError, match=match):
        tiny_config(preprocessor_config=settings)
