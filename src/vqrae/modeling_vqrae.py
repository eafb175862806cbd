"""VQRAE: a SigLIP encoder, an FSQ or VQ quantizer, an optional post_quant_conv and a ViT decoder.

The file reads in the order of the data flow:

    pixel_values -> encoder (SiglipVisionModel)           -> continuous features (B, N, D)
                 -> quantizer (project_in, FSQ/VQ, project_out) -> indices (B, h, w), codes (B, D, h, w)
                 -> post_quant_conv (optional)              -> normalisation (optional)
                    (with `post_quant_conv_on_codes`, Cosmos-Tokenizer's placement: no project_out, and
                    post_quant_conv maps the quantizer's own codes (B, d, h, w) to D)
                 -> decoder (ViT, unpatchify)               -> reconstruction (B, 3, H, W)

It imports only torch and transformers (and the two sibling files), because `save_pretrained` copies it to the
Hub for `trust_remote_code` users.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, PreTrainedModel, SiglipVisionModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, logging

from .atomic_io import atomic_folder
from .configuration_vqrae import PREPROCESSOR_FIELDS, VQRAEConfig, check_encoder_config
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
    """

    reconstruction: torch.FloatTensor | None = None
    indices: torch.LongTensor | None = None
    quantized: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    quantizer_loss: torch.FloatTensor | None = None


