"""The accelerate training loop of a VQRAE tokenizer, as a recipe.

`train(model_args, data_args, training_args)`:

1. builds the model (`build_model`: a pretrained SigLIP encoder, a VQRAE folder, or a randomly initialised encoder)
   and picks the stage (`resolve_stage`);
2. loads the data (`load_training_data`): the training stream and the validation images, holding out a share of the
   training examples when the data has no validation split or folder;
3. builds the loss (`losses.VQRAELoss`) and the training state (`build_training_state`: optimiser, schedule, EMA,
   stage-2 teacher, GAN critic), and resumes it from a checkpoint when asked (`checkpointing`);
4. runs `train_step` until `max_steps`, logging, evaluating and checkpointing on the way;
5. evaluates once more and writes the output folder: the model (`save_pretrained`), `eval_results.json`,
   `metrics.jsonl`, the pictures, `training_config.yaml` and the model card.

Stages (VQRAE paper): stage 1 freezes the encoder (no gradients, eval mode, run without a graph) and trains the
quantizer, `post_quant_conv` and decoder; stage 2 trains the encoder too, with self-distillation towards a frozen copy
of the starting encoder (never saved). A randomly initialised encoder is trained jointly from the first step.

The data stream is a function of the step (`data.TrainingBatches`), so a run killed at any moment and resumed from
its last checkpoint ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic_io import atomic_write
from ..cli_utils import UsageError, is_main_process
from ..image_data import (
    BUILTIN_DATASET_NAME,
    BUILTIN_DATASET_NAMES,
    MissingSplitError,
    ValidationImages,
    dataset_identity,
    example_identities,
    hold_out,
    load_image_dataset,
    load_validation_images,
)
from .args import (
    DataArguments,
    ModelArguments,
    VQRAETrainingArguments,
    options_to_dict,
    read_training_config,
    write_training_config,
)
from .checkpointing import (
    TRAINER_STATE_FILE,
    check_resume,
    latest_checkpoint,
    load_checkpoint,
    prepare_output_dir,
    read_checkpoint_record,
    resolve_resume,
    resume_command,
    save_checkpoint,
    truncate_metrics,
)
from .data import StreamingTrainingBatches, TrainingBatches
from .losses import VQRAELoss, VQRAEPatchDiscriminator
from .metrics import evaluate_model, write_evaluation
from .run_files import (
    HELD_OUT_FILE,
    METRICS_FILE,
    RUN_OUTPUTS,
    TRACKER_DIR,
    TRAINING_CONFIG_FILE,
    TRAINING_CURVES_FILE,
)
from .state import ExponentialMovingAverage, TrainingState

logger = logging.getLogger(__name__)

__all__ = ["build_model", "load_training_data", "resolve_stage", "train", "train_step"]

# Warm-up, as a share of max_steps, when the asked warm-up would last the whole run.
SHORT_RUN_WARMUP_SHARE = 0.1


# ---------------------------------------------------------------------------------------------------------------
# Model, stage and schedule
# ---------------------------------------------------------------------------------------------------------------


def build_model(model_args: ModelArguments, cache_dir: str | None = None):
    """The model to train, in float32: from `init_from`, around a pretrained `encoder_name_or_path`, or randomly
    initialised from a named vision config. Call after seeding: the random parts are initialised here. A model or
    encoder that cannot be found, or options that make no valid model, raise `UsageError`."""
    from ..configuration_vqrae import VQRAEConfig
    from ..modeling_vqrae import VQRAEModel

    try:
        if model_args.init_from is not None:
            _check_init_from_folder(model_args.init_from)
            model = VQRAEModel.from_pretrained(model_args.init_from, dtype=torch.float32, cache_dir=cache_dir)
            _check_init_from_agrees(model, model_args)
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
    except UsageError:
        raise
    except (ValueError, TypeError, OSError) as error:  # the config's and from_pretrained's own checks
        raise UsageError(str(error)) from error


def _check_init_from_folder(init_from: str) -> None:
    """Refuse, naming what to pass, a run folder without a model yet (an interrupted run: its checkpoints hold the
    weights) and a checkpoint written before checkpoints carried their model's `config.json`."""
    folder = Path(init_from)
    if not folder.is_dir() or (folder / "config.json").is_file():
        return
    if (folder / TRAINER_STATE_FILE).is_file():
        raise UsageError(
            f"`init_from` {init_from!r} is a checkpoint written before checkpoints carried their model's config.json, "
            "so its model cannot be rebuilt; resume its run with --resume_from_checkpoint instead."
        )
    latest = latest_checkpoint(init_from)
    if latest is not None:
        raise UsageError(
            f"`init_from` {init_from!r} holds no model yet (its run did not finish); start from its latest "
            f"checkpoint with --init_from {latest}, or finish the run with --resume_from_checkpoint latest."
        )


