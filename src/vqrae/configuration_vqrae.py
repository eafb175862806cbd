"""VQRAE model configuration."""

import difflib
import functools
import math
import re

import transformers

# The oldest transformers this model code runs on; pyproject.toml's dependency names the same version (a test keeps
# them equal) and the model card states it. Checked here, before the imports that need it, because this is the
# first module `trust_remote_code` loads, and with transformers 4 the next line would fail with "cannot import name
# 'PreTrainedConfig'", which does not say what to do.
MIN_TRANSFORMERS_VERSION = "5.0"


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


if _major_minor(transformers.__version__) < _major_minor(MIN_TRANSFORMERS_VERSION):
    raise ImportError(
        f"This VQRAE model code needs transformers >= {MIN_TRANSFORMERS_VERSION}, but transformers "
        f"{transformers.__version__} is installed: upgrade it with `pip install -U 'transformers>="
        f"{MIN_TRANSFORMERS_VERSION}'`."
    )

from transformers import AutoConfig  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec, strict  # noqa: E402
from transformers.utils import logging  # noqa: E402

logger = logging.get_logger(__name__)

SUPPORTED_ENCODER_TYPES = ("siglip_vision_model",)
# The image processors of fixed-resolution SigLIP and SigLIP2 checkpoints (one preprocessing, three backends).
SUPPORTED_IMAGE_PROCESSORS = ("SiglipImageProcessor", "SiglipImageProcessorFast", "SiglipImageProcessorPil")
# What `preprocessor_config` keeps of an encoder's preprocessor_config.json (the size is the encoder's image_size).
PREPROCESSOR_FIELDS = (
    "image_processor_type",
    "resample",
    "image_mean",
    "image_std",
    "rescale_factor",
    "do_convert_rgb",
)
DEFAULT_FSQ_LEVELS = (8, 8, 8, 5, 5, 5)
# Fields that act only with another setting: field -> (that setting, the value it needs, how vqrae-train sets it).
# Anywhere else such a field must keep its default, so a config never records an option that did nothing.
_NEEDS_VQ = ("use_fsq", False, "--quantizer vq")
_NEEDS_FSQ = ("use_fsq", True, "--quantizer cosmos_fsq or standard_fsq")
_NEEDS_POST_QUANT_CONV = ("use_post_quant_conv", True, "--use_post_quant_conv true")
EFFECTIVE_ONLY_WITH = {
    "num_embeddings": _NEEDS_VQ,
    "codebook_dim": _NEEDS_VQ,
    "commitment_cost": _NEEDS_VQ,
    "use_simvq": _NEEDS_VQ,
    "vq_cosine_lookup": _NEEDS_VQ,
    "vq_restart_unused_steps": _NEEDS_VQ,
    "fsq_levels": _NEEDS_FSQ,
    "fsq_noise_probability": _NEEDS_FSQ,
    "post_quant_conv_kernel_size": _NEEDS_POST_QUANT_CONV,
    "post_quant_conv_on_codes": _NEEDS_POST_QUANT_CONV,
}


