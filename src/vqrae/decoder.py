"""The VQRAE decoder: a ViT, the mirror of the SigLIP encoder, that maps tokens to patches of pixels.

It imports only the standard library, torch and transformers (and `configuration_vqrae.py`): `save_pretrained`
copies it to the Hub with `modeling_vqrae.py` for `trust_remote_code` users.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_vqrae import VQRAEConfig


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


__all__ = ["VQRAEDecoder"]
