"""The accelerate training loop of a VQRAE tokenizer.

`train(model_args, data_args, training_args)` builds the model (pretrained SigLIP encoder, a VQRAE folder, or a
randomly initialised encoder), trains it in the requested stage, checkpoints and evaluates it, and writes the
output folder: the model (`save_pretrained`), `eval_results.json`, `metrics.jsonl`, the pictures,
`training_config.yaml` and the model card.

Stages (VQRAE paper): stage 1 freezes the encoder (no gradients, eval mode, run without a graph) and trains the
quantizer, `post_quant_conv` and decoder; stage 2 trains the encoder too, with self-distillation
`distillation_weight * ||f(x) - f_teacher(x)||^2` towards a frozen copy of the starting encoder (never saved). A
randomly initialised encoder is trained jointly from the first step.

Resuming: a checkpoint holds the model, optimisers, scheduler, EMA, RNG states, the step and the data position.
The data stream is a function of the step (`data.TrainingBatches`), so a run killed at any moment and resumed
from its last checkpoint ends with the same weights as an uninterrupted run. Checkpoints are written to a hidden
folder and renamed when complete, so a kill during a save never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .args import DataArguments, ModelArguments, VQRAETrainingArguments, options_to_dict
from .data import (
    BUILTIN_DATASET_NAME,
    StreamingTrainingBatches,
    TrainingBatches,
    load_image_dataset,
    load_validation_images,
)
from .losses import (
    LPIPS,
    VQRAEPatchDiscriminator,
    adaptive_gan_weight,
    discriminator_hinge_loss,
    generator_hinge_loss,
    reconstruction_losses,
)
from .metrics import evaluate_model, save_eval_results

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINTS_DIR", "ExponentialMovingAverage", "build_model", "latest_checkpoint", "resolve_stage", "train"]

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_FILE = "trainer_state.json"
EMA_WEIGHTS_FILE = "ema_model.safetensors"
METRICS_FILE = "metrics.jsonl"
TRAINING_CONFIG_FILE = "training_config.yaml"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# What a run writes into output_dir (removed by --overwrite_output_dir).
_RUN_OUTPUTS = (
    CHECKPOINTS_DIR,
    METRICS_FILE,
    "runs",
    "eval_results.json",
    TRAINING_CONFIG_FILE,
    "reconstructions.png",
    "training_curves.png",
    "codebook_usage.png",
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "README.md",
)


# ---------------------------------------------------------------------------------------------------------------
# Model and stage
# ---------------------------------------------------------------------------------------------------------------


def build_model(model_args: ModelArguments, cache_dir: str | None = None):
    """The model to train, in float32: from `init_from`, around a pretrained `encoder_name_or_path`, or randomly
    initialised from a named vision config. Call after seeding: the random parts are initialised here."""
    from ..configuration_vqrae import VQRAEConfig
    from ..modeling_vqrae import VQRAEModel

    if model_args.init_from is not None:
        if not os.path.isdir(model_args.init_from) and not model_args.init_from.count("/") == 1:
            raise ValueError(f"`init_from` must be a saved VQRAE folder or Hub id (got {model_args.init_from!r}).")
        model = VQRAEModel.from_pretrained(model_args.init_from, dtype=torch.float32, cache_dir=cache_dir)
        requested = model_args.config_kwargs(default_quantizer=None)
        conflicts = {
            name: (value, getattr(model.config, name))
            for name, value in requested.items()
            if getattr(model.config, name) != value
        }
        if conflicts:
            details = ", ".join(
                f"`{name}`: asked {asked!r}, model has {has!r}" for name, (asked, has) in conflicts.items()
            )
            raise ValueError(f"Options contradict the model of `init_from` {model_args.init_from!r} ({details}).")
        return model
    if model_args.encoder_name_or_path is not None:
        return VQRAEModel.from_encoder_pretrained(
            model_args.encoder_name_or_path,
            encoder_kwargs={"dtype": torch.float32, "cache_dir": cache_dir},
            **model_args.config_kwargs(),
        )
    vision = model_args.vision_config_dict()
    vision.setdefault("vision_use_head", False)
    return VQRAEModel(VQRAEConfig(vision_config=vision, **model_args.config_kwargs(size_preset=True)))


def resolve_stage(stage: int | None, model_args: ModelArguments) -> str:
    """`"stage1"`, `"stage2"` or `"joint"` (a randomly initialised encoder, trained with the rest)."""
    pretrained = model_args.encoder_name_or_path is not None or model_args.init_from is not None
    if stage == 2 and not pretrained:
        raise ValueError(
            "Stage 2 fine-tunes a trained encoder with self-distillation towards its starting copy, so it needs a "
            "start model: pass --init_from (e.g. the output folder of stage 1) or --encoder_name_or_path."
        )
    if stage is None:
        return "stage1" if pretrained else "joint"
    if stage == 1 and not pretrained:
        logger.warning("Stage 1 with a randomly initialised encoder: the encoder stays frozen at its random weights.")
    return f"stage{stage}"


# ---------------------------------------------------------------------------------------------------------------
# EMA and random states
# ---------------------------------------------------------------------------------------------------------------


class ExponentialMovingAverage:
    """An exponential moving average of a model's floating-point parameters and buffers, kept in a copy of the
    model (`self.model`) that can be evaluated and saved. The decay warms up as `min(decay, (1 + n) / (10 + n))`."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        source = model.state_dict()
        for name, shadow in self.model.state_dict().items():
            if shadow.dtype.is_floating_point:
                shadow.lerp_(source[name].to(shadow.dtype), 1 - decay)