def _check_init_from_agrees(model, model_args: ModelArguments) -> None:
    requested = model_args.config_kwargs(default_quantizer=None)
    conflicts = {name: (value, getattr(model.config, name)) for name, value in requested.items()}
    conflicts = {name: pair for name, pair in conflicts.items() if pair[0] != pair[1]}
    if conflicts:
        details = ", ".join(
            f"`{name}`: asked {asked!r}, model has {has!r}" for name, (asked, has) in conflicts.items()
        )
        raise UsageError(f"Options contradict the model of `init_from` {model_args.init_from!r} ({details}).")


def resolve_stage(stage: int | None, model_args: ModelArguments) -> str:
    """`"stage1"`, `"stage2"` or `"joint"` (a randomly initialised encoder, trained with the rest)."""
    pretrained = model_args.encoder_name_or_path is not None or model_args.init_from is not None
    if stage == 2 and not pretrained:
        raise UsageError(
            "Stage 2 fine-tunes a trained encoder with self-distillation towards its starting copy, so it needs a "
            "start model: pass --init_from (e.g. the output folder of stage 1) or --encoder_name_or_path."
        )
    if stage is None:
        return "stage1" if pretrained else "joint"
    if stage == 1 and not pretrained:
        logger.warning("Stage 1 with a randomly initialised encoder: the encoder stays frozen at its random weights.")
    return f"stage{stage}"


def resolve_warmup(args: VQRAETrainingArguments) -> VQRAETrainingArguments:
    """`args` with a warm-up that ends before the run does: a warm-up of `max_steps` or more would never reach the
    peak learning rate, so it is scaled down to `SHORT_RUN_WARMUP_SHARE` of `max_steps` (and said so)."""
    if args.warmup_steps < args.max_steps:
        return args
    warmup = int(args.max_steps * SHORT_RUN_WARMUP_SHARE)
    logger.warning(
        "--warmup_steps %d is not below --max_steps %d, so the learning rate would never leave warm-up; warming up "
        "for %d steps instead (%d%% of max_steps). Pass a --warmup_steps below --max_steps to choose.",
        args.warmup_steps,
        args.max_steps,
        warmup,
        round(100 * SHORT_RUN_WARMUP_SHARE),
    )
    return dataclasses.replace(args, warmup_steps=warmup)


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """The training stream of this process, its validation share, and the identity of the training data."""

    batches: TrainingBatches | StreamingTrainingBatches
    validation: ValidationImages
    identity: dict


def _load_splits(data_args: DataArguments):
    """`(train, column), (validation, column), dataset name, validation split, held-out info or None)`."""
    common = {
        **data_args.source_kwargs(),
        "train_dir": data_args.train_dir,
        "validation_dir": data_args.validation_dir,
        "cache_dir": data_args.cache_dir,
    }
    builtin = data_args.train_dir is None and data_args.dataset_name in (None, *BUILTIN_DATASET_NAMES)
    train_split = "train" if builtin or data_args.train_dir else data_args.train_split
    train, column = load_image_dataset(train_split, **common)
    name = data_args.train_dir or data_args.dataset_name or BUILTIN_DATASET_NAME
    if data_args.train_dir is not None and data_args.validation_dir is None:
        missing = f"`train_dir` {data_args.train_dir!r} comes with no --validation_dir"
    else:
        validation_split = "validation" if builtin or data_args.train_dir else data_args.validation_split
        try:
            validation = load_image_dataset(validation_split, **common)
            label = data_args.validation_dir or name
            return (train, column), validation, label, validation_split, None
        except MissingSplitError:
            missing = f"{name!r} has no {validation_split!r} split"
    if not data_args.validation_split_percentage:
        raise UsageError(
            f"{missing}, and --validation_split_percentage is 0: pass a validation split or folder, or a share of "
            "the training images to hold out (e.g. --validation_split_percentage 5)."
        )
    train, held, info = hold_out(train, data_args.validation_split_percentage, column, root=_source_folder(data_args))
    logger.info(
        "%s: holding out %s%% of the %s training images for validation (%s), each chosen by a hash of its name; "
        "their names are in %s.",
        missing,
        f"{info['percentage']:g}",
        info["of"] if info["of"] is not None else "streamed",
        f"{info['num_examples']} image(s)" if info["num_examples"] is not None else "about that share",
        HELD_OUT_FILE,
    )
    return (train, column), (held, column), name, train_split, info


