"""Options of `vqrae-train`, as dataclasses for `transformers.HfArgumentParser`.

Options come from a YAML file (`--config`, a path or the name of a preset in `vqrae/configs/`) overridden by the
command line. Names follow `transformers.TrainingArguments` where one exists. The defaults are the built-in CPU
run (`configs/tiny_cpu.yaml` spells them out): `vqrae-train` with no arguments trains it.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import ClassVar

from ..arguments import ImageSourceArguments, check_at_least
from ..builtin_photos import BUILTIN_COLOUR_DATASET_NAME
from ..configuration_vqrae import EFFECTIVE_ONLY_WITH, NOT_TRAINING_OPTIONS, VQRAEConfig, is_number
from ..errors import UsageError
from ..presets import QUANTIZER_PRESETS, SIZE_PRESET_MODEL_FIELDS, VISION_PRESETS
from .data import check_color_augment

__all__ = [
    "DataArguments",
    "MODEL_OPTIONS",
    "ModelArguments",
    "RESUMABLE_OPTIONS",
    "STAGE_OPTIONS",
    "Stage",
    "VQRAETrainingArguments",
    "OPTION_NAMES",
    "options_to_dict",
]

VISION_SIZE_FIELDS = (
    "image_size",
    "patch_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)
REPORT_TO = ("none", "tensorboard", "wandb", "trackio", "comet_ml", "aim", "mlflow", "clearml", "dvclive", "all")
MIXED_PRECISION = ("no", "bf16", "fp16")
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)


class Stage(enum.Enum):
    """What a run trains (the VQRAE paper's stages). Compared by identity, so a string never stands in for one."""

    ONE = "stage1"  # the encoder frozen: the quantizer, post_quant_conv and decoder train
    TWO = "stage2"  # the encoder trains too, distilled towards a frozen copy of where it started
    JOINT = "joint"  # a randomly initialised encoder, trained with the rest from the first step


# `--stage` as users spell it (and `training_config.yaml` records it) -> the stage; without it, `Stage.ONE` or
# `Stage.JOINT` by whether the encoder is pretrained.
STAGE_OPTIONS = {1: Stage.ONE, 2: Stage.TWO}


def _error(name: str, value, allowed: str) -> UsageError:
    return UsageError(f"`{name}` must be {allowed} (got {value!r}).")


def _check_non_negative(name: str, value) -> None:
    if not is_number(value) or not value >= 0 or math.isinf(value):
        raise _error(name, value, "a finite number >= 0")


def _config_field_docs() -> dict[str, str]:
    """Each VQRAEConfig field's entry in the `Args:` section of its docstring, as one line (`%` escaped for
    argparse): the help of its option."""
    docs, name = {}, None
    for line in VQRAEConfig.__doc__.splitlines():
        entry = re.match(r" {8}(\w+) \(", line)
        if entry:
            name = entry.group(1)
            docs[name] = []
        elif name is not None and line.startswith(" " * 12):
            docs[name].append(line.strip())
        else:
            name = None
    return {name: " ".join(lines).replace("%", "%%") for name, lines in docs.items()}


def _option_type(annotation):
    """The command-line type of a VQRAEConfig field, unset (None) by default."""
    kinds = set(typing.get_args(annotation)) or {annotation}
    if bool in kinds:
        return bool | None
    if float in kinds:
        return float | None
    if any(typing.get_origin(kind) is list for kind in kinds):
        return list[int] | None
    if int in kinds:
        return int | None
    raise TypeError(f"VQRAEConfig field of type {annotation} has no command-line type: add one here.")


# The VQRAEConfig fields `vqrae-train` offers as options of the same name (in the config's order).
MODEL_OPTIONS = tuple(name for name in VQRAEConfig.__annotations__ if name not in NOT_TRAINING_OPTIONS)


def _with_model_options(cls):
    """Add every option of `MODEL_OPTIONS` to `cls` as an unset (None) field, documented by the config's docstring:
    unset, the quantizer and size presets and then the config's own defaults apply (`config_kwargs`)."""
    docs = _config_field_docs()
    for name in MODEL_OPTIONS:
        if name in cls.__annotations__:
            raise TypeError(f"`{name}` is a VQRAEConfig field: its option comes from the config, not from {cls}.")
        cls.__annotations__[name] = _option_type(VQRAEConfig.__annotations__[name])
        setattr(cls, name, field(default=None, metadata={"help": docs[name]}))
    return cls


@dataclass
@_with_model_options
class ModelArguments:
    """Which model to train: a pretrained SigLIP encoder, a VQRAE folder, or a randomly initialised encoder."""

    encoder_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A pretrained SigLIP (or fixed-resolution SigLIP2) vision encoder: Hub id or folder."},
    )
    init_from: str | None = field(
        default=None,
        metadata={"help": "Start from a saved VQRAE folder (e.g. the output of stage 1), weights and config."},
    )
    vision_config: str | None = field(
        default=None,
        metadata={
            "help": f"A randomly initialised encoder: a named size ({', '.join(VISION_PRESETS)}) or a JSON file of "
            "SigLIP vision config fields. Default: tiny."
        },
    )
    image_size: int | None = field(default=None, metadata={"help": "Overrides the vision config's image_size."})
    patch_size: int | None = field(default=None, metadata={"help": "Overrides the vision config's patch_size."})
    hidden_size: int | None = field(default=None, metadata={"help": "Overrides the vision config's hidden_size."})
    num_hidden_layers: int | None = field(default=None, metadata={"help": "Overrides num_hidden_layers."})
    num_attention_heads: int | None = field(default=None, metadata={"help": "Overrides num_attention_heads."})
    intermediate_size: int | None = field(default=None, metadata={"help": "Overrides intermediate_size."})
    quantizer: str | None = field(
        default=None,
        metadata={"help": f"Quantizer preset: {', '.join(QUANTIZER_PRESETS)} (default cosmos_fsq for a new model)."},
    )
    # Then every VQRAEConfig field `NOT_TRAINING_OPTIONS` does not exclude, added by `_with_model_options`.

    def __post_init__(self):
        if self.encoder_name_or_path is not None and self.init_from is not None:
            raise UsageError(
                "Pass either `encoder_name_or_path` (a pretrained SigLIP encoder) or `init_from` (a VQRAE folder), "
                f"not both (got {self.encoder_name_or_path!r} and {self.init_from!r})."
            )
        if self.quantizer is not None and self.quantizer not in QUANTIZER_PRESETS:
            raise _error("quantizer", self.quantizer, f"one of {sorted(QUANTIZER_PRESETS)}")
        if self.vision_config is not None:
            if self.encoder_name_or_path is not None or self.init_from is not None:
                raise UsageError(
                    "`vision_config` describes a randomly initialised encoder; it cannot be combined with "
                    "`encoder_name_or_path` or `init_from`, whose config is fixed."
                )
            if self.vision_config not in VISION_PRESETS and not os.path.isfile(self.vision_config):
                raise _error(
                    "vision_config", self.vision_config, f"one of {sorted(VISION_PRESETS)} or a JSON file of fields"
                )
        for name in VISION_SIZE_FIELDS:  # their values are checked by the config the model is built from
            if getattr(self, name) is not None and (self.encoder_name_or_path or self.init_from):
                raise UsageError(
                    f"`{name}` sets the size of a randomly initialised encoder; it cannot be combined with "
                    "`encoder_name_or_path` or `init_from`, whose encoder is fixed."
                )

    def vision_config_dict(self) -> dict:
        """The SigLIP vision config fields of a randomly initialised encoder (named size + overrides)."""
        name = self.vision_config or "tiny"
        if name in VISION_PRESETS:
            fields = dict(VISION_PRESETS[name])
        else:
            with open(name, encoding="utf-8") as handle:
                fields = json.load(handle)
            if not isinstance(fields, dict):
                raise _error("vision_config", name, "a JSON file holding an object of SigLIP vision config fields")
        for key in VISION_SIZE_FIELDS:
            if getattr(self, key) is not None:
                fields[key] = getattr(self, key)
        return fields

    def config_kwargs(self, default_quantizer: str | None = "cosmos_fsq", size_preset: bool = False) -> dict:
        """VQRAEConfig fields for the quantizer and the decoder: the quantizer preset (`quantizer`, else
        `default_quantizer`), with `size_preset` the fields of the named size (`SIZE_PRESET_MODEL_FIELDS`), then
        every field given explicitly."""
        preset = self.quantizer or default_quantizer
        kwargs = dict(QUANTIZER_PRESETS[preset]) if preset is not None else {}
        explicit = {name: getattr(self, name) for name in MODEL_OPTIONS if getattr(self, name) is not None}
        if size_preset:
            kwargs.update(SIZE_PRESET_MODEL_FIELDS.get(self.vision_config or "tiny", {}))
        kwargs.update(explicit)
        if size_preset:
            # A size's field that acts only with another setting (its post_quant_conv kernel needs a post_quant_conv,
            # its FSQ noise an FSQ quantizer) is dropped where that setting is off: it would do nothing (refused).
            for name in SIZE_PRESET_MODEL_FIELDS.get(self.vision_config or "tiny", {}):
                setting, needed, _ = EFFECTIVE_ONLY_WITH.get(name, (None, None, None))
                default = VQRAEConfig.__dataclass_fields__[setting].default if setting else None
                if setting is not None and name not in explicit and kwargs.get(setting, default) != needed:
                    kwargs.pop(name, None)
        return kwargs