def is_int(value) -> bool:
    """An integer, not a bool (`True` is an `int` to Python, never a count or a size to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An integer or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_at_least(name: str, value, minimum: int, optional: bool = False) -> None:
    """`ValueError` unless `value` is an integer >= `minimum` (or None, when `optional`): the one range check of
    integers, the config's fields and the command-line tools' options alike."""
    if optional and value is None:
        return
    if not is_int(value) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or unset" if optional else "")
        raise ValueError(f"`{name}` must be {allowed} (got {value!r}).")


def check_encoder_config(vision, subject: str = "`vision_config`") -> None:
    """Refuse an encoder config VQRAE cannot build, naming its class: the encoder is a fixed-resolution SigLIP
    vision tower (SigLIP2's fixed-resolution checkpoints use the same config). A NaFlex SigLIP2 encoder has
    `num_patches` instead of an `image_size`, and would otherwise fail later on the missing attribute."""
    if vision.model_type in SUPPORTED_ENCODER_TYPES:
        return
    naflex = ", a variable-resolution (NaFlex) SigLIP2 encoder" if vision.model_type == "siglip2_vision_model" else ""
    raise ValueError(
        f"{subject} must be a SigLIP vision config (SiglipVisionConfig, model_type 'siglip_vision_model'): "
        f"fixed-resolution SigLIP and SigLIP2 checkpoints are supported; got {type(vision).__name__} (model_type "
        f"{vision.model_type!r}){naflex}."
    )


def _plain_errors(cls):
    """`@strict` reports a field's or a class validator's `ValueError`/`TypeError` wrapped in its own exception
    type; a config user expects (and the CLIs catch) the `ValueError`/`TypeError` itself, whose message names the
    field, the value and what is allowed. Unwrap it."""
    strict_init = cls.__init__

    @functools.wraps(strict_init)
    def __init__(self, *args, **kwargs):
        try:
            strict_init(self, *args, **kwargs)
        except (ValueError, TypeError):
            raise
        except Exception as error:
            if isinstance(error.__cause__, (ValueError, TypeError)):
                raise error.__cause__ from None
            raise

    cls.__init__ = __init__
    return cls


@_plain_errors
@strict
class VQRAEConfig(PreTrainedConfig):
    r"""
    Configuration of a [`VQRAEModel`]: a SigLIP vision encoder, a quantizer (FSQ or a learned VQ codebook), an
    optional `post_quant_conv` and code normalisation, and a ViT decoder. Every field is validated here, before any
    layer is built. A field that acts only with another setting (the VQ fields with `use_fsq=False`, `fsq_levels`
    with `use_fsq=True`, the `post_quant_conv_*` fields with `use_post_quant_conv=True`) must otherwise keep its
    default: an option that would do nothing is refused, never recorded.

    Args:
        vision_config (`dict` or `SiglipVisionConfig`, *optional*):
            The SigLIP vision encoder (SigLIP, or a fixed-resolution SigLIP2 checkpoint, which uses the same
            architecture). Its attention-pooling head is always switched off: a tokenizer never uses it.
            Defaults to a SigLIP-B/16 at 256 px.
        encoder_name_or_path (`str`, *optional*):
            Where the encoder's pretrained weights came from (a Hub id or a folder). Kept for provenance and the
            model card only; loading a VQRAE model never reads it.
        use_fsq (`bool`, *optional*, defaults to `True`):
            Finite scalar quantization (`True`) or a learned VQ codebook (`False`).
        fsq_levels (`list[int]`, *optional*, defaults to `[8, 8, 8, 5, 5, 5]`):
            Levels per FSQ dimension, each >= 2; the codebook holds `prod(fsq_levels)` codes (64,000 by default).
        fsq_noise_probability (`float`, *optional*, defaults to 0.0):
            FSQ, training only: the chance that a token skips the rounding and reaches the decoder as its bounded
            values plus uniform noise one level step wide (noise substitution, Ballé et al., 2017), from 0 to 1.
            Its indices, evaluation and inference are unchanged: they always round.
        num_embeddings (`int`, *optional*, defaults to 16384):
            Number of VQ codes (used when `use_fsq=False`), >= 2.
        codebook_dim (`int`, *optional*):
            Width of the VQ codes; `None` uses the encoder width (no projection), as in the VQRAE paper.
        commitment_cost (`float`, *optional*, defaults to 0.25):
            Weight of the VQ commitment loss.
        use_simvq (`bool`, *optional*, defaults to `False`):
            Use SimVQ's codebook (a frozen random codebook times a learned linear map) for VQ.
        vq_cosine_lookup (`bool`, *optional*, defaults to `False`):
            VQ: l2-normalise the latents and the codes before the nearest-code search (and decode the normalised
            codes). Changes what the model computes, so it is off unless asked for; the `vq` training preset
            turns it on.
        vq_restart_unused_steps (`int`, *optional*, defaults to 20):
            VQ: restart a code at a latent of the current batch once it has gone unused for this many training
            forward passes (a new model starts with every code unused, so the first batch initialises the codebook
            from encoder outputs); 0 never restarts. Only training changes the codebook this way.
        use_post_quant_conv (`bool`, *optional*, defaults to `False`):
            Apply a learned `Conv2d(D, D, k)` to the codes before decoding (the Cosmos-Tokenizer flow).
        post_quant_conv_kernel_size (`int`, *optional*, defaults to 1):
            Kernel size `k` of `post_quant_conv`: a positive odd integer, so the token grid keeps its size.
        post_quant_conv_on_codes (`bool`, *optional*, defaults to `False`):
            Cosmos-Tokenizer's placement: `post_quant_conv` reads the quantizer's own codes (FSQ: `len(fsq_levels)`
            wide; VQ: `codebook_dim`) and maps them to the encoder width, in place of the quantizer's `project_out`.
            `False`: it reads the codes after `project_out`, where a 1x1 kernel composes with `project_out` into
            one affine map. Needs `use_post_quant_conv`.
        normalize_codes (`bool`, *optional*, defaults to `False`):
            Apply a parameter-free LayerNorm over the channel dimension to the codes before the decoder.
        decoder_hidden_size (`int`, *optional*):
            Width of the ViT decoder; not given, the encoder's (filled in when the config is built).
        decoder_num_hidden_layers (`int`, *optional*):
            Number of decoder blocks; not given, the encoder's.
        decoder_num_attention_heads (`int`, *optional*):
            Attention heads per decoder block; must divide `decoder_hidden_size`. Not given, the encoder's.
        decoder_intermediate_size (`int`, *optional*):
            Width of the decoder MLPs; not given, the encoder's.
        decoder_patch_overlap (`int`, *optional*, defaults to 0):
            Pixels by which each token's decoded square reaches into its neighbours' patches on every side; the
            overlapping squares are blended with linear ramps (overlap-add), so neighbouring patches meet without a
            step. 0: each token decodes exactly its patch. At most half the patch size.
        decoder_conv_head_channels (`int`, *optional*, defaults to 0):
            Width of a small residual convolutional head on the decoded image (two 3x3 convolutions), which smooths
            the borders between the patches the ViT decoder predicts one by one; 0: no head.
        decoder_hidden_act (`str`, *optional*, defaults to `"gelu_pytorch_tanh"`):
            Activation of the decoder MLPs (any name in `transformers.activations.ACT2FN`).
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of the decoder, quantizer and `post_quant_conv`.
        preprocessor_config (`dict`, *optional*):
            How images are prepared for the encoder, read from the encoder checkpoint's `preprocessor_config.json` by
            [`VQRAEModel.from_encoder_pretrained`]: any of `resample` (a PIL filter number; SigLIP2 uses 2, bilinear),
            `image_mean`, `image_std`, `rescale_factor`, `do_convert_rgb` and `image_processor_type`. Images are
            always resized to `vision_config.image_size`. `None`: SigLIP's settings (bicubic, mean = std = 0.5).

    Example:

    ```python
    >>> from vqrae import VQRAEConfig, VQRAEModel
    >>> config = VQRAEConfig(use_fsq=True, fsq_levels=[8, 8, 8, 5, 5, 5], use_post_quant_conv=True)
    >>> model = VQRAEModel(config)
    ```
    """

    model_type = "vqrae"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            AutoConfig,
            model_type="siglip_vision_model",
            init_kwargs={"image_size": 256, "patch_size": 16, "vision_use_head": False},
        )
    }

    vision_config: dict | PreTrainedConfig | None = None
    encoder_name_or_path: str | None = None
    use_fsq: bool = True
    fsq_levels: list[int] | tuple[int, ...] | None = None
    fsq_noise_probability: int | float = 0.0
    num_embeddings: int = 16384
    codebook_dim: int | None = None
    commitment_cost: int | float = 0.25
    use_simvq: bool = False
    vq_cosine_lookup: bool = False
    vq_restart_unused_steps: int = 20
    use_post_quant_conv: bool = False
    post_quant_conv_kernel_size: int = 1
    post_quant_conv_on_codes: bool = False
    normalize_codes: bool = False
    decoder_hidden_size: int | None = None
    decoder_num_hidden_layers: int | None = None
    decoder_num_attention_heads: int | None = None
    decoder_intermediate_size: int | None = None
    decoder_patch_overlap: int = 0
    decoder_conv_head_channels: int = 0
    decoder_hidden_act: str = "gelu_pytorch_tanh"
    initializer_range: int | float = 0.02
    preprocessor_config: dict | None = None

    # The types of the fields are checked by `@strict` from their annotations; the values below, by the `validate_*`
    # methods it runs once the config is built (and again before it is saved).

    def __post_init__(self, **kwargs):
        if self.fsq_levels is None:
            self.fsq_levels = list(DEFAULT_FSQ_LEVELS)
        elif isinstance(self.fsq_levels, tuple):
            self.fsq_levels = list(self.fsq_levels)
        if isinstance(self.vision_config, dict):
            self.vision_config = dict(self.vision_config)
            self.vision_config.setdefault("model_type", "siglip_vision_model")
        self._refuse_misspelt_fields(kwargs)
        try:
            super().__post_init__(**kwargs)
        except Exception as error:
            # SigLIP's own strict validation of the sub-config: say which config holds the field.
            if isinstance(error, (ValueError, TypeError)) or not isinstance(error.__cause__, (ValueError, TypeError)):
                raise
            raise TypeError(f"`vision_config` holds a field of the wrong type: {error.__cause__}") from None
        vision = self.vision_config
        check_encoder_config(vision)
        if getattr(vision, "vision_use_head", False):
            # The attention-pooling head is never used by a tokenizer; under DDP an unused parameter is an error.
            logger.info(
                "Switching off the SigLIP attention-pooling head (`vision_use_head=False`): VQRAE never uses it."
            )
            vision.vision_use_head = False
        # The decoder mirrors the encoder where no size is given: filled in once, here.
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if getattr(self, f"decoder_{name}") is None:
                setattr(self, f"decoder_{name}", getattr(vision, name))

    @classmethod
    def _refuse_misspelt_fields(cls, kwargs: dict) -> None:
        """Extra keyword arguments become plain attributes in transformers configs; one that is a near miss of a
        VQRAE field (`fsq_level=`) is almost surely a typo that would otherwise be ignored silently."""
        fields = [name for name in cls.__annotations__ if not name.startswith("_")]
        for key in kwargs:
            if key in fields:
                continue
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.8)
            if close:
                raise TypeError(f"VQRAEConfig got an unknown field `{key}`; did you mean `{close[0]}`?")

    def validate_architecture(self) -> None:
        """The encoder and decoder sizes fit together."""
        super().validate_architecture()
        vision = self.vision_config
        for name in ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            check_at_least(f"vision_config.{name}", getattr(vision, name), 1)
        for name in ("intermediate_size", "num_channels"):
            check_at_least(f"vision_config.{name}", getattr(vision, name), 1)
        image_size, patch_size = vision.image_size, vision.patch_size
        if image_size % patch_size != 0:  # both integers >= 1, checked above
            raise ValueError(
                "`vision_config.image_size` must be a multiple of `vision_config.patch_size` "
                f"(got image_size={image_size!r}, patch_size={patch_size!r})."
            )
        if vision.hidden_size % vision.num_attention_heads != 0:
            raise ValueError(
                "`vision_config.hidden_size` must be divisible by `vision_config.num_attention_heads` "
                f"(got {vision.hidden_size} and {vision.num_attention_heads})."
            )
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            check_at_least(f"decoder_{name}", getattr(self, f"decoder_{name}"), 1)
        if self.decoder_hidden_size % self.decoder_num_attention_heads != 0:
            raise ValueError(
                "`decoder_hidden_size` must be divisible by `decoder_num_attention_heads` (got "
                f"{self.decoder_hidden_size} and {self.decoder_num_attention_heads})."
            )
        half = vision.patch_size // 2
        if not 0 <= self.decoder_patch_overlap <= half:
            raise ValueError(
                f"`decoder_patch_overlap` must be an integer from 0 to half the patch size ({half}), got "
                f"{self.decoder_patch_overlap!r}."
            )
        if self.decoder_conv_head_channels < 0:
            raise ValueError(
                "`decoder_conv_head_channels` must be an integer >= 0 (0: no convolutional head), got "
                f"{self.decoder_conv_head_channels!r}."
            )
        if self.decoder_hidden_act not in ACT2FN:
            raise ValueError(
                f"`decoder_hidden_act` must be one of {sorted(ACT2FN)} (got {self.decoder_hidden_act!r})."
            )
        if not 0 < self.initializer_range < math.inf:
            raise ValueError(f"`initializer_range` must be a finite number > 0 (got {self.initializer_range!r}).")

    def validate_quantizer(self) -> None:
        """FSQ levels, the VQ codebook and `post_quant_conv`."""
        if not self.fsq_levels or any(level < 2 for level in self.fsq_levels):
            raise ValueError(f"`fsq_levels` must be a non-empty list of integers >= 2 (got {self.fsq_levels!r}).")
        if not 0 <= self.fsq_noise_probability <= 1:
            raise ValueError(
                f"`fsq_noise_probability` must be a number from 0 to 1 (got {self.fsq_noise_probability!r})."
            )
        check_at_least("num_embeddings", self.num_embeddings, 2)
        check_at_least("codebook_dim", self.codebook_dim, 1, optional=True)
        if self.vq_restart_unused_steps < 0:
            raise ValueError(
                "`vq_restart_unused_steps` must be an integer >= 0 (0: never restart unused codes), got "
                f"{self.vq_restart_unused_steps!r}."
            )
        if not 0 <= self.commitment_cost < math.inf:
            raise ValueError(f"`commitment_cost` must be a finite number >= 0 (got {self.commitment_cost!r}).")
        kernel = self.post_quant_conv_kernel_size
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(
                "`post_quant_conv_kernel_size` must be a positive odd integer, so the token grid keeps its size "
                f"(got {kernel!r})."
            )
        self._refuse_ineffective_fields()

    def _refuse_ineffective_fields(self) -> None:
        """A field that does nothing in this configuration (`use_simvq=True` with FSQ, a kernel size without
        `post_quant_conv`, ...) is refused unless it holds its default: otherwise config.json would record a setting
        the model never used. Configs written before this check hold the defaults there, and still load."""
        fields = type(self).__dataclass_fields__
        for name, (setting, needed, option) in EFFECTIVE_ONLY_WITH.items():
            value = getattr(self, name)
            default = list(DEFAULT_FSQ_LEVELS) if name == "fsq_levels" else fields[name].default
            if getattr(self, setting) == needed or value == default:
                continue
            raise ValueError(
                f"`{name}={value!r}` has no effect with `{setting}={not needed}`: it needs `{setting}={needed}` "
                f"(vqrae-train: {option}). Pass that, or leave `{name}` at its default {default!r}."
            )

    def validate_preprocessor_config(self) -> None:
        """The encoder's image preprocessing, as `from_encoder_pretrained` read it."""
        settings = self.preprocessor_config
        if settings is None:
            return
        unknown = sorted(set(settings) - set(PREPROCESSOR_FIELDS))
        if unknown:
            raise ValueError(
                f"`preprocessor_config` holds unknown fields {unknown}; allowed: {list(PREPROCESSOR_FIELDS)}."
            )
        kind = settings.get("image_processor_type")
        if kind is not None and kind not in SUPPORTED_IMAGE_PROCESSORS:
            raise ValueError(
                f"`preprocessor_config.image_processor_type` must be one of {list(SUPPORTED_IMAGE_PROCESSORS)} (fixed "
                f"resolution SigLIP/SigLIP2), got {kind!r}; variable-resolution (NaFlex) processors are not supported."
            )
        resample = settings.get("resample")
        if resample is not None and (not is_int(resample) or not 0 <= resample <= 5):
            raise ValueError(
                f"`preprocessor_config.resample` must be a PIL resampling filter, 0 to 5 (got {resample!r})."
            )
        channels = self.vision_config.num_channels
        for name in ("image_mean", "image_std"):
            values = settings.get(name)
            if values is None:
                continue
            if (
                not isinstance(values, (list, tuple))
                or len(values) != channels
                or any(not is_number(v) or not math.isfinite(v) for v in values)
                or (name == "image_std" and any(v <= 0 for v in values))
            ):
                allowed = "positive numbers" if name == "image_std" else "finite numbers"
                raise ValueError(
                    f"`preprocessor_config.{name}` must be a list of {channels} {allowed}, one per channel (got "
                    f"{values!r})."
                )
        factor = settings.get("rescale_factor")
        if factor is not None and (not is_number(factor) or not factor > 0):
            raise ValueError(f"`preprocessor_config.rescale_factor` must be a number > 0 (got {factor!r}).")
        convert = settings.get("do_convert_rgb")
        if convert is not None and not isinstance(convert, bool):
            raise TypeError(f"`preprocessor_config.do_convert_rgb` must be a bool or None (got {convert!r}).")

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """Refuse a config.json written for another kind of model; transformers would only log a warning."""
        model_type = config_dict.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(
                f"This config.json has `model_type` {model_type!r}, but VQRAEConfig reads only {cls.model_type!r} "
                "configs: load it with the class it was written for (e.g. AutoModel), or set `model_type` to "
                f"{cls.model_type!r} if it really describes a VQRAE model."
            )
        return super().from_dict(config_dict, **kwargs)

    # -- derived sizes (not stored) -------------------------------------------------------------------------------

    @property
    def codebook_size(self) -> int:
        """Number of codes: `prod(fsq_levels)` for FSQ, `num_embeddings` for VQ."""
        if self.use_fsq:
            size = 1
            for level in self.fsq_levels:
                size *= level
            return size
        return self.num_embeddings

    @property
    def token_grid_size(self) -> tuple[int, int]:
        """`(h, w)` of the token grid at the encoder's native resolution."""
        side = self.vision_config.image_size // self.vision_config.patch_size
        return side, side


# -- the fields as options of `vqrae-train` -------------------------------------------------------------------------
# `vqrae-train` offers every field above as an option of the same name, documented by the field's entry in the
# docstring, except those named here with what sets them instead (None: nothing; the config's default holds). Every
# field shapes the weights, so a resume may change none of them. A test checks that each field is one or the other.
NOT_TRAINING_OPTIONS = {
    "vision_config": "--vision_config and the size options, or the pretrained encoder",
    "encoder_name_or_path": "--encoder_name_or_path",
    "use_fsq": "--quantizer",
    "decoder_hidden_act": None,
    "initializer_range": None,
    "preprocessor_config": "the pretrained encoder's preprocessor_config.json",
}


__all__ = ["VQRAEConfig"]
