"""Model cards for saved VQRAE folders.

The card is rendered from the folder alone, so every figure on it is one the training run measured: the YAML
metadata (with a `model-index` of the evaluation results), the tokenizer and its size, the evaluation against the
bicubic baseline, the pictures the run drew, a quickstart that the tests execute, and the command that reproduces
the run. Files a folder lacks (an untrained model has no `eval_results.json` and no pictures) are left off the card.

The template is `vqrae/model_cards/vqrae_card.md`, shipped inside the package (the repository's top-level
`model_cards/` points at it).
"""

from __future__ import annotations

import json
import math
import os
from importlib import resources
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import safe_open

from ..atomic_io import atomic_write
from ..configuration_vqrae import MIN_TRANSFORMERS_VERSION, VQRAEConfig, is_number
from .config_files import read_training_config
from .run_files import (
    CODEBOOK_USAGE_FILE,
    EVAL_RESULT_FIELDS,
    EVAL_RESULTS_FILE,
    RECONSTRUCTIONS_FILE,
    TRAINING_CONFIG_FILE,
    TRAINING_CURVES_FILE,
)

__all__ = [
    "read_eval_results",
    "render_model_card",
    "write_model_card",
]

TEMPLATE_NAME = "vqrae_card.md"
# Picture file -> (title, caption), in the order they appear on the card.
PICTURE_CAPTIONS = {
    RECONSTRUCTIONS_FILE: (
        "Reconstructions",
        "Validation images (top row) above their reconstructions from the tokens (bottom row).",
    ),
    TRAINING_CURVES_FILE: (
        "Training curves",
        "Training losses, validation metrics and the share of the codebook each logging window used, over the run.",
    ),
    CODEBOOK_USAGE_FILE: ("Codebook usage", "How often each code is used on the validation images."),
}

_INTERVAL_METRICS = ("psnr", "ssim", "color_error")
# The fields of eval_results.json that always hold a value, with its types (the others may be null: not measured in
# the run, such as `rfid` where no Inception weights exist).
_REQUIRED_FIELDS = {name: types for name, types in EVAL_RESULT_FIELDS.items() if types is not None}


def read_eval_results(folder: str | os.PathLike) -> dict | None:
    """The folder's `eval_results.json` (a flat object, checked field by field), or `None` when it has none."""
    path = Path(folder) / EVAL_RESULTS_FILE
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}.") from error
    if not isinstance(results, dict):
        raise ValueError(f"{path} must hold a JSON object (got {type(results).__name__}).")
    missing = [name for name in EVAL_RESULT_FIELDS if name not in results]
    if missing:
        raise ValueError(f"{path} lacks the fields {missing}; it must hold {list(EVAL_RESULT_FIELDS)}.")
    for name, types in _REQUIRED_FIELDS.items():
        value = results[name]
        if isinstance(value, bool) or not isinstance(value, types):
            allowed = " or ".join(t.__name__ for t in types)
            raise ValueError(f"`{name}` in {path} must be {allowed} (got {value!r}).")
    for name in [f"{prefix}{metric}_interval" for prefix in ("", "bicubic_") for metric in _INTERVAL_METRICS]:
        interval = results[name]
        if interval is not None and (not isinstance(interval, list) or len(interval) != 2):
            raise ValueError(f"`{name}` in {path} must be null or a [low, high] pair (got {interval!r}).")
    for name in ("seam_score", "bicubic_seam_score", "codebook_tokens", "color_error", "bicubic_color_error"):
        value = results[name]
        if value is not None and not is_number(value):
            raise ValueError(f"`{name}` in {path} must be a number or null (got {value!r}).")
    crops = results["crop_codebook_use"]
    if crops is not None and (not isinstance(crops, dict) or not {"crops", "tokens", "used_codes"} <= set(crops)):
        raise ValueError(
            f"`crop_codebook_use` in {path} must be null or an object with `crops`, `tokens` and `used_codes` "
            f"(got {crops!r})."
        )
    held_out = results["held_out"]
    if held_out is not None and (not isinstance(held_out, dict) or "percentage" not in held_out):
        raise ValueError(f"`held_out` in {path} must be null or an object with `percentage` (got {held_out!r}).")
    rfid = results["rfid"]
    if rfid is not None and not is_number(rfid):
        raise ValueError(f"`rfid` in {path} must be a number or null (got {rfid!r}).")
    return results