@dataclass
class DataArguments(ImageSourceArguments):
    """Where the images come from (by default the built-in photos) and how they are cut."""

    SPLIT_OPTION: ClassVar[str] = "--train_split/--validation_split"
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    validation_split: str = field(default="validation", metadata={"help": "Split to evaluate on."})
    train_dir: str | None = field(default=None, metadata={"help": "A local folder of training images (imagefolder)."})
    validation_dir: str | None = field(default=None, metadata={"help": "A local folder of validation images."})
    validation_split_percentage: float = field(
        default=5.0,
        metadata={
            "help": "Percentage of the training examples held out for validation when the data has no validation "
            "split (--dataset_name) or folder (--train_dir); fixed by a seed of its own, not --seed."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on at most this many images (the first ones, after holding out)."}
    )
    shuffle_buffer_size: int = field(default=1000, metadata={"help": "Shuffle buffer when streaming."})
    max_eval_samples: int | None = field(
        default=512, metadata={"resumable": True, "help": "Evaluate on at most this many images."}
    )
    min_crop_scale: float = field(
        default=0.08,
        metadata={
            "help": "Smallest share of an image's area a random training crop covers. The built-in held-out set's "
            "smallest tiles, a quarter of a photo's shorter side, cover 0.042-0.063 of its area (0.08 never zooms in "
            "that far)."
        },
    )
    random_flip: bool = field(default=True, metadata={"help": "Random horizontal flips of training crops."})
    color_augment: str = field(
        default="permute",
        metadata={
            "help": "Colour augmentation of training crops: none; hue (chroma rotated by a random angle in YIQ, luma "
            "kept); permute (RGB channels in a random order: the tokens must carry every hue, not guess it)."
        },
    )
    dataloader_num_workers: int = field(
        default=1,
        metadata={"resumable": True, "help": "DataLoader worker processes preparing batches (map-style data only)."},
    )
    cache_dir: str | None = field(
        default=None, metadata={"resumable": True, "help": "Cache folder for datasets and models."}
    )

    def __post_init__(self):
        if self.dataset_name is None and self.train_dir is None:
            # The built-in training photos with the two synthetic colour images: their palette alone is narrow.
            self.dataset_name = BUILTIN_COLOUR_DATASET_NAME
        if self.train_dir is None and self.validation_dir is not None:
            raise UsageError("`validation_dir` needs `train_dir` (local folders are used for both splits).")
        if self.train_dir is not None and self.dataset_name is not None:
            raise UsageError(
                f"Pass either `dataset_name` or `train_dir`, not both (got {self.dataset_name!r} and "
                f"{self.train_dir!r})."
            )
        check_at_least("shuffle_buffer_size", self.shuffle_buffer_size, 1)
        check_at_least("max_eval_samples", self.max_eval_samples, 1, optional=True)
        check_at_least("max_train_samples", self.max_train_samples, 1, optional=True)
        percentage = self.validation_split_percentage
        if not is_number(percentage) or not 0 <= percentage < 100:
            raise _error("validation_split_percentage", percentage, "a number in [0, 100) (0: never hold out)")
        scale = self.min_crop_scale
        if not is_number(scale) or not 0 < scale <= 1:
            raise _error("min_crop_scale", scale, "a number in (0, 1]")
        check_color_augment(self.color_augment)
        check_at_least("dataloader_num_workers", self.dataloader_num_workers, 0)


@dataclass
class VQRAETrainingArguments:
    """How to train: stage, losses, optimisation, checkpoints, evaluation, logging and publishing."""

    output_dir: str = field(
        default="outputs/vqrae-tiny-cpu", metadata={"resumable": True, "help": "Where the model and run files go."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"resumable": True, "help": "Start afresh in an output_dir that holds an earlier run."}
    )
    stage: int | None = field(
        default=None,
        metadata={
            "help": "1: encoder frozen; 2: encoder trained with self-distillation towards its starting copy. "
            "Default: 1 with a pretrained encoder or --init_from; a random encoder is trained jointly (no stage)."
        },
    )
    max_steps: int = field(default=4000, metadata={"help": "Optimiser steps to train for."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Batch size per process."})
    per_device_eval_batch_size: int = field(
        default=32, metadata={"resumable": True, "help": "Evaluation batch size per process."}
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimiser step."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak learning rate of AdamW."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (not on biases and norms)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.99, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (0: off)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers.get_scheduler name."})
    warmup_steps: int = field(default=200, metadata={"help": "Linear warm-up steps."})
    mixed_precision: str = field(default="no", metadata={"help": "no, bf16 or fp16 (accelerate autocast)."})
    seed: int = field(default=42, metadata={"help": "Seed of the initialisation and of the data stream."})
    l1_weight: float = field(default=1.0, metadata={"help": "Weight of the L1 pixel loss."})
    mse_weight: float = field(default=0.0, metadata={"help": "Weight of the MSE pixel loss."})
    ssim_weight: float = field(default=0.0, metadata={"help": "Weight of the 1 - SSIM loss (torchmetrics)."})
    gradient_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the L1 loss on neighbouring-pixel differences (against patch seams)."},
    )
    quantizer_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the quantizer's own loss."})
    distillation_weight: float = field(
        default=1.0, metadata={"help": "Stage 2: weight of ||f(x) - f_teacher(x)||^2 on the encoder features."}
    )
    perceptual_weight: float = field(default=0.0, metadata={"help": "Weight of the LPIPS loss (needs local weights)."})
    lpips_weights: str | None = field(
        default=None,
        metadata={"resumable": True, "help": "Folder holding vgg16-397923af.pth and LPIPS's vgg.pth (v0.1)."},
    )
    gan_weight: float = field(default=0.0, metadata={"help": "Weight of the patch-GAN loss (0: no GAN)."})
    gan_start_step: int = field(default=0, metadata={"help": "Step from which the GAN loss is used."})
    discriminator_learning_rate: float | None = field(
        default=None, metadata={"help": "Discriminator learning rate (default: learning_rate)."}
    )
    discriminator_channels: int = field(default=64, metadata={"help": "Width of the first discriminator layer."})
    discriminator_layers: int = field(default=3, metadata={"help": "Strided layers of the discriminator."})
    ema_decay: float | None = field(
        default=None, metadata={"help": "Keep an EMA of the weights with this decay; it is evaluated and saved."}
    )
    torch_num_threads: int | None = field(
        default=2,
        metadata={
            "resumable": True,
            "help": "CPU threads of torch in each process (None: torch's default, one per core). The tiny default "
            "trains 1.4x faster on 2 cores with 2 threads than with 1, beside its data worker.",
        },
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    ddp_timeout: int = field(
        default=1800,
        metadata={
            "resumable": True,
            "help": "Seconds a process waits for the others in a collective before the run is aborted (NCCL's own "
            "default is 600; transformers' TrainingArguments name and default).",
        },
    )
    logging_steps: int = field(
        default=10, metadata={"resumable": True, "help": "Log the losses every this many steps."}
    )
    eval_steps: int = field(
        default=500, metadata={"resumable": True, "help": "Evaluate every this many steps (and at the end)."}
    )
    save_steps: int = field(
        default=500, metadata={"resumable": True, "help": "Save a checkpoint every this many steps (and at the end)."}
    )
    save_total_limit: int | None = field(
        default=2, metadata={"resumable": True, "help": "Keep at most this many checkpoints."}
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "resumable": True,
            "help": "'latest' (the newest complete checkpoint in output_dir, if any) or a checkpoint folder.",
        },
    )
    report_to: str = field(default="none", metadata={"resumable": True, "help": f"Tracker: {', '.join(REPORT_TO)}."})
    num_reconstructions: int = field(
        default=8, metadata={"resumable": True, "help": "Validation images shown in reconstructions.png."}
    )
    inception_weights: str | None = field(
        default=None,
        metadata={"resumable": True, "help": "torch-fidelity Inception weights for rFID (default: torch hub cache)."},
    )
    disable_tqdm: bool = field(default=False, metadata={"resumable": True, "help": "No progress bar."})
    push_to_hub: bool = field(
        default=False, metadata={"resumable": True, "help": "Publish the output folder at the end."}
    )
    hub_model_id: str | None = field(
        default=None, metadata={"resumable": True, "help": "Repository id 'org/name' to publish to."}
    )
    hub_private_repo: bool = field(
        default=False, metadata={"resumable": True, "help": "Create the repository private."}
    )
    hub_revision: str | None = field(default=None, metadata={"resumable": True, "help": "Branch to publish to."})

    def __post_init__(self):
        if self.stage is not None and self.stage not in STAGE_OPTIONS:
            raise _error("stage", self.stage, "1 (encoder frozen), 2 (encoder trained with self-distillation) or None")
        for name in (
            "max_steps",
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "eval_steps",
            "save_steps",
            "discriminator_channels",
            "discriminator_layers",
            "ddp_timeout",
        ):
            check_at_least(name, getattr(self, name), 1)
        check_at_least("save_total_limit", self.save_total_limit, 1, optional=True)
        check_at_least("torch_num_threads", self.torch_num_threads, 1, optional=True)
        for name in ("num_reconstructions", "warmup_steps", "gan_start_step"):
            check_at_least(name, getattr(self, name), 0)
        for name in (
            "learning_rate",
            "weight_decay",
            "adam_epsilon",
            "max_grad_norm",
            "l1_weight",
            "mse_weight",
            "ssim_weight",
            "gradient_weight",
            "quantizer_loss_weight",
            "distillation_weight",
            "perceptual_weight",
            "gan_weight",
        ):
            _check_non_negative(name, getattr(self, name))
        if not self.learning_rate > 0:
            raise _error("learning_rate", self.learning_rate, "a number > 0")
        if self.l1_weight + self.mse_weight + self.ssim_weight + self.perceptual_weight == 0:
            raise UsageError(
                "At least one reconstruction loss needs a positive weight (`l1_weight`, `mse_weight`, `ssim_weight` "
                "or `perceptual_weight`; all are 0)."
            )
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if not is_number(value) or not 0 <= value < 1:
                raise _error(name, value, "a number in [0, 1)")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise _error("ema_decay", self.ema_decay, "a number in (0, 1) or None")
        if self.discriminator_learning_rate is not None and not self.discriminator_learning_rate > 0:
            raise _error("discriminator_learning_rate", self.discriminator_learning_rate, "a number > 0 or None")
        if self.mixed_precision not in MIXED_PRECISION:
            raise _error("mixed_precision", self.mixed_precision, f"one of {list(MIXED_PRECISION)}")
        if self.lr_scheduler_type not in SCHEDULERS:
            raise _error("lr_scheduler_type", self.lr_scheduler_type, f"one of {list(SCHEDULERS)}")
        if self.report_to not in REPORT_TO:
            raise _error("report_to", self.report_to, f"one of {list(REPORT_TO)}")
        if self.push_to_hub and not self.hub_model_id:
            raise UsageError("`push_to_hub` needs `hub_model_id`, the repository to publish to ('org/name').")


ALL_ARGUMENT_CLASSES = (ModelArguments, DataArguments, VQRAETrainingArguments)
# Options a resume may change, marked `resumable` on their fields: they decide what is logged, saved, shown or
# published, never the weights. Any other option (every model option among them) must keep its value.
RESUMABLE_OPTIONS = frozenset(
    item.name for cls in ALL_ARGUMENT_CLASSES for item in dataclasses.fields(cls) if item.metadata.get("resumable")
)
# Every option's name: what a config file (`--config`, `training_config.yaml`) may hold.
OPTION_NAMES = frozenset(item.name for cls in ALL_ARGUMENT_CLASSES for item in dataclasses.fields(cls))


def options_to_dict(model_args, data_args, training_args) -> dict:
    """All options as one flat mapping (what `training_config.yaml` holds)."""
    options = {}
    for args in (model_args, data_args, training_args):
        options.update(dataclasses.asdict(args))
    return options
