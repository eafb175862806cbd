"""vqrae: VQRAE image tokenizers (SigLIP encoder, FSQ or VQ quantizer, ViT decoder) for the Hugging Face ecosystem."""

from transformers import AutoConfig, AutoModel

from .configuration_vqrae import VQRAEConfig
from .image_utils import denormalize, to_pil_images
from .modeling_vqrae import (
    VQRAE,
    VQRAEDecoderOutput,
    VQRAEEncoderOutput,
    VQRAEModel,
    VQRAEModelOutput,
    VQRAEPreTrainedModel,
)
from .quantizers import VQRAEFSQuantizer, VQRAEQuantizerOutput, VQRAEVectorQuantizer, codebook_statistics

__version__ = "0.1.0"

AutoConfig.register(VQRAEConfig.model_type, VQRAEConfig, exist_ok=True)
AutoModel.register(VQRAEConfig, VQRAEModel, exist_ok=True)
# `save_pretrained` copies the model files (configuration, modeling, quantizers) and writes `auto_map`, so the Hub
# copy loads without vqrae.
VQRAEConfig.register_for_auto_class()
VQRAEModel.register_for_auto_class("AutoModel")

__all__ = [
    "VQRAE",
    "VQRAEConfig",
    "VQRAEDecoderOutput",
    "VQRAEEncoderOutput",
    "VQRAEFSQuantizer",
    "VQRAEModel",
    "VQRAEModelOutput",
    "VQRAEPreTrainedModel",
    "VQRAEQuantizerOutput",
    "VQRAEVectorQuantizer",
    "codebook_statistics",
    "denormalize",
    "to_pil_images",
    "__version__",
]