def render_model_card(
    folder: str | os.PathLike, repo_id: str | None = None, *, license: str = "apache-2.0"
) -> ModelCard:
    """Render the model card of a saved VQRAE folder.

    Args:
        folder: a folder written by `VQRAEModel.save_pretrained` (and, after training, the run's results).
        repo_id: the Hub repository (`"org/name"`) the card is for; it names the model and is what the quickstart
            loads. Without it the quickstart loads the folder by its name, from the folder's parent.
        license: the license identifier for the metadata (SigLIP and vqrae are Apache-2.0).
    """
    try:
        import jinja2  # noqa: F401  (ModelCard.from_template needs it)
    except ImportError as error:
        raise ImportError('Rendering a model card needs jinja2: `pip install -e ".[train]"`.') from error
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder} is not a saved VQRAE model: it has no config.json (save it with save_pretrained).")
    model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    if model_type != "vqrae":
        raise ValueError(f"{config_path} must be a VQRAE config (model_type 'vqrae'), got model_type {model_type!r}.")
    if repo_id is not None:
        check_repo_id(repo_id)
    config = VQRAEConfig.from_pretrained(folder)

    model_name = repo_id.split("/")[-1] if repo_id else folder.resolve().name
    evaluation = read_eval_results(folder)
    base_model = _hub_id(config.encoder_name_or_path)
    datasets = []
    for name in ((evaluation or {}).get("dataset_name"), _training_dataset(folder)):
        if _hub_id(name) and name not in datasets:
            datasets.append(name)

    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
        license=license,
        tags=["vqrae", "image-tokenizer", "fsq" if config.use_fsq else "vq", "siglip", "custom_code"],
        base_model=base_model,
        datasets=datasets or None,
        # The model-index is named after the model; without results, `model_name` would only clutter the metadata.
        model_name=model_name if evaluation else None,
        eval_results=_eval_results(evaluation) if evaluation else None,
    )
    template = resources.files("vqrae").joinpath("model_cards", TEMPLATE_NAME).read_text(encoding="utf-8")
    return ModelCard.from_template(
        card_data,
        template_str=template,
        model_name=model_name,
        model_id=repo_id or folder.resolve().name,
        repo_id=repo_id,
        base_model=base_model,
        encoder_name_or_path=config.encoder_name_or_path,
        image_size=config.vision_config.image_size,
        min_transformers=MIN_TRANSFORMERS_VERSION,
        codebook_size=config.codebook_size,
        quantizer=_quantizer(config),
        architecture=_architecture(config, folder),
        evaluation=_evaluation(evaluation, config.codebook_size) if evaluation else None,
        pictures=[
            {"file": file, "title": title, "caption": caption}
            for file, (title, caption) in PICTURE_CAPTIONS.items()
            if (folder / file).is_file()
        ],
        has_training_config=(folder / TRAINING_CONFIG_FILE).is_file(),
    )


def write_model_card(folder: str | os.PathLike, repo_id: str | None = None, *, license: str = "apache-2.0") -> Path:
    """Render the folder's model card (see `render_model_card`) and write it to `folder/README.md`."""
    path = Path(folder) / "README.md"
    atomic_write(path, str(render_model_card(folder, repo_id, license=license)))
    return path


# -- pieces of the card ----------------------------------------------------------------------------------------------


