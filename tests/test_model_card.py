"""The model card: metadata and model-index equal to the run's results, pictures, a quickstart that runs, packaging."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

from conftest import SEED_PRESETS, save_model, tiny_model
from vqrae import to_pil_images
from vqrae.training.model_card import read_eval_results, render_model_card, write_model_card
from vqrae.training.run_files import EVAL_RESULT_FIELDS, PICTURES

EVAL_RESULTS = {
    "dataset_name": "org/photos",
    "dataset_split": "validation",
    "num_images": 12,
    "image_size": 32,
    "step": 250,
    "psnr": 21.734912,
    "ssim": 0.6123456,
    "codebook_utilization": 0.0034375,
    "used_codes": 220,
    "perplexity": 187.25,
    "bits_per_image": 255.45254855459342,
    "bicubic_psnr": 19.5,
    "bicubic_ssim": 0.4512,
    "bicubic_bits_per_image": 384,
    "rfid": 48.125,
}
# The fields a run leaves null when it did not measure them (all of them here but rfid).
EVAL_RESULTS = {name: EVAL_RESULTS.get(name) for name in EVAL_RESULT_FIELDS}


def make_run_folder(folder: Path, preset: str = "cosmos_fsq", pictures=tuple(PICTURES), **eval_overrides) -> Path:
    """A folder shaped like a finished training run: the saved tiny model, eval_results.json, PNGs, the run's
    options and log. Returns the folder."""
    model = tiny_model(0, encoder_name_or_path="google/siglip-tiny-test", **SEED_PRESETS[preset])
    save_model(model, folder)
    (folder / "eval_results.json").write_text(json.dumps({**EVAL_RESULTS, **eval_overrides}))
    for index, name in enumerate(pictures):
        Image.new("RGB", (16, 8), (40 * index, 90, 200)).save(folder / name)
    (folder / "training_config.yaml").write_text("dataset_name: org/photos\nmax_steps: 250\nlearning_rate: 0.001\n")
    (folder / "metrics.jsonl").write_text('{"step": 250, "loss": 0.1}\n')
    return folder


def picture_links(card: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", card)


def quickstart_code(card: str) -> str:
    match = re.search(r"## Quickstart\n.*?```python\n(.*?)```", card, flags=re.DOTALL)
    assert match, "the card has no python quickstart"
    return match.group(1)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    return make_run_folder(tmp_path_factory.mktemp("card") / "vqrae-run")


# -- metadata --------------------------------------------------------------------------------------------------------


def test_card_reparses_with_metadata_and_model_index_equal_to_eval_results(run_folder, tmp_path):
    path = tmp_path / "README.md"
    render_model_card(run_folder, repo_id="org/vqrae-tiny").save(path)
    card = ModelCard.load(path)
    data = card.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-feature-extraction"
    assert data.license == "apache-2.0"
    assert data.tags == ["vqrae", "image-tokenizer", "fsq", "siglip", "custom_code"]
    assert data.base_model == "google/siglip-tiny-test"
    assert data.datasets == ["org/photos"]
    assert data.model_name == "vqrae-tiny"
    metrics = {result.metric_type: result for result in data.eval_results}
    assert set(metrics) == {"psnr", "ssim", "codebook_utilization", "rfid"}
    for name, result in metrics.items():
        assert result.metric_value == EVAL_RESULTS[name]
        assert result.dataset_name == result.dataset_type == "org/photos"
        assert result.dataset_split == "validation"
        assert result.task_type == "image-feature-extraction"


def test_eval_table_shows_measured_figures_and_bicubic_baseline(run_folder):
    text = render_model_card(run_folder, repo_id="org/vqrae-tiny").text
    assert "| PSNR (dB) ↑ | 21.73 | 19.50 |" in text
    assert "| SSIM ↑ | 0.6123 | 0.4512 |" in text
    assert "| rFID ↓ | 48.12 | — |" in text
    assert "| Bits per image | 255 | 384 |" in text
    assert "| Codebook utilisation | 0.3% (220 of 64,000 codes) | — |" in text
    assert "at step 250, on 12 images (32 px) of the `validation` split of `org/photos`" in " ".join(text.split())


def test_rfid_not_measured_is_said_and_left_out_of_the_model_index(tmp_path):
    folder = make_run_folder(tmp_path / "run", rfid=None)
    card = render_model_card(folder)
    assert "| rFID ↓ | not measured | — |" in card.text
    assert {result.metric_type for result in card.data.eval_results} == {"psnr", "ssim", "codebook_utilization"}


def test_colour_error_row_shows_both_figures_with_intervals_and_unmeasured_ones_as_such(tmp_path):
    colour = {"color_error": 8.7654, "color_error_interval": [7.5, 9.25], "bicubic_color_error": 0.125}
    text = render_model_card(make_run_folder(tmp_path / "run", **colour)).text
    # The baseline without an interval shows just its value.
    assert "| Colour error (CIEDE2000 of the mean colour) ↓ | 8.77 (7.50–9.25) | 0.12 |" in text
    old = render_model_card(make_run_folder(tmp_path / "old")).text  # the colour error not measured (null)
    assert "| Colour error (CIEDE2000 of the mean colour) ↓ | not measured | not measured |" in old
    (tmp_path / "old" / "eval_results.json").write_text(json.dumps({**EVAL_RESULTS, "color_error": "red"}))
    with pytest.raises(ValueError, match=r"`color_error` .* must be a number or null \(got 'red'\)"):
        read_eval_results(tmp_path / "old")


def test_only_hub_datasets_go_into_the_metadata(tmp_path):
    folder = make_run_folder(tmp_path / "run", dataset_name="builtin:photos")
    (folder / "training_config.yaml").write_text("train_dir: data/train\nmax_steps: 10\n")
    card = render_model_card(folder)
    assert card.data.datasets is None
    assert {result.dataset_name for result in card.data.eval_results} == {"builtin:photos"}


def test_quantizer_table_fsq_with_post_quant_conv(run_folder):
    text = render_model_card(run_folder).text
    for row in (
        "| Quantizer | FSQ (finite scalar quantization) |",
        "| Levels | [8, 8, 8, 5, 5, 5] |",
        "| Codebook size | 64,000 |",
        "| Token grid | 4 × 4 = 16 tokens per 32 px image |",
        "| Bits per token | 15.97 |",
        "| Bits per image | 255 |",
        "| post_quant_conv | on (1×1 convolution before the decoder) |",
    ):
        assert row in text


def test_quantizer_table_says_when_training_substituted_noise_for_rounding(tmp_path):
    folder = tmp_path / "noisy"
    save_model(tiny_model(0, **SEED_PRESETS["cosmos_fsq"], fsq_noise_probability=0.5), folder)
    text = render_model_card(folder).text
    assert (
        "| Levels | [8, 8, 8, 5, 5, 5]; in training, 50% of tokens skip the rounding for uniform noise one level step "
        "wide (inference always rounds) |"
    ) in text


def test_untrained_vq_model_card_has_no_results_pictures_or_training(tmp_path):
    folder = tmp_path / "fresh"
    save_model(tiny_model(0, encoder_name_or_path=str(tmp_path), **SEED_PRESETS["vq"]), folder)
    path = write_model_card(folder)
    assert path == folder / "README.md"
    card = ModelCard.load(path)
    assert card.content == render_model_card(folder).content
    assert card.data.tags == ["vqrae", "image-tokenizer", "vq", "siglip", "custom_code"]
    assert card.data.eval_results is None and card.data.datasets is None
    assert card.data.base_model is None  # a local encoder folder is not a Hub model
    assert "model-index" not in card.content
    assert "| Codebook | 16,384 vectors of dimension 32 |" in card.text
    assert "| post_quant_conv | off |" in card.text
    assert "| Decoder | ViT: 2 layers, width 32, 4 heads, MLP 37 |" in card.text  # the seed's decoder
    assert "## Evaluation" not in card.text and "## Training" not in card.text
    assert picture_links(card.text) == []
    assert "no evaluation results" in card.text


def test_architecture_names_the_decoders_blending_and_conv_head(tmp_path):
    folder = tmp_path / "blended"
    save_model(tiny_model(0, decoder_patch_overlap=3, decoder_conv_head_channels=8), folder)
    decoder = "| Decoder | ViT: 2 layers, width 32, 4 heads, MLP 37; patches overlap by 3 px, blended; "
    decoder += "a 8-channel conv head |"
    assert decoder in render_model_card(folder).text


def test_picture_links_point_at_the_folder_pictures(tmp_path):
    folder = make_run_folder(tmp_path / "run", pictures=("reconstructions.png", "codebook_usage.png"))
    links = picture_links(render_model_card(folder).text)
    assert links == ["reconstructions.png", "codebook_usage.png"]
    assert all((folder / link).is_file() for link in links)


def test_training_command_uses_the_runs_config(run_folder):
    text = render_model_card(run_folder, repo_id="org/vqrae-tiny").text
    assert (
        "hf download org/vqrae-tiny training_config.yaml --local-dir .\nvqrae-train --config training_config.yaml"
        in text
    )


# -- errors ----------------------------------------------------------------------------------------------------------


def test_bad_eval_results_are_named(tmp_path):
    folder = make_run_folder(tmp_path / "run")
    results = dict(EVAL_RESULTS)
    del results["ssim"]
    (folder / "eval_results.json").write_text(json.dumps(results))
    with pytest.raises(ValueError, match=r"lacks the fields \['ssim'\]"):
        render_model_card(folder)
    # A field the writer always writes, null or not, is never filled in for a file that lacks it.
    (folder / "eval_results.json").write_text(json.dumps({k: v for k, v in EVAL_RESULTS.items() if k != "seam_score"}))
    with pytest.raises(ValueError, match=r"lacks the fields \['seam_score'\]"):
        read_eval_results(folder)
    (folder / "eval_results.json").write_text(json.dumps({**EVAL_RESULTS, "psnr": "high"}))
    with pytest.raises(ValueError, match=r"`psnr` in .* must be int or float \(got 'high'\)"):
        read_eval_results(folder)
    (folder / "eval_results.json").write_text(json.dumps({**EVAL_RESULTS, "rfid": True}))
    with pytest.raises(ValueError, match=r"`rfid` .* must be a number or null \(got True\)"):
        read_eval_results(folder)
    (folder / "eval_results.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        read_eval_results(folder)


def test_not_a_vqrae_folder_or_bad_repo_id(run_folder, tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        render_model_card(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'vqrae'.*'bert'"):
        render_model_card(tmp_path)
    with pytest.raises(ValueError, match="`repo_id` must be a Hub repository id like 'org/name' \\(got 'org/a/b'\\)"):
        render_model_card(run_folder, repo_id="org/a/b")


# -- the quickstart runs -------------------------------------------------------------------------------------------


def test_quickstart_from_the_card_runs_against_the_saved_folder(run_folder, tmp_path):
    """The snippet is run as written, next to the folder it names, without vqrae, and reconstructs like the model."""
    work = tmp_path / "work"
    shutil.copytree(run_folder, work / run_folder.name)
    code = quickstart_code(render_model_card(work / run_folder.name).text)
    assert f'AutoModel.from_pretrained("{run_folder.name}", trust_remote_code=True)' in code
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(work / "image.jpg")
    script = 'import sys\nsys.modules["vqrae"] = None  # the card promises it runs without vqrae\n' + code
    result = subprocess.run([sys.executable, "-c", script], cwd=work, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([1, 4, 4])" in result.stdout

    from transformers import AutoModel

    model = AutoModel.from_pretrained(run_folder).eval()
    pixel_values = model.get_image_processor()(
        images=Image.open(work / "image.jpg").convert("RGB"), return_tensors="pt"
    ).pixel_values
    with torch.no_grad():
        expected = to_pil_images(model.decode_from_indices(model.encode(pixel_values).indices).reconstruction, model)[
            0
        ]
    produced = np.asarray(Image.open(work / "reconstruction.png"), dtype=np.int16)
    assert produced.shape == (32, 32, 3)
    assert np.abs(produced - np.asarray(expected, dtype=np.int16)).max() <= 1


# -- packaging -------------------------------------------------------------------------------------------------------


def test_template_ships_in_the_wheel_and_renders_from_a_non_editable_install(run_folder, installed_wheel, tmp_path):
    _, site = installed_wheel
    script = (
        "import vqrae, sys\n"
        f"assert vqrae.__file__.startswith({str(site)!r}), vqrae.__file__\n"
        "from vqrae.training.model_card import render_model_card\n"
        f"print(render_model_card({str(run_folder)!r}, 'org/vqrae-tiny').data.model_name)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "vqrae-tiny"
