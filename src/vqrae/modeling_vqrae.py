"""VQRAE: a SigLIP encoder, an FSQ or VQ quantizer, an optional post_quant_conv and a ViT decoder.

The file reads in the order of the data flow:

    pixel_values -> encoder (SiglipVisionModel)           -> continuous features (B, N, D)
                 -> quantizer (project_in, FSQ/VQ, project_out) -> indices (B, h, w), codes (B, D, h, w)
                 -> post_quant_conv (optional)              -> normalisation (optional)
                    (with `post_quant_conv_on_codes`, Cosmos-Tokenizer's placement: no project_out, and
                    post_quant_conv maps the quantizer's own codes (B, d, h, w) to D)
                 -> decoder (ViT, unpatchify)               -> reconstruction (B, 3, H, W)

The decoder lives in `decoder.py` and the quantizers in `quantizers.py`. It imports only the standard library, torch
and transformers (and its siblings `configuration_vqrae.py`, `decoder.py` and `quantizers.py`), because
`save_pretrained` copies the four files to the Hub for `trust_remote_code` users.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, PreTrainedModel, SiglipImageProcessorPil, SiglipVisionModel
from transformers import initialization as init
from transformers.image_processing_base import ImageProcessingMixin
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput, logging

from .configuration_vqrae import PREPROCESSOR_FIELDS, VQRAEConfig, check_encoder_config
from .decoder import VQRAEDecoder
from .quantizers import VQRAEFSQuantizer, VQRAEVectorQuantizer

logger = logging.get_logger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class VQRAEEncoderOutput(ModelOutput):
    """
    Output of [`VQRAEModel.encode`].

    Args:
        indices (`torch.LongTensor` of shape `(batch_size, h, w)`):
            The discrete tokens: one code index per patch, `h = H / patch_size`, `w = W / patch_size`.
        quantized (`torch.FloatTensor` of shape `(batch_size, hidden_size, h, w)`):
            The codes of `indices` projected back to the encoder width, before `post_quant_conv` (with
            `config.post_quant_conv_on_codes`, the quantizer's own codes, `quantizer.output_dim` wide). In training
            they carry straight-through gradients to the encoder.
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, h * w, hidden_size)`):
            The encoder's continuous semantic features (the input of the quantizer).
        quantizer_loss (`torch.FloatTensor`, scalar):
            The quantizer's loss (zero for FSQ; codebook + commitment loss for VQ).
    """

    indices: torch.LongTensor | None = None
    quantized: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    quantizer_loss: torch.FloatTensor | None = None


@dataclass
class VQRAEDecoderOutput(ModelOutput):
    """
    Output of [`VQRAEModel.decode`] and [`VQRAEModel.decode_from_indices`].

    Args:
        reconstruction (`torch.FloatTensor` of shape `(batch_size, num_channels, H, W)`):
            The decoded image, in the encoder's normalised pixel range (about [-1, 1] for SigLIP).
    """

    reconstruction: torch.FloatTensor | None = None


@dataclass
class VQRAEModelOutput(ModelOutput):
    """
    Output of [`VQRAEModel.forward`].

    Args:
        reconstruction (`torch.FloatTensor` of shape `(batch_size, num_channels, H, W)`):
            The reconstructed image, in the encoder's normalised pixel range.
        indices (`torch.LongTensor` of shape `(batch_size, h, w)`):
            The discrete tokens of the image.
        quantized (`torch.FloatTensor` of shape `(batch_size, hidden_size, h, w)`):
            The (straight-through) codes, before `post_quant_conv`.
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, h * w, hidden_size)`):
            The encoder's continuous semantic features.
        quantizer_loss (`torch.FloatTensor`, scalar):
            The quantizer's loss (zero for FSQ).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            The encoder's hidden states: the embeddings and the output of each layer, `(batch_size, h * w,
            hidden_size)` each.
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
            The attention weights of each encoder layer, `(batch_size, num_heads, h * w, h * w)`.
    """

    reconstruction: torch.FloatTensor | None = None
    indices: torch.LongTensor | None = None
    quantized: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    quantizer_loss: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


# ---------------------------------------------------------------------------------------------------------------
# Pretrained base class
# ---------------------------------------------------------------------------------------------------------------


class VQRAEPreTrainedModel(PreTrainedModel):
    config_class = VQRAEConfig
    config: VQRAEConfig
    base_model_prefix = "vqrae"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["VQRAEDecoderLayer", "SiglipEncoderLayer", "SiglipVisionEmbeddings"]
    # FSQ indices above 256 do not exist in bf16, so the quantizer keeps float32 weights and tables in a model loaded
    # with `dtype=torch.bfloat16` or `float16` (and, through `quantizers._Float32Module`, in one cast with `.to()`).
    _keep_in_fp32_modules_strict = ["quantizer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, VQRAEDecoder):
            init.normal_(module.position_embedding, std=std)
            if module.conv_head is not None:  # (a module without weights of its own is not visited: done here)
                init.zeros_(module.conv_head.conv_out.weight)
                init.zeros_(module.conv_head.conv_out.bias)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            init.normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=1.0)
        elif isinstance(module, VQRAEFSQuantizer):
            for name, table in module.level_tables().items():
                init.copy_(getattr(module, name), table)
        elif isinstance(module, VQRAEVectorQuantizer):
            # Every code starts unused: with restarts on, the first training batch places the codes on encoder outputs.
            init.constant_(module.steps_unused, module.restart_unused_steps)
            if module.use_simvq:
                # SimVQ: a Gaussian codebook of unit-norm rows behind an identity map (the Linear default above, std
                # 0.02, would shrink every code to a fiftieth of the features' scale).
                init.normal_(module.frozen_codebook, std=module.codebook_dim**-0.5)
                init.eye_(module.codebook_transform.weight)


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------


class VQRAEModel(VQRAEPreTrainedModel):
    """
    A VQRAE image tokenizer: `encode` turns images into discrete tokens (and continuous semantic features),
    `decode_from_indices` turns tokens back into images, `forward` does both.

    Args:
        config ([`VQRAEConfig`]): the model configuration.
        encoder (`SiglipVisionModel`, *optional*): a ready (e.g. pretrained) encoder to use instead of building a
            randomly initialised one from `config.vision_config`. See [`VQRAEModel.from_encoder_pretrained`].
    """

    # Whether `encode` / `forward` refuse NaN or infinite `pixel_values`, a host sync per call. Training turns it off:
    # its batches are checked on the CPU as they are made (`image_data.to_pixel_values`).
    check_finite_pixels: bool = True

    def __init__(self, config: VQRAEConfig, encoder: PreTrainedModel | None = None):
        super().__init__(config)
        vision = config.vision_config
        hidden_size = vision.hidden_size
        self.patch_size = vision.patch_size

        if encoder is None:
            encoder = SiglipVisionModel(vision)
        elif encoder.config.hidden_size != hidden_size or encoder.config.patch_size != vision.patch_size:
            raise ValueError(
                "`encoder` does not match `config.vision_config` (got hidden_size "
                f"{encoder.config.hidden_size} and patch_size {encoder.config.patch_size}, expected {hidden_size} "
                f"and {vision.patch_size})."
            )
        if getattr(encoder, "use_head", False):
            raise ValueError(
                "`encoder` has a SigLIP attention-pooling head, which a tokenizer never trains; build it with "
                "`vision_use_head=False` (as `from_encoder_pretrained` does)."
            )
        self.encoder = encoder

        # Cosmos-Tokenizer's placement: post_quant_conv reads the quantizer's own codes, in place of its project_out.
        project_out = not config.post_quant_conv_on_codes
        if config.use_fsq:
            self.quantizer = VQRAEFSQuantizer(
                config.fsq_levels, hidden_size, project_out, noise_probability=config.fsq_noise_probability
            )
        else:
            self.quantizer = VQRAEVectorQuantizer(
                num_embeddings=config.num_embeddings,
                dim=hidden_size,
                codebook_dim=config.codebook_dim,
                commitment_cost=config.commitment_cost,
                use_simvq=config.use_simvq,
                cosine_lookup=config.vq_cosine_lookup,
                restart_unused_steps=config.vq_restart_unused_steps,
                project_out=project_out,
            )
        if config.use_post_quant_conv:
            kernel = config.post_quant_conv_kernel_size
            self.post_quant_conv = nn.Conv2d(self.quantizer.output_dim, hidden_size, kernel, padding=kernel // 2)
        else:
            self.post_quant_conv = None
        self.decoder = VQRAEDecoder(config)
        self.post_init()

    # -- building from a pretrained SigLIP ------------------------------------------------------------------------

    @classmethod
    def from_encoder_pretrained(
        cls, encoder_name_or_path: str, *, encoder_kwargs: dict | None = None, **config_kwargs
    ):
        """Build a VQRAE model around a pretrained SigLIP vision encoder; the rest is randomly initialised.

        Args:
            encoder_name_or_path (`str`): a Hub id or folder of a SigLIP (or fixed-resolution SigLIP2) checkpoint,
                vision-only (`SiglipVisionModel`) or full (`SiglipModel`, whose text tower is ignored).
            encoder_kwargs (`dict`, *optional*): passed to `from_pretrained` of the encoder (`revision`,
                `cache_dir`, `local_files_only`, `dtype`, ...).
            **config_kwargs: fields of [`VQRAEConfig`] (`use_fsq`, `fsq_levels`, `use_post_quant_conv`, ...).

        Raises `ValueError` when the checkpoint is not a whole SigLIP encoder: a VQRAE model, a NaFlex SigLIP2 or
        other encoder, or weights that lack an encoder tensor (prefixed keys) or hold one of another shape. Tensors
        the encoder does not use (a full checkpoint's text tower, the pooling head) are ignored.
        """
        encoder_kwargs = dict(encoder_kwargs or {})
        encoder_kwargs.setdefault("use_safetensors", True)  # never unpickle a `pytorch_model.bin`
        if "vision_config" in config_kwargs:
            raise ValueError(
                "`vision_config` comes from the pretrained encoder; do not pass it to from_encoder_pretrained."
            )
        hub_kwargs = {
            key: encoder_kwargs[key]
            for key in ("revision", "cache_dir", "local_files_only", "token", "trust_remote_code")
            if key in encoder_kwargs
        }
        try:
            loaded_config = AutoConfig.from_pretrained(encoder_name_or_path, **hub_kwargs)
        except OSError as error:
            raise OSError(
                f"Could not load the SigLIP encoder {encoder_name_or_path!r}: give a Hub id that is reachable (or in "
                f"the local Hub cache when offline) or a folder with config.json and model.safetensors. {error}"
            ) from error
        if loaded_config.model_type == VQRAEConfig.model_type:
            raise ValueError(
                f"{encoder_name_or_path!r} is a VQRAE model (its config.json has model_type 'vqrae'), not a SigLIP "
                "encoder: to start from its weights, load it with `VQRAEModel.from_pretrained` (in vqrae-train: "
                "`--init_from`)."
            )
        vision_config = getattr(loaded_config, "vision_config", loaded_config)
        # Before anything reads its `image_size` (which a NaFlex SigLIP2 config lacks).
        check_encoder_config(vision_config, subject=f"The config of the encoder {encoder_name_or_path!r}")
        vision_config.vision_use_head = False
        if "preprocessor_config" not in config_kwargs:
            config_kwargs["preprocessor_config"] = _read_encoder_preprocessing(
                encoder_name_or_path, vision_config.image_size, hub_kwargs
            )
        config = VQRAEConfig(vision_config=vision_config, encoder_name_or_path=encoder_name_or_path, **config_kwargs)
        ignore_mismatched_sizes = encoder_kwargs.pop("ignore_mismatched_sizes", False)
        encoder_kwargs.update(output_loading_info=True, ignore_mismatched_sizes=True)  # checked below, in one line
        with _load_report_silenced():
            encoder, loading_info = SiglipVisionModel.from_pretrained(
                encoder_name_or_path, config=config.vision_config, **encoder_kwargs
            )
        _check_encoder_weights(encoder_name_or_path, loading_info, ignore_mismatched_sizes)
        return cls(config, encoder=encoder)

    # -- input checks ----------------------------------------------------------------------------------------------

    def _check_pixel_values(self, pixel_values) -> None:
        channels = self.config.vision_config.num_channels
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"`pixel_values` must be a torch.Tensor (got {type(pixel_values).__name__}).")
        if pixel_values.ndim != 4 or pixel_values.shape[1] != channels:
            raise ValueError(
                f"`pixel_values` must have shape (batch_size, {channels}, height, width) "
                f"(got shape {tuple(pixel_values.shape)})."
            )
        if pixel_values.shape[0] == 0:
            raise ValueError("`pixel_values` holds no images (batch size 0); pass at least one image.")
        if not pixel_values.dtype.is_floating_point:
            raise TypeError(
                f"`pixel_values` must be floating point, normalised as the image processor does (got dtype "
                f"{pixel_values.dtype}); use `AutoImageProcessor.from_pretrained(...)` to prepare images."
            )
        height, width = pixel_values.shape[-2:]
        if height == 0 or width == 0 or height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"`pixel_values` height and width must be positive multiples of the patch size {self.patch_size} "
                f"(got {height} x {width})."
            )
        # Reading the answer back is a host sync and cannot be traced: skipped under torch.compile / torch.export
        # and where the caller's data path already checks its batches (`check_finite_pixels`).
        if self.check_finite_pixels and not torch.compiler.is_compiling() and not torch.isfinite(pixel_values).all():
            raise ValueError("`pixel_values` holds NaN or infinite values.")

    def _check_indices(self, indices) -> None:
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"`indices` must be a torch.Tensor of integers (got {type(indices).__name__}).")
        if indices.ndim != 3:
            raise ValueError(f"`indices` must have shape (batch_size, h, w) (got shape {tuple(indices.shape)}).")
        if indices.numel() == 0:
            raise ValueError(
                f"`indices` is empty (shape {tuple(indices.shape)}); pass at least one image of at least one token."
            )
        # dtype and range are checked by the quantizer's `lookup`.

    # -- encode ----------------------------------------------------------------------------------------------------

    def _encoder_is_frozen(self) -> bool:
        return not any(parameter.requires_grad for parameter in self.encoder.parameters())

    def get_input_embeddings(self) -> nn.Module:
        """The encoder's patch embedding, as for `SiglipVisionModel`."""
        return self.encoder.get_input_embeddings()

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        """The encoder's output: `last_hidden_state` holds the continuous semantic features `(batch_size, h * w,
        hidden_size)`, the input of the quantizer (and `hidden_states` / `attentions` when asked for)."""
        self._check_pixel_values(pixel_values)
        if interpolate_pos_encoding is None:
            image_size = self.config.vision_config.image_size
            interpolate_pos_encoding = tuple(pixel_values.shape[-2:]) != (image_size, image_size)
        pixel_values = pixel_values.to(self.encoder.dtype)
        config = self.config
        # A frozen encoder (stage 1) runs without building a graph.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self._encoder_is_frozen()):
            outputs = self.encoder(
                pixel_values=pixel_values,
                interpolate_pos_encoding=interpolate_pos_encoding,
                output_attentions=config.output_attentions if output_attentions is None else output_attentions,
                output_hidden_states=config.output_hidden_states
                if output_hidden_states is None
                else output_hidden_states,
            )
        return outputs if self._use_return_dict(return_dict) else outputs.to_tuple()

    def quantize(self, features: torch.Tensor, grid_size: tuple[int, int]) -> VQRAEEncoderOutput:
        """Quantize continuous features `(B, h * w, D)` into indices `(B, h, w)` and codes `(B, D, h, w)`."""
        height, width = grid_size
        output = self.quantizer(features)
        quantized = output.quantized.to(self._codes_dtype)
        quantized = quantized.transpose(1, 2).reshape(features.shape[0], -1, height, width)
        return VQRAEEncoderOutput(
            indices=output.indices.reshape(features.shape[0], height, width),
            quantized=quantized,
            last_hidden_state=features,
            quantizer_loss=output.loss,
        )

    def encode(self, pixel_values: torch.Tensor, return_dict: bool | None = None) -> VQRAEEncoderOutput | tuple:
        """Images `(B, C, H, W)` to tokens: `indices` `(B, H / p, W / p)`, the codes and the continuous features."""
        features = self.get_image_features(pixel_values, return_dict=True).last_hidden_state
        grid = (pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size)
        output = self.quantize(features, grid)
        return output if self._use_return_dict(return_dict) else output.to_tuple()

    # -- decode ----------------------------------------------------------------------------------------------------

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Token indices `(B, h, w)` to codes `(B, D, h, w)` (codebook lookup and `project_out`; `D` is
        `quantizer.output_dim`)."""
        self._check_indices(indices)
        codes = self.quantizer.lookup(indices)
        return codes.permute(0, 3, 1, 2).to(self._codes_dtype)

    def decode(self, codes: torch.Tensor, return_dict: bool | None = None) -> VQRAEDecoderOutput | tuple:
        """Codes `(B, D, h, w)` -> `post_quant_conv` -> normalisation -> decoder -> images `(B, C, h p, w p)`."""
        hidden_size, width = self.config.vision_config.hidden_size, self.quantizer.output_dim
        if not isinstance(codes, torch.Tensor) or codes.ndim != 4 or codes.shape[1] != width:
            shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise ValueError(f"`codes` must have shape (batch_size, {width}, h, w) (got {shape}).")
        if self.post_quant_conv is not None:
            codes = self.post_quant_conv(codes.to(self.post_quant_conv.weight.dtype))
        batch_size, _, height, width = codes.shape
        tokens = codes.flatten(2).transpose(1, 2).to(self.decoder.in_proj.weight.dtype)
        if self.config.normalize_codes:
            tokens = F.layer_norm(tokens, (hidden_size,))
        reconstruction = self.decoder(tokens, height, width)
        output = VQRAEDecoderOutput(reconstruction=reconstruction)
        return output if self._use_return_dict(return_dict) else output.to_tuple()

    def decode_from_indices(
        self, indices: torch.Tensor, return_dict: bool | None = None
    ) -> VQRAEDecoderOutput | tuple:
        """Token indices `(B, h, w)` to images `(B, C, h * p, w * p)`."""
        return self.decode(self.indices_to_codes(indices), return_dict=return_dict)

    # -- both ------------------------------------------------------------------------------------------------------

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> VQRAEModelOutput | tuple:
        """Encode and decode: the reconstruction, the tokens, the codes, the features and the quantizer loss (and
        the encoder's `hidden_states` / `attentions` when asked for)."""
        if kwargs:
            raise TypeError(f"VQRAEModel.forward() got unexpected keyword arguments: {sorted(kwargs)}.")
        features = self.get_image_features(
            pixel_values,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        grid = (pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size)
        encoded = self.quantize(features.last_hidden_state, grid)
        reconstruction = self.decode(encoded.quantized, return_dict=True).reconstruction
        # The encoder output's fields (indices, quantized, last_hidden_state, quantizer_loss), with the rest.
        output = VQRAEModelOutput(
            reconstruction=reconstruction,
            hidden_states=features.hidden_states,
            attentions=features.attentions,
            **encoded,
        )
        return output if self._use_return_dict(return_dict) else output.to_tuple()

    # -- saving and loading --------------------------------------------------------------------------------------

    def get_image_processor(self):
        """The image processor that prepares images exactly as the encoder expects (`image_processor_for`)."""
        return image_processor_for(self.config)

    @classmethod
    def from_pretrained(
        cls, *args, output_loading_info: bool = False, ignore_mismatched_sizes: bool = False, **kwargs
    ):
        """`PreTrainedModel.from_pretrained`, strict about the weights: a tensor missing from the checkpoint, an
        unexpected one or one of another shape raises a `ValueError` instead of being randomly initialised or
        dropped (`ignore_mismatched_sizes=True` re-initialises tensors of another shape). With
        `output_loading_info=True` they are reported in the loading info instead, as transformers does. Weights are
        read from safetensors only unless `use_safetensors=False` is passed (never a pickle by surprise)."""
        kwargs.setdefault("use_safetensors", True)
        if output_loading_info:
            return super().from_pretrained(
                *args, output_loading_info=True, ignore_mismatched_sizes=ignore_mismatched_sizes, **kwargs
            )
        model, info = super().from_pretrained(*args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
        name = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        _refuse_unmatched_weights(
            "the given state_dict" if name is None else repr(str(name)), info, ignore_mismatched_sizes
        )
        return model

    # -- helpers ---------------------------------------------------------------------------------------------------

    @property
    def _codes_dtype(self) -> torch.dtype:
        """The dtype of the layer that reads the codes (`post_quant_conv`, else the decoder): the quantizer computes
        in float32 and hands its codes on in the dtype of what follows, whatever the encoder's dtype."""
        first = self.post_quant_conv if self.post_quant_conv is not None else self.decoder.in_proj
        return first.weight.dtype

    def _use_return_dict(self, return_dict: bool | None) -> bool:
        return self.config.return_dict if return_dict is None else return_dict

    def freeze_encoder(self, freeze: bool = True) -> None:
        """Stop (or restart) training the encoder: no gradients, and in eval mode while frozen."""
        self.encoder.requires_grad_(not freeze)
        if freeze:
            self.encoder.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self._encoder_is_frozen():
            self.encoder.eval()
        return self

    def get_last_layer(self) -> torch.Tensor:
        """The weight of the decoder's last layer (`decoder.out_proj`), where taming-transformers' adaptive GAN weight
        compares the gradients of the reconstruction and GAN losses."""
        return self.decoder.out_proj.weight

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def bits_per_token(self) -> float:
        return math.log2(self.codebook_size)


def _refuse_unmatched_weights(source: str, loading_info: dict, ignore_mismatched_sizes: bool) -> None:
    """Raise, naming the tensors, when the loaded weights do not match the configuration."""
    problems = []
    if loading_info["missing_keys"]:
        problems.append(f"missing from the checkpoint: {', '.join(sorted(loading_info['missing_keys']))}")
    if loading_info["unexpected_keys"]:
        problems.append(f"not expected by the config: {', '.join(sorted(loading_info['unexpected_keys']))}")
    if loading_info["mismatched_keys"] and not ignore_mismatched_sizes:
        problems.append(f"of another shape: {_describe_shapes(loading_info['mismatched_keys'])}")
    if problems:
        raise ValueError(
            f"The weights of {source} do not match its configuration; tensors "
            + "; ".join(problems)
            + ". The checkpoint was saved from a model with other settings (e.g. `use_post_quant_conv`, "
            "`fsq_levels`, `num_embeddings`, `codebook_dim`, `use_simvq` or the encoder/decoder sizes): fix "
            "config.json so it describes the weights, instead of loading randomly initialised tensors."
        )


def _describe_shapes(mismatched_keys) -> str:
    """transformers' `mismatched_keys` (key, checkpoint shape, model shape) as one line."""
    return ", ".join(
        f"{key} (checkpoint {tuple(saved)}, config {tuple(expected)})"
        for key, saved, expected in sorted(mismatched_keys)
    )


@contextlib.contextmanager
def _load_report_silenced():
    """Mute the load report that transformers logs as a warning (dozens of rows; a full SigLIP checkpoint lists its
    text tower as UNEXPECTED on every correct load) while the caller checks the loading info itself."""
    report_logger = logging.get_logger("transformers.modeling_utils")

    def keep_errors(record) -> bool:
        return record.levelno >= logging.ERROR

    # A filter, not a higher level: transformers runs a tensor-parallel check that warns when the level is raised.
    report_logger.addFilter(keep_errors)
    try:
        yield
    finally:
        report_logger.removeFilter(keep_errors)


def _check_encoder_weights(encoder_name_or_path: str, loading_info: dict, ignore_mismatched_sizes: bool) -> None:
    """Every encoder tensor must come from the checkpoint: transformers would initialise a missing one (or one of
    another shape) randomly, and stage 1 then freezes it. Unexpected tensors are fine: a full SigLIP checkpoint also
    holds the text tower and the pooling head, which the vision encoder does not use."""
    missing = sorted(loading_info["missing_keys"])
    mismatched = [] if ignore_mismatched_sizes else loading_info["mismatched_keys"]
    if not missing and not mismatched:
        if loading_info["unexpected_keys"]:
            logger.info(
                "Ignored %d tensors of %s that the vision encoder does not use (text tower, pooling head).",
                len(loading_info["unexpected_keys"]),
                encoder_name_or_path,
            )
        return
    if mismatched:
        problem = f"holds weights of another shape than its config.json says: {_describe_shapes(mismatched)}"
    else:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        problem = f"lacks weights of the SigLIP vision tower: {shown}"
        prefixed = next((key for key in loading_info["unexpected_keys"] if key.endswith(f".{missing[0]}")), None)
        if prefixed:
            problem += (
                f". Its keys carry a prefix ({prefixed!r} instead of {missing[0]!r}): save the encoder with the key "
                "names of `SiglipVisionModel` or `SiglipModel`"
            )
    raise ValueError(
        f"The encoder {encoder_name_or_path!r} {problem}. Those tensors would be randomly initialised instead; give a "
        "SigLIP (or fixed-resolution SigLIP2) checkpoint that holds the weights its config.json describes."
    )


def _read_encoder_preprocessing(encoder_name_or_path: str, image_size: int, hub_kwargs: dict) -> dict | None:
    """The settings of the encoder checkpoint's `preprocessor_config.json` that `VQRAEConfig.preprocessor_config`
    keeps, or None when the checkpoint has none (SigLIP's defaults then apply)."""
    try:
        settings, _ = ImageProcessingMixin.get_image_processor_dict(encoder_name_or_path, **hub_kwargs)
    except OSError:
        logger.info("%s has no preprocessor_config.json; using SigLIP's image preprocessing.", encoder_name_or_path)
        return None
    size = settings.get("size") or {}
    if isinstance(size, dict) and {size.get("height"), size.get("width")} - {None, image_size}:
        logger.warning(
            "The image processor of %s resizes to %s, but its encoder was trained at %d px; images are resized to %d.",
            encoder_name_or_path,
            size,
            image_size,
            image_size,
        )
    return {key: settings[key] for key in PREPROCESSOR_FIELDS if settings.get(key) is not None}


def center_crop_settings(image_size: int) -> dict:
    """Image processor settings that cut the largest centred square: the shorter side resized to `image_size`,
    then the centred `image_size` square. A square image is only resized, so square crops pass unchanged."""
    return {
        "size": {"shortest_edge": image_size},
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
    }


def image_processor_for(config: VQRAEConfig):
    """The image processor of a model with this `config`: the largest centred square at the encoder's resolution
    (`center_crop_settings`), resized with the encoder checkpoint's own settings (`config.preprocessor_config`;
    SigLIP2: bilinear), else SigLIP's (bicubic, rescale to [0, 1], mean = std = 0.5: pixels in [-1, 1]). Saved as
    `preprocessor_config.json`, so `AutoImageProcessor` prepares images as `vqrae-tokenize` and `vqrae-evaluate` do."""
    settings = dict(config.preprocessor_config or {})
    settings.pop("image_processor_type", None)
    return SiglipImageProcessorPil(**center_crop_settings(config.vision_config.image_size), **settings)


def VQRAE(**config_kwargs) -> VQRAEModel:
    """Build a randomly initialised [`VQRAEModel`] from [`VQRAEConfig`] keyword arguments.

    ```python
    >>> model = VQRAE(use_fsq=True, fsq_levels=[8, 8, 8, 5, 5, 5], use_post_quant_conv=True)
    ```
    """
    return VQRAEModel(VQRAEConfig(**config_kwargs))


__all__ = [
    "VQRAE",
    "VQRAEDecoder",
    "VQRAEDecoderOutput",
    "VQRAEEncoderOutput",
    "VQRAEModel",
    "VQRAEModelOutput",
    "VQRAEPreTrainedModel",
    "center_crop_settings",
    "image_processor_for",
]
