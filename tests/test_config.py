"""VQRAEConfig: the seed's configurations, defaults, validation, and old config.json files."""

import json

import pytest

from conftest import SEED_PRESETS, TINY_VISION, tiny_config
from vqrae import VQRAEConfig


def test_defaults():
    config = VQRAEConfig()
    assert config.model_type == "vqrae"
    assert config.use_fsq is True and config.fsq_levels == [8, 8, 8, 5, 5, 5]
    assert config.codebook_size == 64000 and config.num_embeddings == 16384
    assert config.use_post_quant_conv is False and config.post_quant_conv_kernel_size == 1
    assert config.normalize_codes is False
    assert config.vision_config.model_type == "siglip_vision_model"
    assert config.vision_config.vision_use_head is False
    assert config.decoder_hidden_size == config.vision_config.hidden_size  # filled in once, when built


@pytest.mark.parametrize("name", sorted(SEED_PRESETS))
def test_seed_configurations_round_trip(name, tmp_path):
    config = tiny_config(**SEED_PRESETS[name])
    for key, value in SEED_PRESETS[name].items():
        assert getattr(config, key) == value
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for key, value in SEED_PRESETS[name].items():
        assert saved[key] == value
    reloaded = VQRAEConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    assert type(reloaded.vision_config).__name__ == "SiglipVisionConfig"


def test_transformers_keyword_arguments_still_pass():
    config = tiny_config(output_hidden_states=True, num_labels=3)
    assert config.output_hidden_states is True and config.num_labels == 3


def test_pooling_head_is_always_off():
    config = VQRAEConfig(vision_config=dict(TINY_VISION, vision_use_head=True))
    assert config.vision_config.vision_use_head is False


def test_old_config_json_without_new_fields_loads(tmp_path):
    # A config.json written before post_quant_conv, code normalisation, SimVQ and the decoder sizes existed.
    old = {"model_type": "vqrae", "use_fsq": True, "fsq_levels": [8, 8, 8], "vision_config": dict(TINY_VISION)}
    (tmp_path / "config.json").write_text(json.dumps(old))
    config = VQRAEConfig.from_pretrained(tmp_path)
    assert config.fsq_levels == [8, 8, 8]
    assert config.use_post_quant_conv is False and config.normalize_codes is False and config.use_simvq is False
    assert config.decoder_hidden_size == 32  # mirrors the encoder, filled in when the config is built


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"fsq_levels": []}, ValueError, r"`fsq_levels` must be a non-empty list of integers >= 2 \(got \[\]\)"),
        ({"fsq_levels": [8, 1, 5]}, ValueError, r"`fsq_levels`.*\(got \[8, 1, 5\]\)"),
        ({"fsq_levels": [8, 2.5]}, TypeError, r"Field 'fsq_levels'.*Invalid item at index 1"),
        ({"fsq_levels": "888"}, TypeError, r"Field 'fsq_levels' with value '888'"),
        ({"post_quant_conv_kernel_size": 2}, ValueError, r"`post_quant_conv_kernel_size` must be a positive odd"),
        ({"post_quant_conv_kernel_size": 0}, ValueError, r"`post_quant_conv_kernel_size`.*got 0"),
        ({"post_quant_conv_kernel_size": -3}, ValueError, r"`post_quant_conv_kernel_size`.*got -3"),
        (
            {"fsq_noise_probability": 1.5},
            ValueError,
            r"`fsq_noise_probability` must be a number from 0 to 1 \(got 1.5\)",
        ),
        ({"fsq_noise_probability": -0.1}, ValueError, r"`fsq_noise_probability`.*\(got -0.1\)"),
        ({"fsq_noise_probability": float("nan")}, ValueError, r"`fsq_noise_probability`.*\(got nan\)"),
        ({"fsq_noise_probability": "0.5"}, TypeError, r"Field 'fsq_noise_probability'"),
        ({"num_embeddings": 1}, ValueError, r"`num_embeddings` must be an integer >= 2 \(got 1\)"),
        ({"codebook_dim": 0}, ValueError, r"`codebook_dim` must be an integer >= 1 or unset \(got 0\)"),
        ({"commitment_cost": -0.1}, ValueError, r"`commitment_cost` must be a finite number >= 0"),
        ({"use_fsq": "yes"}, TypeError, r"Field 'use_fsq' expected bool, got str \(value: 'yes'\)"),
        ({"use_post_quant_conv": 1}, TypeError, r"Field 'use_post_quant_conv' expected bool, got int"),
        (
            {"decoder_hidden_size": 30, "decoder_num_attention_heads": 4},
            ValueError,
            r"`decoder_hidden_size` must be divisible by `decoder_num_attention_heads` \(got 30 and 4\)",
        ),
        ({"decoder_num_hidden_layers": 0}, ValueError, r"`decoder_num_hidden_layers` must be an integer >= 1"),
        ({"decoder_hidden_act": "swishy"}, ValueError, r"`decoder_hidden_act` must be one of"),
        ({"initializer_range": 0}, ValueError, r"`initializer_range` must be a finite number > 0"),
        ({"encoder_name_or_path": 3}, TypeError, r"Field 'encoder_name_or_path' with value 3"),
        (
            {"vision_config": dict(TINY_VISION, image_size=30)},
            ValueError,
            r"`vision_config.image_size` must be a multiple of `vision_config.patch_size`",
        ),
        ({"vision_config": {"model_type": "clip_vision_model"}}, ValueError, r"must be a SigLIP vision config"),
        ({"vision_config": 5}, TypeError, r"Field 'vision_config' with value 5 doesn't match"),
        ({"vision_config": dict(TINY_VISION, hidden_size="wide")}, TypeError, r"(?s)`vision_config`.*'hidden_size'"),
        ({"vision_config": dict(TINY_VISION, num_channels=0)}, ValueError, r"`vision_config.num_channels`.*got 0"),
        ({"commitment_cost": float("inf")}, ValueError, r"`commitment_cost` must be a finite number"),
        ({"initializer_range": float("nan")}, ValueError, r"`initializer_range` must be a finite number > 0"),
        ({"fsq_level": [8, 8]}, TypeError, r"unknown field `fsq_level`; did you mean `fsq_levels`"),
        ({"use_post_quant": True}, TypeError, r"unknown field `use_post_quant`; did you mean `use_post_quant_conv`"),
    ],
)
def test_invalid_fields_are_named(overrides, error, match):
    with pytest.raises(error, match=match):
        tiny_config(**overrides)