# ---------------------------------------------------------------------------------------------------------------
# Decoder: a ViT that maps tokens to patches of pixels
# ---------------------------------------------------------------------------------------------------------------


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class VQRAEDecoderAttention(nn.Module):
    """Multi-head self-attention over the token grid (no mask: every token sees every other)."""

    def __init__(self, config: VQRAEConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.decoder_hidden_size
        self.num_heads = config.decoder_num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scale = self.head_dim**-0.5
        self.is_causal = False
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        queries = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        keys = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        values = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, _ = attention_interface(
            self, queries, keys, values, None, is_causal=False, scaling=self.scale, dropout=0.0
        )
        return self.out_proj(attn_output.reshape(*input_shape, -1).contiguous())


class VQRAEDecoderMLP(nn.Module):
    def __init__(self, config: VQRAEConfig):
        super().__init__()
        self.activation_fn = ACT2FN[config.decoder_hidden_act]
        self.fc1 = nn.Linear(config.decoder_hidden_size, config.decoder_intermediate_size)
        self.fc2 = nn.Linear(config.decoder_intermediate_size, config.decoder_hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class VQRAEDecoderLayer(GradientCheckpointingLayer):
    """A pre-norm transformer block."""

    def __init__(self, config: VQRAEConfig):
        super().__init__()
        width, eps = config.decoder_hidden_size, config.vision_config.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = VQRAEDecoderAttention(config)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = VQRAEDecoderMLP(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states))
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class VQRAEDecoderConvHead(nn.Module):
    """A residual refinement of the unpatchified image: `conv(3x3, C -> n) -> GELU -> conv(3x3, n -> C)`, added to its
    input. Its second convolution starts at zero, so a new head is the identity. It sees 5x5 pixels around each one,
    across patch borders, where the ViT decoder's per-patch output layer leaves a visible grid (the seam score of
    `eval_results.json` measures it)."""

    def __init__(self, num_channels: int, hidden_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(num_channels, hidden_channels, 3, padding=1)
        self.act = nn.GELU()
        self.conv_out = nn.Conv2d(hidden_channels, num_channels, 3, padding=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.act(self.conv_in(pixels)))


class VQRAEDecoder(nn.Module):
    """ViT decoder, the mirror of the SigLIP encoder: tokens `(B, h * w, D)` -> pixels `(B, C, h * p, w * p)`.

    `in_proj` maps the encoder width to the decoder width, a learned position embedding (interpolated for other
    grids) marks where each token sits, `L` pre-norm blocks mix the tokens, and `out_proj` predicts the `p * p * C`
    pixel values of each patch, which are then put back in place (unpatchify).

    With `config.decoder_patch_overlap = o > 0`, each token predicts a larger `(p + 2 o)` square centred on its
    patch instead, weighted by a window that ramps linearly over the `2 o` pixels it shares with each neighbour; the
    squares are added up in place (overlap-add) and divided by the summed windows, so every pixel near a border is
    a smooth blend of the tokens on both sides rather than a step between them. With
    `config.decoder_conv_head_channels`, a small residual convolutional head (`conv_head`) then works on the whole
    image, across the patch borders.
    """

    def __init__(self, config: VQRAEConfig):
        super().__init__()
        vision = config.vision_config
        width = config.decoder_hidden_size
        self.patch_size = vision.patch_size
        self.num_channels = vision.num_channels
        self.grid_size = vision.image_size // vision.patch_size
        self.in_proj = nn.Linear(vision.hidden_size, width)
        self.position_embedding = nn.Parameter(torch.empty(1, self.grid_size * self.grid_size, width))
        self.layers = nn.ModuleList([VQRAEDecoderLayer(config) for _ in range(config.decoder_num_hidden_layers)])
        self.norm = nn.LayerNorm(width, eps=vision.layer_norm_eps)
        self.patch_overlap = config.decoder_patch_overlap
        window = self.patch_size + 2 * self.patch_overlap
        self.out_proj = nn.Linear(width, window * window * self.num_channels)
        channels = config.decoder_conv_head_channels
        self.conv_head = VQRAEDecoderConvHead(self.num_channels, channels) if channels else None

    def position_embedding_for(self, height: int, width: int) -> torch.Tensor:
        """Position embedding `(1, height * width, D)` for a grid of `height x width` tokens."""
        if height == self.grid_size and width == self.grid_size:
            return self.position_embedding
        grid = self.position_embedding.reshape(1, self.grid_size, self.grid_size, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(height, width), mode="bicubic", align_corners=False)
        return grid.to(self.position_embedding.dtype).permute(0, 2, 3, 1).reshape(1, height * width, -1)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        hidden_states = self.in_proj(tokens) + self.position_embedding_for(height, width)
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        patches = self.out_proj(self.norm(hidden_states))
        pixels = (
            self._unpatchify(patches, height, width)
            if self.patch_overlap == 0
            else self._overlap_add(patches, height, width)
        )
        return pixels if self.conv_head is None else pixels + self.conv_head(pixels)

    def _unpatchify(self, patches: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, h*w, p*p*C) -> (B, C, h*p, w*p)"""
        batch_size, p, c = patches.shape[0], self.patch_size, self.num_channels
        patches = patches.reshape(batch_size, height, width, p, p, c)
        return patches.permute(0, 5, 1, 3, 2, 4).reshape(batch_size, c, height * p, width * p)

    def _overlap_add(self, patches: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, h*w, C*k*k) squares of side k = p + 2 o, centred on their patches -> (B, C, h*p, w*p), each pixel the
        window-weighted mean of the squares that cover it."""
        p, o, c = self.patch_size, self.patch_overlap, self.num_channels
        side = p + 2 * o
        # Trapezoid window: 1 in the middle, a linear ramp over the 2 o pixels shared with a neighbour, where the two
        # ramps add up to 1.
        ramp = torch.arange(side, device=patches.device, dtype=torch.float32) + 0.5
        line = torch.minimum(ramp, side - ramp).div(2 * o).clamp(max=1.0)
        window = (line[:, None] * line[None, :]).to(patches.dtype).flatten()  # (k*k,)
        columns = patches.transpose(1, 2).reshape(patches.shape[0], c, side * side, -1) * window[:, None]
        fold = dict(output_size=(height * p, width * p), kernel_size=side, stride=p, padding=o)
        summed = F.fold(columns.reshape(patches.shape[0], c * side * side, -1), **fold)
        weights = F.fold(window[None, :, None].expand(1, -1, height * width), **fold)
        return summed / weights


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
            self.quantizer = VQRAEFSQuantizer(levels=config.fsq_levels, dim=hidden_size, project_out=project_out)
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
        if not torch.isfinite(pixel_values).all():
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

    def get_image_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool | None = None
    ) -> torch.Tensor:
        """The continuous semantic features of the encoder, `(batch_size, h * w, hidden_size)`."""
        self._check_pixel_values(pixel_values)
        if interpolate_pos_encoding is None:
            image_size = self.config.vision_config.image_size
            interpolate_pos_encoding = tuple(pixel_values.shape[-2:]) != (image_size, image_size)
        pixel_values = pixel_values.to(self.encoder.dtype)
        # A frozen encoder (stage 1) runs without building a graph.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self._encoder_is_frozen()):
            outputs = self.encoder(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        return outputs.last_hidden_state

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
        features = self.get_image_features(pixel_values)
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
        self, pixel_values: torch.Tensor, return_dict: bool | None = None, **kwargs
    ) -> VQRAEModelOutput | tuple:
        """Encode and decode: the reconstruction, the tokens, the codes, the features and the quantizer loss."""
        if kwargs:
            raise TypeError(f"VQRAEModel.forward() got unexpected keyword arguments: {sorted(kwargs)}.")
        encoded = self.encode(pixel_values, return_dict=True)
        reconstruction = self.decode(encoded.quantized, return_dict=True).reconstruction
        output = VQRAEModelOutput(
            reconstruction=reconstruction,
            indices=encoded.indices,
            quantized=encoded.quantized,
            last_hidden_state=encoded.last_hidden_state,
            quantizer_loss=encoded.quantizer_loss,
        )
        return output if self._use_return_dict(return_dict) else output.to_tuple()

    # -- saving ----------------------------------------------------------------------------------------------------

    def get_image_processor(self):
        """The image processor that prepares images exactly as the encoder expects (`image_processor_for`)."""
        return image_processor_for(self.config)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus a `preprocessor_config.json` for `AutoImageProcessor`.

        The save is atomic: the model is written into a hidden sibling folder, which then takes the place of
        `save_directory` in one step, so a save killed at any moment leaves either the old model or the new one,
        never a mix. Other files already in `save_directory` (a model card, logs, checkpoints) are kept; stale
        weight files are dropped, as `PreTrainedModel.save_pretrained` does.
        """
        is_main_process = args[0] if args else kwargs.get("is_main_process", True)
        if not is_main_process or kwargs.get("distributed_checkpoint") or os.path.isfile(save_directory):
            return super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("push_to_hub"):
            kwargs.setdefault("repo_id", os.path.basename(os.path.realpath(save_directory)))
        with atomic_folder(save_directory, keep=lambda name: not _WEIGHT_FILE.fullmatch(name)) as staging:
            result = super().save_pretrained(staging, *args, **kwargs)
            self.get_image_processor().save_pretrained(staging)
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, strict about the weights.

        Weights that do not match the configuration (a tensor missing from the checkpoint, an unexpected one, or
        one of another shape) raise a `ValueError` instead of being randomly initialised or dropped with a logged
        warning; pass `ignore_mismatched_sizes=True` to re-initialise tensors of another shape instead. A truncated
        or corrupted `model.safetensors` raises an `OSError` that says so. Weights are read from safetensors only:
        a pickled `pytorch_model.bin` is never opened unless `use_safetensors=False` is passed.
        """
        kwargs.setdefault("use_safetensors", True)
        name = os.fspath(pretrained_model_name_or_path)
        if _is_missing_local_path(name):
            raise OSError(
                f"{name!r} is not a folder: {os.path.abspath(os.path.expanduser(name))} does not exist. Give the path "
                "of a saved VQRAE folder (relative to the current directory) or a Hub id ('org/name')."
            )
        output_loading_info = kwargs.pop("output_loading_info", False)
        ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
        try:
            model, loading_info = super().from_pretrained(
                pretrained_model_name_or_path,
                *model_args,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported below, with a clearer message than transformers' own
                **kwargs,
            )
        except Exception as error:
            if not os.path.exists(name) and isinstance(error, (OSError, ValueError)):
                # transformers would say "Repo id must be in the form ..." or that it could not connect to the Hub.
                raise OSError(
                    f"{name!r} is not a folder here (no {os.path.abspath(name)}) and could not be loaded as a "
                    f"model from the Hub ({type(error).__name__}: {error}). Give the path of a saved VQRAE folder "
                    "or a Hub id that is reachable (or in the local Hub cache when offline)."
                ) from error
            # safetensors' own error type; matched by module so this file imports only torch and transformers.
            if type(error).__module__.split(".")[0] == "safetensors":
                raise OSError(
                    f"Could not read the weights of {os.fspath(pretrained_model_name_or_path)!r}: {error}. The "
                    "weights file is truncated or corrupted (an interrupted download, copy or save?); download or "
                    "save it again."
                ) from error
            raise
        problems = []
        if loading_info["missing_keys"]:
            problems.append(f"missing from the checkpoint: {', '.join(sorted(loading_info['missing_keys']))}")
        if loading_info["unexpected_keys"]:
            problems.append(f"not expected by the config: {', '.join(sorted(loading_info['unexpected_keys']))}")
        if loading_info["mismatched_keys"] and not ignore_mismatched_sizes:
            problems.append(f"of another shape: {_describe_shapes(loading_info['mismatched_keys'])}")
        if problems:
            raise ValueError(
                f"The weights of {os.fspath(pretrained_model_name_or_path)!r} do not match its configuration; tensors "
                + "; ".join(problems)
                + ". The checkpoint was saved from a model with other settings (e.g. `use_post_quant_conv`, "
                "`fsq_levels`, `num_embeddings`, `codebook_dim`, `use_simvq` or the encoder/decoder sizes): fix "
                "config.json so it describes the weights, instead of loading randomly initialised tensors."
            )
        return (model, loading_info) if output_loading_info else model

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


# Weight files that `PreTrainedModel.save_pretrained` itself replaces; a new save never keeps stale ones.
_WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?")


def _is_missing_local_path(name: str) -> bool:
    """`name` cannot be a Hub id and names no existing file or folder: it starts like a path (`/`, `./`, `~`) or
    its parent folder exists here (`outputs/typo` next to an `outputs/` folder)."""
    if os.path.exists(os.path.expanduser(name)):
        return False
    if name.startswith(("/", "./", "../", "~")) or (os.altsep and name.startswith(os.altsep)):
        return True
    parent = os.path.dirname(name)
    return bool(parent) and os.path.isdir(parent)


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
    from transformers.image_processing_base import ImageProcessingMixin

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
    from transformers import SiglipImageProcessorPil

    settings = dict(config.preprocessor_config or {})
    settings.pop("image_processor_type", None)
    return SiglipImageProcessorPil(**center_crop_settings(config.vision_config.image_size), **settings)


def VQRAE(**config_kwargs) -> VQRAEModel:
    """The seed's spelling: build a randomly initialised [`VQRAEModel`] from [`VQRAEConfig`] keyword arguments.

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