def _source_folder(data_args: DataArguments) -> str | None:
    """The local folder the training images come from (held-out names are relative to it), or None."""
    if data_args.train_dir is not None:
        return data_args.train_dir
    name = data_args.dataset_name
    return name if name is not None and os.path.isdir(name) else None


def _write_held_out_ids(data_args: DataArguments, held, column: str, output_dir: str) -> None:
    """Write the names (`example_identity`) of the held-out examples into `HELD_OUT_FILE`, one a line, so a user can
    check them: all of them for a map-style dataset, the first --max_eval_samples (those evaluated) for a stream."""
    limit = data_args.max_eval_samples if data_args.streaming else None
    ids = example_identities(held, column, _source_folder(data_args), limit)
    atomic_write(os.path.join(output_dir, HELD_OUT_FILE), "".join(f"{identity}\n" for identity in ids))


def load_training_data(
    data_args: DataArguments, args: VQRAETrainingArguments, image_processor, image_size: int, accelerator
) -> TrainingData:
    """The training batches of this process and its share of the validation images (read before training starts,
    so a validation set that cannot be read fails now, not after training)."""
    (train, column), (validation_data, validation_column), name, split, held_out = _load_splits(data_args)
    if data_args.max_train_samples is not None:
        train = (
            train.take(data_args.max_train_samples)
            if data_args.streaming
            else train.select(range(min(data_args.max_train_samples, len(train))))
        )
    validation = load_validation_images(
        validation_data,
        validation_column,
        image_size,
        dataset_name=name,
        dataset_split=split,
        max_samples=data_args.max_eval_samples,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
        resample=int(image_processor.resample),
        held_out=held_out,
    )
    if held_out is not None and accelerator.is_main_process:
        _write_held_out_ids(data_args, validation_data, validation_column, args.output_dir)
    readable = accelerator.reduce(torch.tensor(len(validation.images), device=accelerator.device), "sum")
    if int(readable) == 0:
        raise UsageError(
            f"None of the validation images of {name!r} (split {split!r}) can be read ({validation.num_unreadable} "
            "unreadable on this process); fix them or choose other validation data before training."
        )
    stream = {
        "batch_size": args.per_device_train_batch_size,
        "seed": args.seed,
        "image_size": image_size,
        "process_index": accelerator.process_index,
        "num_processes": accelerator.num_processes,
        "crop_scale": (data_args.min_crop_scale, 1.0),
        "random_flip": data_args.random_flip,
        "color_augment": data_args.color_augment,
    }
    if data_args.streaming:
        shuffle = data_args.shuffle_buffer_size
        batches = StreamingTrainingBatches(train, column, image_processor, shuffle_buffer_size=shuffle, **stream)
    else:
        batches = TrainingBatches(train, column, image_processor, **stream)
    identity = dataset_identity(
        train,
        source=name,
        config=data_args.dataset_config_name,
        revision=data_args.dataset_revision,
        split=split,
        held_out_percentage=held_out and held_out["percentage"],
        max_train_samples=data_args.max_train_samples,
    )
    return TrainingData(batches=batches, validation=validation, identity=identity)