# Each group of fields that acts only with another setting: (the field, a value other than its default), the
# setting that makes it act, and the setting that leaves it inert.
INEFFECTIVE = [
    *(
        (name, value, {"use_fsq": False}, {"use_fsq": True})
        for name, value in [
            ("use_simvq", True),
            ("num_embeddings", 64),
            ("codebook_dim", 8),
            ("commitment_cost", 0.5),
            ("vq_cosine_lookup", True),
            ("vq_restart_unused_steps", 0),
        ]
    ),
    ("fsq_levels", [8, 8, 8], {"use_fsq": True}, {"use_fsq": False}),
    ("fsq_noise_probability", 0.5, {"use_fsq": True}, {"use_fsq": False}),
    ("post_quant_conv_kernel_size", 3, {"use_post_quant_conv": True}, {"use_post_quant_conv": False}),
    ("post_quant_conv_on_codes", True, {"use_post_quant_conv": True}, {"use_post_quant_conv": False}),
]


@pytest.mark.parametrize(("name", "value", "acting", "inert"), INEFFECTIVE, ids=[case[0] for case in INEFFECTIVE])
def test_a_field_without_effect_is_refused_unless_at_its_default(name, value, acting, inert):
    (setting, needed), (_, other) = *acting.items(), *inert.items()
    assert getattr(tiny_config(**acting, **{name: value}), name) == value
    default = getattr(tiny_config(**inert), name)
    assert getattr(tiny_config(**inert, **{name: default}), name) == default  # the default, even spelt out, is fine
    match = (
        rf"^`{name}={value!r}` has no effect with `{setting}={other}`: it needs `{setting}={needed}` \(.*\)\. Pass "
        rf"that, or leave `{name}` at its default {default!r}\.$"
    )
    with pytest.raises(ValueError, match=match.replace("[", r"\[").replace("]", r"\]")):
        tiny_config(**inert, **{name: value})


@pytest.mark.parametrize("use_fsq", [True, False])
def test_a_config_json_of_an_earlier_version_with_every_field_at_its_default_loads(use_fsq, tmp_path):
    # Earlier versions wrote every field; those that did nothing held their defaults.
    old = {
        "model_type": "vqrae",
        "vision_config": dict(TINY_VISION, model_type="siglip_vision_model"),
        "use_fsq": use_fsq,
        "fsq_levels": [8, 8, 8, 5, 5, 5] if not use_fsq else [8, 8, 8],
        "num_embeddings": 16384 if use_fsq else 64,
        "codebook_dim": None,
        "commitment_cost": 0.25,
        "use_simvq": False,
        "vq_cosine_lookup": False,
        "vq_restart_unused_steps": 20,
        "use_post_quant_conv": False,
        "post_quant_conv_kernel_size": 1,
        "post_quant_conv_on_codes": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(old))
    config = VQRAEConfig.from_pretrained(tmp_path)
    assert config.use_fsq is use_fsq and config.codebook_size == (512 if use_fsq else 64)


def _training_presets():
    from vqrae.training.config_files import preset_config_dir

    return sorted(path.stem for path in preset_config_dir().glob("*.yaml"))


@pytest.mark.parametrize("preset", _training_presets())
def test_every_training_preset_builds_its_model(preset):
    """Each YAML preset, on a random tiny encoder (with the size's decoder fields) and as the config it gives a
    pretrained encoder, with and without `--use_simvq` where it trains VQ."""
    from vqrae.cli.train import parse_train_args
    from vqrae.training.trainer import build_model

    assert {"cosmos_fsq", "standard_fsq", "tiny_cpu", "vq"} <= set(_training_presets())
    model_args, _, _ = parse_train_args(["--config", preset])
    model = build_model(model_args)
    assert model.config.use_post_quant_conv == (model.post_quant_conv is not None)
    VQRAEConfig(vision_config=dict(TINY_VISION), **model_args.config_kwargs())
    if not model.config.use_fsq:
        simvq_args, _, _ = parse_train_args(["--config", preset, "--use_simvq", "true"])
        assert build_model(simvq_args).config.use_simvq is True


@pytest.mark.parametrize("name", sorted(SEED_PRESETS))
def test_every_quantizer_preset_builds_with_and_without_the_size_fields(name):
    from vqrae.training.args import ModelArguments

    for size_preset in (False, True):
        kwargs = ModelArguments(quantizer=name).config_kwargs(size_preset=size_preset)
        config = VQRAEConfig(vision_config=dict(TINY_VISION), **kwargs)
        assert config.use_fsq == SEED_PRESETS[name]["use_fsq"]