def _rng_state() -> dict:
    """This process's Python, NumPy and torch (CPU and CUDA) random states, as JSON-able lists."""
    numpy_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [generator.tolist() for generator in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------


def _complete_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    root = os.path.join(output_dir, CHECKPOINTS_DIR)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _CHECKPOINT_RE.match(name)
        if match and os.path.isfile(os.path.join(root, name, TRAINER_STATE_FILE)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint folder of a run, or None."""
    checkpoints = _complete_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def _remove_tree(path: str) -> None:
    """Rename, then delete: a half-deleted checkpoint never keeps a name that looks complete."""
    doomed = os.path.join(os.path.dirname(path), f".deleting-{os.path.basename(path)}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _save_checkpoint(
    accelerator, output_dir: str, step: int, *, scheduler, ema, data_state: dict, total_limit: int | None
) -> str:
    """Save everything a resume needs into a hidden folder, renamed `checkpoint-{step}` once complete.

    accelerate's `save_state` writes the models and optimisers (safetensors and `torch.save` of tensors); the rest
    is written here without pickles: the scheduler, the step and each process's random states and data position as
    JSON, the EMA weights as safetensors. accelerate's automatic checkpoint naming (whose `iteration` must be set
    after `load_state`) writes straight into the final folder, so a kill during a save would leave a checkpoint that
    looks complete; the folders are therefore named here, by step, and `trainer_state.json` is written last.
    """
    root = os.path.join(output_dir, CHECKPOINTS_DIR)
    final = os.path.join(root, f"checkpoint-{step}")
    temporary = os.path.join(root, f".incomplete-checkpoint-{step}")
    if accelerator.is_main_process:
        if os.path.exists(temporary):
            shutil.rmtree(temporary)
        os.makedirs(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(temporary, safe_serialization=True)
    with open(os.path.join(temporary, f"process_{accelerator.process_index}.json"), "w") as handle:
        json.dump({"rng": _rng_state(), "data": data_state}, handle)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"step": step, "num_processes": accelerator.num_processes, "scheduler": scheduler.state_dict()}
        if ema is not None:
            save_file(ema.model.state_dict(), os.path.join(temporary, EMA_WEIGHTS_FILE))
            state["ema_num_updates"] = ema.num_updates
        with open(os.path.join(temporary, TRAINER_STATE_FILE), "w") as handle:
            json.dump(state, handle)
        if os.path.exists(final):
            _remove_tree(final)
        os.replace(temporary, final)  # atomic: the checkpoint appears complete or not at all
        if total_limit is not None:
            for _, old in _complete_checkpoints(output_dir)[:-total_limit]:
                _remove_tree(old)
    accelerator.wait_for_everyone()
    return final


def _load_checkpoint(accelerator, path: str, *, scheduler, ema) -> tuple[int, dict]:
    """Restore a checkpoint written by `_save_checkpoint`; returns the step and this process's data position."""
    accelerator.load_state(path)
    with open(os.path.join(path, TRAINER_STATE_FILE)) as handle:
        state = json.load(handle)
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None:
        if "ema_num_updates" not in state:
            raise ValueError(f"The checkpoint {path!r} holds no EMA weights, but `ema_decay` is set.")
        ema.model.load_state_dict(load_file(os.path.join(path, EMA_WEIGHTS_FILE), device=str(accelerator.device)))
        ema.num_updates = state["ema_num_updates"]
    process_file = os.path.join(path, f"process_{accelerator.process_index}.json")
    data_state = {}
    if os.path.isfile(process_file):
        with open(process_file) as handle:
            process_state = json.load(handle)
        _set_rng_state(process_state["rng"])
        data_state = process_state["data"]
    return int(state["step"]), data_state


def _resolve_resume(resume: str | None, output_dir: str) -> str | None:
    if resume is None:
        return None
    if resume == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            logger.info(
                "--resume_from_checkpoint latest: no complete checkpoint in %s yet, starting afresh.", output_dir
            )
        return path
    if not os.path.isfile(os.path.join(resume, TRAINER_STATE_FILE)):
        raise ValueError(
            f"`resume_from_checkpoint` must be 'latest' or a complete checkpoint folder (got {resume!r}, which holds "
            f"no {TRAINER_STATE_FILE})."
        )
    return resume


def _prepare_output_dir(args: VQRAETrainingArguments, resuming: bool) -> None:
    """Main process: refuse to mix runs in one folder; remove leftovers of interrupted saves."""
    output = Path(args.output_dir)
    existing = [name for name in _RUN_OUTPUTS if (output / name).exists()] if output.is_dir() else []
    if existing and not resuming:
        if not args.overwrite_output_dir:
            raise ValueError(
                f"`output_dir` {args.output_dir!r} already holds a run ({existing}). Pass --resume_from_checkpoint "
                "latest to continue it, --overwrite_output_dir to start afresh, or another --output_dir."
            )
        for name in existing:
            path = output / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    output.mkdir(parents=True, exist_ok=True)
    root = output / CHECKPOINTS_DIR
    if root.is_dir():
        for leftover in root.iterdir():
            if leftover.name.startswith((".incomplete-", ".deleting-")):
                shutil.rmtree(leftover, ignore_errors=True)


def _truncate_metrics(path: str, step: int) -> None:
    """Drop log lines written after the checkpoint a run resumes from (they will be written again)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as handle:
        lines = [line for line in handle if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(kept)


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------


def _optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_vector = parameter.ndim <= 1 or name.endswith(("position_embedding", "position_embedding.weight"))
        (no_decay if is_vector else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _tracker_config(options: dict) -> dict:
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in options.items()}


def _write_yaml(path: str, options: dict) -> None:
    import yaml

    header = (
        "# Every option of this run, resolved. `vqrae-train --config training_config.yaml --output_dir NEW_DIR`\n"
        "# trains it again (same seed, same data, same weights on CPU float32).\n"
    )
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(header)
        yaml.safe_dump(options, handle, sort_keys=False)


def _datasets(data_args: DataArguments):
    common = {
        "dataset_name": data_args.dataset_name,
        "dataset_config_name": data_args.dataset_config_name,
        "train_dir": data_args.train_dir,
        "validation_dir": data_args.validation_dir,
        "image_column": data_args.image_column,
        "cache_dir": data_args.cache_dir,
        "revision": data_args.dataset_revision,
    }
    builtin = data_args.train_dir is None and data_args.dataset_name in (None, BUILTIN_DATASET_NAME)
    train_split = "train" if builtin or data_args.train_dir else data_args.train_split
    validation_split = "validation" if builtin or data_args.train_dir else data_args.validation_split
    train = load_image_dataset(train_split, streaming=data_args.streaming, **common)
    validation = load_image_dataset(validation_split, streaming=data_args.streaming, **common)
    if data_args.train_dir is not None:
        name = data_args.validation_dir
    else:
        name = data_args.dataset_name or BUILTIN_DATASET_NAME
    return train, validation, name, validation_split


def train(model_args: ModelArguments, data_args: DataArguments, args: VQRAETrainingArguments) -> dict:
    """Train a VQRAE tokenizer and write its output folder. Returns the final evaluation (`eval_results.json`)."""
    threads = torch.get_num_threads()
    if args.torch_num_threads is not None:
        torch.set_num_threads(args.torch_num_threads)
    try:
        return _train(model_args, data_args, args)
    finally:
        torch.set_num_threads(threads)


def _train(model_args: ModelArguments, data_args: DataArguments, args: VQRAETrainingArguments) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    stage = resolve_stage(args.stage, model_args)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "runs")
        ),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    resume_path = _resolve_resume(args.resume_from_checkpoint, args.output_dir)
    if accelerator.is_main_process:
        _prepare_output_dir(args, resuming=args.resume_from_checkpoint is not None)
    accelerator.wait_for_everyone()
    options = options_to_dict(model_args, data_args, args)
    options["resume_from_checkpoint"] = None  # a resumed run is the same run

    # -- model ---------------------------------------------------------------------------------------------------
    set_seed(args.seed)
    model = build_model(model_args, cache_dir=data_args.cache_dir)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    image_processor = model.get_image_processor()
    image_size = model.config.vision_config.image_size
    teacher = None
    if stage == "stage1":
        model.freeze_encoder(True)
    elif stage == "stage2":
        teacher = copy.deepcopy(model.encoder).eval().requires_grad_(False).to(accelerator.device)
    model.to(accelerator.device)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(
        "Training %s: %s, %.2fM trainable of %.2fM parameters, %d-px images, %dx%d tokens, codebook %d.",
        stage,
        model_args.init_from
        or model_args.encoder_name_or_path
        or f"random {model_args.vision_config or 'tiny'} model",
        trainable / 1e6,
        sum(p.numel() for p in model.parameters()) / 1e6,
        image_size,
        *model.config.token_grid_size,
        model.codebook_size,
    )

    perceptual = LPIPS(args.lpips_weights).to(accelerator.device) if args.perceptual_weight > 0 else None

    # -- data ----------------------------------------------------------------------------------------------------
    (train_data, column), (validation_data, validation_column), dataset_label, validation_split = _datasets(data_args)
    validation = load_validation_images(
        validation_data,
        validation_column,
        image_size,
        dataset_name=dataset_label,
        dataset_split=validation_split,
        max_samples=data_args.max_eval_samples,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
        resample=int(image_processor.resample),
    )
    stream_kwargs = {
        "batch_size": args.per_device_train_batch_size,
        "seed": args.seed,
        "image_size": image_size,
        "process_index": accelerator.process_index,
        "num_processes": accelerator.num_processes,
        "crop_scale": (data_args.min_crop_scale, 1.0),
        "random_flip": data_args.random_flip,
    }
    if data_args.streaming:
        batches = StreamingTrainingBatches(
            train_data, column, image_processor, shuffle_buffer_size=data_args.shuffle_buffer_size, **stream_kwargs
        )
    else:
        batches = TrainingBatches(train_data, column, image_processor, **stream_kwargs)

    # -- optimisation ----------------------------------------------------------------------------------------------
    optimizer = torch.optim.AdamW(
        _optimizer_groups(model, args.weight_decay),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=args.max_steps
    )
    discriminator = discriminator_optimizer = None
    if args.gan_weight > 0:
        discriminator = VQRAEPatchDiscriminator(args.discriminator_channels, args.discriminator_layers)
        discriminator_optimizer = torch.optim.AdamW(
            discriminator.parameters(),
            lr=args.discriminator_learning_rate or args.learning_rate,
            betas=(0.5, 0.9),
            weight_decay=0.0,
        )
        model, optimizer, discriminator, discriminator_optimizer = accelerator.prepare(
            model, optimizer, discriminator, discriminator_optimizer
        )
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    ema = ExponentialMovingAverage(unwrapped, args.ema_decay) if args.ema_decay is not None else None
    # The scheduler is stepped once per optimiser step whatever the number of processes, so it is not prepared;
    # it is checkpointed with the EMA by `_save_checkpoint`.
    global_step = 0

    metrics_path = os.path.join(args.output_dir, METRICS_FILE)
    if resume_path is not None:
        global_step, data_state = _load_checkpoint(accelerator, resume_path, scheduler=scheduler, ema=ema)
        if data_args.streaming and data_state.get("examples_read") is not None:
            batches.start_example = data_state["examples_read"]
        logger.info("Resumed from %s at step %d.", resume_path, global_step)
    if accelerator.is_main_process:
        _truncate_metrics(metrics_path, global_step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_yaml(os.path.join(args.output_dir, TRAINING_CONFIG_FILE), options)
    if args.report_to != "none":
        accelerator.init_trackers("vqrae", config=_tracker_config(options))

    accumulation = args.gradient_accumulation_steps
    start_step = global_step
    if data_args.streaming:
        loader = torch.utils.data.DataLoader(batches, batch_size=None)
    else:
        sampler = range(start_step * accumulation, args.max_steps * accumulation)
        loader = torch.utils.data.DataLoader(
            batches, batch_size=None, sampler=sampler, num_workers=data_args.dataloader_num_workers
        )
    batch_iterator = iter(loader)
    last_layer = unwrapped.decoder.out_proj.weight
    processor_mean = torch.tensor(image_processor.image_mean, device=accelerator.device).view(1, -1, 1, 1)
    processor_std = torch.tensor(image_processor.image_std, device=accelerator.device).view(1, -1, 1, 1)

    def to_unit(pixels: torch.Tensor) -> torch.Tensor:
        return pixels.float() * processor_std + processor_mean

    def write_record(record: dict) -> None:
        if accelerator.is_main_process:
            with open(metrics_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def evaluate(step: int):
        result = evaluate_model(
            ema.model if ema is not None else model,
            validation,
            image_processor=image_processor,
            batch_size=args.per_device_eval_batch_size,
            step=step,
            accelerator=accelerator,
            num_examples=args.num_reconstructions,
            inception_weights=args.inception_weights,
        )
        write_record({"type": "eval", **result.metrics})
        accelerator.log({f"eval/{k}": v for k, v in result.metrics.items() if isinstance(v, (int, float))}, step=step)
        return result

    def save(step: int) -> None:
        data_state = {"examples_read": getattr(batches, "examples_read", None), "step": step}
        _save_checkpoint(
            accelerator,
            args.output_dir,
            step,
            scheduler=scheduler,
            ema=ema,
            data_state=data_state,
            total_limit=args.save_total_limit,
        )

    progress = tqdm(
        total=args.max_steps,
        initial=start_step,
        desc=f"vqrae {stage}",
        disable=not accelerator.is_main_process or args.disable_tqdm,
        dynamic_ncols=True,
    )
    sums: dict[str, float] = {}
    unreadable_by_worker: dict[int, int] = {}
    window_start, window_steps = time.perf_counter(), 0
    last_saved = start_step if resume_path is not None else None
    for step in range(start_step, args.max_steps):
        gan_active = discriminator is not None and step >= args.gan_start_step
        for micro in range(accumulation):
            batch = next(batch_iterator)
            unreadable_by_worker[int(batch["worker"])] = int(batch["num_unreadable"])
            pixel_values = batch["pixel_values"].to(accelerator.device)
            sync_context = contextlib.ExitStack()
            if micro < accumulation - 1:
                sync_context.enter_context(accelerator.no_sync(model))
                if gan_active:
                    sync_context.enter_context(accelerator.no_sync(discriminator))
            with sync_context:
                with accelerator.autocast():
                    output = model(pixel_values)
                    target = to_unit(pixel_values)
                    reconstruction = to_unit(output.reconstruction)
                    terms = reconstruction_losses(
                        reconstruction,
                        target,
                        l1_weight=args.l1_weight,
                        mse_weight=args.mse_weight,
                        ssim_weight=args.ssim_weight,
                        perceptual_weight=args.perceptual_weight,
                        perceptual=perceptual,
                    )
                    loss = terms["reconstruction"] + args.quantizer_loss_weight * output.quantizer_loss.float()
                    terms["quantizer"] = output.quantizer_loss.float()
                    if teacher is not None:
                        with torch.no_grad():
                            teacher_features = teacher(pixel_values=pixel_values).last_hidden_state
                        terms["distillation"] = F.mse_loss(output.last_hidden_state.float(), teacher_features.float())
                        loss = loss + args.distillation_weight * terms["distillation"]
                    if gan_active:
                        critic = accelerator.unwrap_model(discriminator).requires_grad_(False)
                        terms["generator"] = generator_hinge_loss(critic(reconstruction))
                        critic.requires_grad_(True)
                        weight = adaptive_gan_weight(terms["reconstruction"], terms["generator"], last_layer)
                        terms["gan_weight"] = weight * args.gan_weight
                        loss = loss + terms["gan_weight"] * terms["generator"]
                    terms["loss"] = loss
                accelerator.backward(loss / accumulation)
                if gan_active:
                    with accelerator.autocast():
                        real_logits = discriminator(target)
                        fake_logits = discriminator(reconstruction.detach())
                        terms["discriminator"] = discriminator_hinge_loss(real_logits, fake_logits)
                    accelerator.backward(terms["discriminator"] / accumulation)
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) / accumulation
        grad_norm = None
        if args.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if gan_active:
            discriminator_optimizer.step()
            discriminator_optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(unwrapped)
        global_step = step + 1
        window_steps += 1
        progress.update(1)

        if global_step % args.logging_steps == 0 or global_step == args.max_steps:
            means = {name: total / window_steps for name, total in sums.items()}
            reduced = accelerator.reduce(torch.tensor(list(means.values()), device=accelerator.device), "mean")
            means = dict(zip(means, reduced.tolist()))
            elapsed = time.perf_counter() - window_start
            record = {
                "type": "train",
                "step": global_step,
                **means,
                "learning_rate": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "steps_per_second": window_steps / elapsed,
                "images_per_second": window_steps
                * accumulation
                * args.per_device_train_batch_size
                * accelerator.num_processes
                / elapsed,
            }
            write_record(record)
            accelerator.log({f"train/{k}": v for k, v in record.items() if isinstance(v, float)}, step=global_step)
            progress.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{record['learning_rate']:.2e}")
            sums, window_start, window_steps = {}, time.perf_counter(), 0

        if global_step % args.eval_steps == 0 and global_step < args.max_steps:
            metrics = evaluate(global_step).metrics
            progress.write(
                f"step {global_step}: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f} "
                f"(bicubic {metrics['bicubic_psnr']:.2f} dB, {metrics['bicubic_ssim']:.3f}), "
                f"codebook use {metrics['codebook_utilization']:.1%}"
            )
        if global_step % args.save_steps == 0 or global_step == args.max_steps:
            save(global_step)
            last_saved = global_step
    progress.close()
    if last_saved != global_step:  # resumed from the final checkpoint, or max_steps lowered: keep one at the end
        save(global_step)

    unreadable_train = sum(unreadable_by_worker.values())
    counts = torch.tensor([unreadable_train, validation.num_unreadable], device=accelerator.device)
    unreadable_train, unreadable_validation = accelerator.reduce(counts, "sum").tolist()
    write_record(
        {
            "type": "data",
            "step": global_step,
            "unreadable_train": unreadable_train,
            "unreadable_validation": unreadable_validation,
        }  # fmt: skip
    )
    if unreadable_train or unreadable_validation:
        logger.warning(
            "Skipped unreadable images: %d while training (each replaced by the next image), %d in validation.",
            unreadable_train,
            unreadable_validation,
        )
    result = evaluate(global_step)
    if accelerator.is_main_process:
        _write_outputs(args, ema.model if ema is not None else unwrapped, result, metrics_path)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result.metrics


def _write_outputs(args: VQRAETrainingArguments, model, result, metrics_path: str) -> None:
    from . import plots
    from .hub import push_to_hub
    from .model_card import write_model_card

    output_dir = args.output_dir
    model.save_pretrained(output_dir)
    plots.plot_reconstructions(
        os.path.join(output_dir, "reconstructions.png"),
        result.originals,
        result.reconstructions,
        result.bicubic,
        result.metrics,
    )
    plots.plot_training_curves(os.path.join(output_dir, "training_curves.png"), metrics_path)
    plots.plot_codebook_usage(os.path.join(output_dir, "codebook_usage.png"), result.code_counts, result.metrics)
    save_eval_results(result.metrics, os.path.join(output_dir, "eval_results.json"))
    write_model_card(output_dir, repo_id=args.hub_model_id)
    metrics = result.metrics
    logger.info(
        "Final evaluation on %d %s images: PSNR %.2f dB, SSIM %.3f (bicubic baseline %.2f dB, %.3f, with %d bits "
        "against %.0f); codebook utilisation %.1f%%, perplexity %.1f. Saved to %s.",
        metrics["num_images"],
        metrics["dataset_name"],
        metrics["psnr"],
        metrics["ssim"],
        metrics["bicubic_psnr"],
        metrics["bicubic_ssim"],
        metrics["bicubic_bits_per_image"],
        metrics["bits_per_image"],
        100 * metrics["codebook_utilization"],
        metrics["perplexity"],
        output_dir,
    )
    if args.push_to_hub:
        push_to_hub(output_dir, repo_id=args.hub_model_id, private=args.hub_private_repo, revision=args.hub_revision)
