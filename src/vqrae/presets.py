"""Named configurations, in one place for training, tests and benchmarks: the quantizers of the seed's three
configurations (DESIGN.md) and the SigLIP sizes of a randomly initialised encoder."""

from __future__ import annotations

__all__ = ["QUANTIZER_PRESETS", "SIZE_PRESET_MODEL_FIELDS", "VISION_PRESETS"]

# Quantizers of the seed's three configurations (DESIGN.md), by name.
QUANTIZER_PRESETS = {
    "cosmos_fsq": {
        "use_fsq": True,
        "fsq_levels": [8, 8, 8, 5, 5, 5],
        "use_post_quant_conv": True,
        "post_quant_conv_kernel_size": 1,
    },
    "standard_fsq": {"use_fsq": True, "fsq_levels": [8, 8, 8], "use_post_quant_conv": False},
    "vq": {"use_fsq": False, "num_embeddings": 16384, "use_post_quant_conv": False},
}

# SigLIP vision configs for a randomly initialised encoder, by name. `tiny` is the built-in CPU default.
VISION_PRESETS = {
    "tiny": {
        "image_size": 64,
        "patch_size": 8,
        "hidden_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "intermediate_size": 512,
    },
    "small": {
        "image_size": 224,
        "patch_size": 16,
        "hidden_size": 384,
        "num_hidden_layers": 12,
        "num_attention_heads": 6,
        "intermediate_size": 1536,
    },
    "base": {
        "image_size": 256,
        "patch_size": 16,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    },
}

# VQRAEConfig fields that come with a named size (for a randomly initialised model only); explicit options win.
# The tiny CPU model decodes with 3 blocks after a 1-block encoder (decoding is the harder half: it must turn 16 bits
# per patch back into 192 pixel values), mixes neighbouring codes with a 3x3 post_quant_conv, which gives the
# decoder the context for smooth patch borders from the first step, decodes overlapping patches blended over 6 pixels
# at each border and smooths the image with a 32-channel conv head (no visible patch grid, and a PSNR at least as
# high: BENCHMARKS.md section 6). With FSQ, half its tokens skip the rounding in training for noise one level step
# wide (BENCHMARKS.md section 6d).
SIZE_PRESET_MODEL_FIELDS = {
    "tiny": {
        "decoder_num_hidden_layers": 3,
        "post_quant_conv_kernel_size": 3,
        "decoder_patch_overlap": 3,
        "decoder_conv_head_channels": 32,
        "fsq_noise_probability": 0.5,
    }
}