def _batch_iterator(data: TrainingData, args: VQRAETrainingArguments, num_workers: int, start_step: int):
    """Micro-batches from `start_step` on: map-style data by micro-batch number (a sampler over the steps left),
    a stream from its saved position."""
    if isinstance(data.batches, StreamingTrainingBatches):
        return iter(torch.utils.data.DataLoader(data.batches, batch_size=None))
    accumulation = args.gradient_accumulation_steps
    sampler = range(start_step * accumulation, args.max_steps * accumulation)
    loader = torch.utils.data.DataLoader(data.batches, batch_size=None, sampler=sampler, num_workers=num_workers)
    return iter(loader)


# ---------------------------------------------------------------------------------------------------------------
# The training state and one step
# ---------------------------------------------------------------------------------------------------------------


# Parameters that weight decay would pull towards zero for no gain: the position embeddings and a VQ codebook (decay
# shrinks the codes no batch chooses, which then fall further out of reach: a cause of codebook collapse).
NO_DECAY_SUFFIXES = (
    "position_embedding",
    "position_embedding.weight",
    "quantizer.embedding.weight",
    "quantizer.codebook_transform.weight",
)


def _optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_vector = parameter.ndim <= 1 or name.endswith(NO_DECAY_SUFFIXES)
        (no_decay if is_vector else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_training_state(model, args: VQRAETrainingArguments, accelerator, stage: str) -> TrainingState:
    """Freeze or copy the encoder for the stage, build the optimiser, schedule, GAN critic and EMA, and prepare
    them with accelerate."""
    from transformers import get_scheduler

    teacher = None
    if stage == "stage1":
        model.freeze_encoder(True)
    elif stage == "stage2":
        teacher = copy.deepcopy(model.encoder).eval().requires_grad_(False).to(accelerator.device)
    model.to(accelerator.device)
    model.train()
    optimizer = torch.optim.AdamW(
        _optimizer_groups(model, args.weight_decay),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )
    # Stepped once per optimiser step whatever the number of processes, so not prepared; checkpointed by us.
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
    return TrainingState(
        accelerator=accelerator,
        model=model,
        unwrapped=unwrapped,
        optimizer=optimizer,
        scheduler=scheduler,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm,
        teacher=teacher,
        discriminator=discriminator,
        discriminator_optimizer=discriminator_optimizer,
        ema=ExponentialMovingAverage(unwrapped, args.ema_decay) if args.ema_decay is not None else None,
        window_codes=torch.zeros(unwrapped.codebook_size, dtype=torch.bool, device=accelerator.device),
    )


def train_step(state: TrainingState, loss_fn: VQRAELoss, batches) -> dict[str, float]:
    """One optimiser step over `gradient_accumulation_steps` micro-batches from `batches`; returns the mean of each
    loss term over them (and `grad_norm`)."""
    accelerator, accumulation = state.accelerator, state.gradient_accumulation_steps
    gan_active = state.discriminator is not None and loss_fn.uses_gan(state.step)
    critic = accelerator.unwrap_model(state.discriminator) if gan_active else None
    means: dict[str, float] = {}
    for micro in range(accumulation):
        batch = next(batches)
        state.unreadable.update(batch["unreadable"])
        pixel_values = batch["pixel_values"].to(accelerator.device)
        with contextlib.ExitStack() as no_sync:
            if micro < accumulation - 1:  # gradients are reduced across processes once, on the last micro-batch
                no_sync.enter_context(accelerator.no_sync(state.model))
                if gan_active:
                    no_sync.enter_context(accelerator.no_sync(state.discriminator))
            with accelerator.autocast():
                output = state.model(pixel_values)
                teacher_features = None
                if state.teacher is not None:
                    with torch.no_grad():
                        teacher_features = state.teacher(pixel_values=pixel_values).last_hidden_state
            state.window_codes[output.indices.flatten()] = True
            loss, terms = loss_fn.generator_loss(
                output,
                pixel_values,
                step=state.step,
                last_layer=state.unwrapped.get_last_layer(),
                teacher_features=teacher_features,
                discriminator=critic,
            )
            accelerator.backward(loss / accumulation)
            if gan_active:
                terms["discriminator"] = loss_fn.discriminator_loss(
                    pixel_values, output.reconstruction, state.discriminator
                )
                accelerator.backward(terms["discriminator"] / accumulation)
        for name, value in terms.items():
            means[name] = means.get(name, 0.0) + float(value.detach()) / accumulation
    if state.max_grad_norm > 0:
        means["grad_norm"] = float(accelerator.clip_grad_norm_(state.model.parameters(), state.max_grad_norm))
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    if gan_active:
        state.discriminator_optimizer.step()
        state.discriminator_optimizer.zero_grad(set_to_none=True)
    if state.ema is not None:
        state.ema.update(state.unwrapped)
    state.step += 1
    return means


class MetricsLog:
    """Averages the step terms over a logging window and appends records to `metrics.jsonl` (main process) and
    the trackers."""

    def __init__(self, path: str, accelerator, images_per_step: int):
        self.path, self.accelerator, self.images_per_step = path, accelerator, images_per_step
        self._start()

    def _start(self) -> None:
        self.sums, self.steps, self.started = {}, 0, time.perf_counter()

    def add(self, terms: dict[str, float]) -> None:
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.steps += 1

    def write(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        prefix = "eval" if record["type"] == "eval" else "train"
        numbers = {f"{prefix}/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        self.accelerator.log(numbers, step=record["step"])

    def flush(self, step: int, learning_rate: float, window_codes: torch.Tensor) -> dict:
        """Write the window's means as a `train` record (averaged over processes), with the share of the codebook
        the window's batches used (over all processes), and start a new window (clearing `window_codes`)."""
        names = list(self.sums)
        means = torch.tensor([self.sums[name] / self.steps for name in names], device=self.accelerator.device)
        means = dict(zip(names, self.accelerator.reduce(means, "mean").tolist()))
        used = int((self.accelerator.reduce(window_codes.int(), "sum") > 0).sum())
        window_codes.zero_()
        elapsed = time.perf_counter() - self.started
        record = {"type": "train", "step": step, **means, "learning_rate": learning_rate}
        record["codebook_usage"] = used / len(window_codes)
        record["grad_norm"] = record.get("grad_norm")
        record["steps_per_second"] = self.steps / elapsed
        record["images_per_second"] = self.steps * self.images_per_step / elapsed
        self.write(record)
        self._start()
        return record


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    args: VQRAETrainingArguments,
    command: Sequence[str] | None = None,
) -> dict:
    """Train a VQRAE tokenizer and write its output folder. Returns the final evaluation (`eval_results.json`).

    `command` is the command line that started the run (program and arguments, as `sys.argv`): Ctrl-C and a resume
    refused for its number of processes print the command that resumes the run, launched the same way."""
    threads = torch.get_num_threads()
    if args.torch_num_threads is not None:
        torch.set_num_threads(args.torch_num_threads)
    try:
        return _run(model_args, data_args, args, None if command is None else resume_command(command, os.environ))
    finally:
        torch.set_num_threads(threads)


def _accelerator(args: VQRAETrainingArguments):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    return Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, TRACKER_DIR)
        ),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )


def _run(model_args: ModelArguments, data_args: DataArguments, args: VQRAETrainingArguments, resume: str | None):
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    stage = resolve_stage(args.stage, model_args)
    accelerator = _accelerator(args)
    resume_path = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    if accelerator.is_main_process:
        resuming = args.resume_from_checkpoint is not None
        prepare_output_dir(args.output_dir, RUN_OUTPUTS, overwrite=args.overwrite_output_dir, resuming=resuming)
    accelerator.wait_for_everyone()
    # The options as given (a resume compares these), never values derived from them such as a shortened warm-up.
    options = {**options_to_dict(model_args, data_args, args), "resume_from_checkpoint": None}

    set_seed(args.seed)
    model = build_model(model_args, cache_dir=data_args.cache_dir)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    image_processor, image_size = model.get_image_processor(), model.config.vision_config.image_size
    loss_fn = _build_loss(args, image_processor, stage).to(accelerator.device)
    data = load_training_data(data_args, args, image_processor, image_size, accelerator)
    record = {
        "num_processes": accelerator.num_processes,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "dataset": data.identity,
        "options": options,
    }
    saved = read_checkpoint_record(resume_path) if resume_path is not None else None
    if saved is not None:
        check_resume(saved, record, resume_path)
    args = _run_schedule(args, saved)
    record.update(warmup_steps_used=args.warmup_steps, resume_command=resume)
    state = build_training_state(model, args, accelerator, stage)
    _log_start(state, stage, model_args, image_size)
    metrics_path = os.path.join(args.output_dir, METRICS_FILE)
    if resume_path is not None:
        state.step, data_state = load_checkpoint(accelerator, resume_path, scheduler=state.scheduler, ema=state.ema)
        if data_args.streaming and data_state.get("examples_read") is not None:
            data.batches.start_example = data_state["examples_read"]
        logger.info("Resumed from %s at step %d.", resume_path, state.step)
    if accelerator.is_main_process:
        truncate_metrics(metrics_path, state.step)
        _write_run_config(os.path.join(args.output_dir, TRAINING_CONFIG_FILE), options, args, saved, state.step)
    if args.report_to != "none":
        accelerator.init_trackers("vqrae", config=_tracker_config(options))

    batches = _batch_iterator(data, args, data_args.dataloader_num_workers, state.step)
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    log = MetricsLog(metrics_path, accelerator, per_step)
    show = not accelerator.is_main_process or args.disable_tqdm
    progress = tqdm(total=args.max_steps, initial=state.step, desc=f"vqrae {stage}", disable=show, dynamic_ncols=True)
    last_saved = state.step if resume_path is not None else None
    try:
        while state.step < args.max_steps:
            log.add(train_step(state, loss_fn, batches))
            step = state.step
            progress.update(1)
            if step % args.logging_steps == 0 or step == args.max_steps:
                means = log.flush(step, state.scheduler.get_last_lr()[0], state.window_codes)
                progress.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{means['learning_rate']:.2e}")
            if step % args.eval_steps == 0 and step < args.max_steps:
                progress.write(_summary(_evaluate(state, data.validation, args, log).metrics, step))
            if step % args.save_steps == 0 or step == args.max_steps:
                _save(state, args, data, record)
                last_saved = step
    except KeyboardInterrupt:
        _report_interrupt(args, state.step, resume)
        raise
    progress.close()
    if last_saved != state.step:  # resumed from the final checkpoint: keep one at the end
        _save(state, args, data, record)
    return _finish(state, data, args, log)