def check_repo_id(repo_id) -> None:
    """`ValueError` unless `repo_id` is a valid Hub repository id."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"`repo_id` must be a Hub repository id like 'org/name' (got {repo_id!r}): {error}"
        ) from error


def _hub_id(name) -> str | None:
    """`name` when it reads as a Hub repository `org/name` rather than a local path (for `base_model`/`datasets`)."""
    if not isinstance(name, str) or name.count("/") != 1 or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _training_dataset(folder: Path) -> str | None:
    path = folder / TRAINING_CONFIG_FILE
    if not path.is_file():
        return None
    options, _ = read_training_config(path)
    return options.get("dataset_name") if isinstance(options, dict) else None


def _eval_results(evaluation: dict) -> list[EvalResult]:
    metrics = [("psnr", "PSNR"), ("ssim", "SSIM"), ("codebook_utilization", "Codebook utilisation")]
    if evaluation["rfid"] is not None:
        metrics.append(("rfid", "rFID"))
    return [
        EvalResult(
            task_type="image-feature-extraction",
            task_name="Image reconstruction",
            dataset_type=evaluation["dataset_name"],
            dataset_name=evaluation["dataset_name"],
            dataset_split=_split_label(evaluation),
            metric_type=metric,
            metric_name=name,
            metric_value=evaluation[metric],
        )
        for metric, name in metrics
    ]


def _quantizer(config) -> dict:
    grid_h, grid_w = config.token_grid_size
    tokens = grid_h * grid_w
    bits_per_token = math.log2(config.codebook_size)
    if config.use_fsq:
        kind = "FSQ (finite scalar quantization)"
        description = f"finite scalar quantization (FSQ, levels {config.fsq_levels})"
        noise = config.fsq_noise_probability
        training = f"; in training, {noise:.0%} of tokens skip the rounding for uniform noise one level step wide"
        codebook = ("Levels", f"{config.fsq_levels}{training + ' (inference always rounds)' if noise else ''}")
    else:
        width = config.codebook_dim or config.vision_config.hidden_size
        kind = "SimVQ (learned linear map of a frozen codebook)" if config.use_simvq else "VQ (learned codebook)"
        description = f"a learned {'SimVQ' if config.use_simvq else 'VQ'} codebook"
        codebook = ("Codebook", f"{config.num_embeddings:,} vectors of dimension {width}")
    post_quant_conv = "off"
    if config.use_post_quant_conv:
        kernel = config.post_quant_conv_kernel_size
        placement = "on the quantizer's codes, Cosmos-Tokenizer's placement" if config.post_quant_conv_on_codes else ""
        post_quant_conv = (
            f"on ({kernel}×{kernel} convolution before the decoder{', ' + placement if placement else ''})"
        )
    return {
        "description": description,
        "grid": f"{grid_h} × {grid_w}",
        "grid_shape": f"{grid_h}, {grid_w}",
        "rows": [
            ("Quantizer", kind),
            codebook,
            ("Codebook size", f"{config.codebook_size:,}"),
            ("Token grid", f"{grid_h} × {grid_w} = {tokens} tokens per {config.vision_config.image_size} px image"),
            ("Bits per token", f"{bits_per_token:.2f}"),
            ("Bits per image", f"{tokens * bits_per_token:,.0f}"),
            ("post_quant_conv", post_quant_conv),
            ("Code normalisation", "on" if config.normalize_codes else "off"),
        ],
    }


def _architecture(config, folder: Path) -> list[tuple[str, str]]:
    vision = config.vision_config
    rows = [
        (
            "Encoder",
            f"SigLIP ViT: {vision.num_hidden_layers} layers, width {vision.hidden_size}, "
            f"{vision.num_attention_heads} heads, patch {vision.patch_size}, {vision.image_size} px",
        ),
        (
            "Decoder",
            f"ViT: {config.decoder_num_hidden_layers} layers, width {config.decoder_hidden_size}, "
            f"{config.decoder_num_attention_heads} heads, MLP {config.decoder_intermediate_size}"
            + (
                f"; patches overlap by {config.decoder_patch_overlap} px, blended"
                if config.decoder_patch_overlap
                else ""
            )
            + (
                f"; a {config.decoder_conv_head_channels}-channel conv head"
                if config.decoder_conv_head_channels
                else ""
            ),
        ),
    ]
    counts = _parameter_counts(folder)
    if counts:
        total, encoder = counts
        rows.append(("Parameters", f"{_millions(total)} in all, {_millions(encoder)} of them in the encoder"))
    return rows


def _parameter_counts(folder: Path) -> tuple[int, int] | None:
    """(all parameters, encoder parameters) from the safetensors headers, without loading any tensor."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    total = encoder = 0
    for file in files:
        with safe_open(folder / file, framework="pt") as weights:
            for key in weights.keys():
                count = math.prod(weights.get_slice(key).get_shape())
                total += count
                encoder += count if key.startswith("encoder.") else 0
    return total, encoder


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f} M" if count >= 100_000 else f"{count:,}"


def _split_label(evaluation: dict) -> str:
    """The evaluated split, saying when its images were held out of the training split."""
    held_out = evaluation.get("held_out")
    if held_out is None:
        return evaluation["dataset_split"]
    return f"{evaluation['dataset_split']} ({held_out['percentage']:g}% held out, never trained on)"


def _with_interval(value: float, interval, digits: int) -> str:
    return (
        f"{value:.{digits}f}"
        if interval is None
        else f"{value:.{digits}f} ({interval[0]:.{digits}f}–{interval[1]:.{digits}f})"
    )


def _evaluation(evaluation: dict, codebook_size: int) -> dict:
    rfid, tokens = evaluation["rfid"], evaluation["codebook_tokens"]
    utilization = f"{evaluation['codebook_utilization']:.1%} ({evaluation['used_codes']:,} of {codebook_size:,} codes)"
    if tokens is not None:
        cap = min(1.0, tokens / codebook_size)
        utilization += f", over {tokens:,} tokens" + (f" (at most {cap:.1%} possible)" if cap < 1 else "")
    seams = evaluation["seam_score"]
    return {
        **{name: evaluation[name] for name in ("step", "num_images", "dataset_name", "image_size")},
        "dataset_split": _split_label(evaluation),
        "rows": [
            (
                "PSNR (dB) ↑",
                _with_interval(evaluation["psnr"], evaluation["psnr_interval"], 2),
                _with_interval(evaluation["bicubic_psnr"], evaluation["bicubic_psnr_interval"], 2),
            ),
            (
                "SSIM ↑",
                _with_interval(evaluation["ssim"], evaluation["ssim_interval"], 4),
                _with_interval(evaluation["bicubic_ssim"], evaluation["bicubic_ssim_interval"], 4),
            ),
            (
                "Colour error (CIEDE2000 of the mean colour) ↓",
                *(
                    "not measured"
                    if evaluation[prefix + "color_error"] is None
                    else _with_interval(
                        evaluation[prefix + "color_error"], evaluation[prefix + "color_error_interval"], 2
                    )
                    for prefix in ("", "bicubic_")
                ),
            ),
            (
                "Seam score (1 = as in the photos)",
                "not measured" if seams is None else f"{seams:.2f}",
                "—" if evaluation["bicubic_seam_score"] is None else f"{evaluation['bicubic_seam_score']:.2f}",
            ),
            ("rFID ↓", "not measured" if rfid is None else f"{rfid:.2f}", "—"),
            (
                "Bits per image",
                f"{evaluation['bits_per_image']:,.0f}",
                f"{evaluation['bicubic_bits_per_image']:,.0f}",
            ),
            ("Codebook utilisation", utilization, "—"),
            ("Codebook perplexity", f"{evaluation['perplexity']:,.1f}", "—"),
            *_crop_rows(evaluation["crop_codebook_use"]),
        ],
    }


def _crop_rows(crops: dict | None) -> list[tuple[str, str, str]]:
    """The codebook use over random crops (`vqrae-evaluate --num_crops`), when measured."""
    if crops is None:
        return []
    share = crops["used_codes"] / crops["codebook_size"]
    return [
        (
            f"Codebook utilisation over {crops['crops']:,} random crops",
            f"{share:.1%} ({crops['used_codes']:,} codes over {crops['tokens']:,} tokens)",
            "—",
        )
    ]