def _run_schedule(args: VQRAETrainingArguments, saved: dict | None) -> VQRAETrainingArguments:
    """`args` with the warm-up the run trains with. A new run: from --warmup_steps and --max_steps
    (`resolve_warmup`). A resume keeps the warm-up of its checkpoint, also when a larger --max_steps extends the
    run: the schedule is then rebuilt for the new max_steps with that warm-up (`load_checkpoint` takes the
    learning rate of the resumed step from it), so the decay stretches to the new end."""
    if saved is None or "options" not in saved:
        return resolve_warmup(args)
    # Checkpoints written before `warmup_steps_used` recorded the warm-up used as the option itself.
    return dataclasses.replace(args, warmup_steps=saved.get("warmup_steps_used", saved["options"]["warmup_steps"]))


def _write_run_config(path: str, options: dict, args: VQRAETrainingArguments, saved: dict | None, step: int) -> None:
    """`training_config.yaml`: a new run's options, with a note when the warm-up was derived from them; a resume
    keeps the run's own record, and adds the new max_steps and a note when it extends the run."""
    if saved is None or not os.path.isfile(path):
        derived = args.warmup_steps != options["warmup_steps"]
        note = (
            f"--warmup_steps {options['warmup_steps']} is not below --max_steps {args.max_steps}: the run warms up "
            f"for {args.warmup_steps} steps, derived from --max_steps."
        )
        write_training_config(path, options, notes=[note] if derived else [])
        return
    recorded, notes = read_training_config(path)
    if recorded.get("max_steps", args.max_steps) >= args.max_steps:
        return
    notes.append(
        f"Extended on resume at step {step}: --max_steps {recorded['max_steps']} -> {args.max_steps}. The learning "
        f"rate schedule was rebuilt for {args.max_steps} steps with the run's {args.warmup_steps}-step warm-up, so "
        "a new run with this file follows that schedule from the start and does not give these weights."
    )
    write_training_config(path, {**recorded, "max_steps": args.max_steps}, notes=notes)


def _build_loss(args: VQRAETrainingArguments, image_processor, stage: str) -> VQRAELoss:
    return VQRAELoss(
        image_mean=image_processor.image_mean,
        image_std=image_processor.image_std,
        l1_weight=args.l1_weight,
        mse_weight=args.mse_weight,
        ssim_weight=args.ssim_weight,
        gradient_weight=args.gradient_weight,
        perceptual_weight=args.perceptual_weight,
        lpips_weights=args.lpips_weights,
        quantizer_weight=args.quantizer_loss_weight,
        distillation_weight=args.distillation_weight if stage == "stage2" else 0.0,
        gan_weight=args.gan_weight,
        gan_start_step=args.gan_start_step,
    )


def _log_start(state: TrainingState, stage: str, model_args: ModelArguments, image_size: int) -> None:
    model = state.unwrapped
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


def _tracker_config(options: dict) -> dict:
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in options.items()}


def _save(state: TrainingState, args: VQRAETrainingArguments, data: TrainingData, record: dict) -> None:
    save_checkpoint(
        state.accelerator,
        args.output_dir,
        state.step,
        scheduler=state.scheduler,
        ema=state.ema,
        data_state={"examples_read": getattr(data.batches, "examples_read", None), "step": state.step},
        record=record,
        total_limit=args.save_total_limit,
        model_config=state.unwrapped.config,
    )


def _evaluate(state: TrainingState, validation: ValidationImages, args: VQRAETrainingArguments, log: MetricsLog):
    result = evaluate_model(
        state.model_to_evaluate,
        validation,
        image_processor=state.unwrapped.get_image_processor(),
        batch_size=args.per_device_eval_batch_size,
        step=state.step,
        accelerator=state.accelerator,
        num_examples=args.num_reconstructions,
        inception_weights=args.inception_weights,
    )
    log.write({"type": "eval", **result.metrics})
    return result


def _summary(metrics: dict, step: int) -> str:
    return (
        f"step {step}: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f} "
        f"(bicubic {metrics['bicubic_psnr']:.2f} dB, {metrics['bicubic_ssim']:.3f}), "
        f"codebook use {metrics['codebook_utilization']:.1%}"
    )


def _report_interrupt(args: VQRAETrainingArguments, step: int, resume: str | None) -> None:
    """Ctrl-C: say where the last checkpoint is and the command that resumes from it (main process)."""
    if not is_main_process():
        return
    checkpoint = latest_checkpoint(args.output_dir)
    where = f"the last checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved yet"
    how = f"run: {resume}" if resume else "rerun with the same options and --resume_from_checkpoint latest"
    logger.warning("Interrupted at step %d; %s. To continue from it, %s", step, where, how)


def _finish(state: TrainingState, data: TrainingData, args: VQRAETrainingArguments, log: MetricsLog) -> dict:
    from accelerate.utils import gather_object

    accelerator = state.accelerator
    # Distinct images: the processes may meet the same unreadable training image; their validation shares differ.
    unreadable_train = len(set(gather_object(sorted(state.unreadable))))
    validation = torch.tensor(data.validation.num_unreadable, device=accelerator.device)
    unreadable_validation = int(accelerator.reduce(validation, "sum"))
    record = {"unreadable_train": unreadable_train, "unreadable_validation": unreadable_validation}
    log.write({"type": "data", "step": state.step, **record})
    if unreadable_train or unreadable_validation:
        logger.warning(
            "Skipped unreadable images: %d while training (each replaced by the next image), %d in validation.",
            unreadable_train,
            unreadable_validation,
        )
    result = _evaluate(state, data.validation, args, log)
    if accelerator.is_main_process:
        _write_outputs(args, state.model_to_evaluate, result, log.path)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result.metrics


def _write_outputs(args: VQRAETrainingArguments, model, result, metrics_path: str) -> None:
    from . import plots
    from .hub import push_to_hub
    from .model_card import write_model_card

    output_dir = args.output_dir
    model.save_pretrained(output_dir)
    write_evaluation(output_dir, result)
    plots.plot_training_curves(os.path.join(output_dir, TRAINING_CURVES_FILE), metrics_path)
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
