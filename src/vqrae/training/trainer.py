"""The accelerate training loop of a VQRAE tokenizer, as a recipe.

`train(model_args, data_args, training_args)`:

1. builds the model (`build_model`: a pretrained SigLIP encoder, a VQRAE folder, or a randomly initialised encoder)
   and picks the stage (`resolve_stage`);
2. loads the data (`data.load_training_data`): the training stream and the validation images, holding out a share of
   the training examples when the data has no validation split or folder;
3. builds the loss (`losses.VQRAELoss`: the loss terms, the stage-2 teacher, the GAN critic and its optimiser) and
   the training state (`state.build_training_state`: optimiser, schedule, EMA), and resumes them from a checkpoint
   when asked (`checkpointing`);
4. runs `state.train_step` until `max_steps`, logging (`metrics_log.MetricsLog`), evaluating and checkpointing on
   the way;
5. evaluates once more and writes the output folder: the model (`save_pretrained_atomic`), `eval_results.json`,
   `metrics.jsonl`, the pictures, `training_config.yaml` and the model card.

Stages (VQRAE paper): stage 1 freezes the encoder (no gradients, eval mode, run without a graph) and trains the
quantizer, `post_quant_conv` and decoder; stage 2 trains the encoder too, with self-distillation towards a frozen copy
of the starting encoder (never saved). A randomly initialised encoder is trained jointly from the first step.

The data stream is a function of the step (`data.TrainingBatches`), so a run killed at any moment and resumed from
its last checkpoint ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from ..arguments import is_main_process
from ..atomic_io import save_pretrained_atomic
from ..configuration_vqrae import VQRAEConfig
from ..errors import UsageError
from ..image_data import ValidationImages
from ..loading import load_model
from ..modeling_vqrae import VQRAEModel
from . import hub, plots
from .args import (
    STAGE_OPTIONS,
    DataArguments,
    ModelArguments,
    Stage,
    VQRAETrainingArguments,
    options_to_dict,
)
from .checkpointing import (
    check_resume,
    latest_checkpoint,
    load_checkpoint,
    prepare_output_dir,
    read_checkpoint_record,
    resolve_resume_everywhere,
    resume_command,
    save_checkpoint,
    truncate_metrics,
)
from .config_files import read_training_config, write_training_config
from .data import TrainingData, batch_iterator, load_training_data
from .losses import VQRAELoss
from .metrics import evaluate_model, write_evaluation
from .metrics_log import MetricsLog
from .model_card import write_model_card
from .run_files import (
    METRICS_FILE,
    RUN_OUTPUTS,
    TRACKER_DIR,
    TRAINING_CONFIG_FILE,
    TRAINING_CURVES_FILE,
)
from .state import TrainingState, build_training_state, train_step

logger = logging.getLogger(__name__)

__all__ = ["build_model", "resolve_stage", "train"]

# Warm-up, as a share of max_steps, when the asked warm-up would last the whole run.
SHORT_RUN_WARMUP_SHARE = 0.1


# ---------------------------------------------------------------------------------------------------------------
# Model, stage and schedule
# ---------------------------------------------------------------------------------------------------------------


def build_model(model_args: ModelArguments, cache_dir: str | None = None):
    """The model to train, in float32: from `init_from`, around a pretrained `encoder_name_or_path`, or randomly
    initialised from a named vision config. Call after seeding: the random parts are initialised here. A model or
    encoder that cannot be found, or options that make no valid model, raise `UsageError`."""
    try:
        if model_args.init_from is not None:
            _check_init_from_folder(model_args.init_from)
            model = load_model(model_args.init_from, dtype=torch.float32, cache_dir=cache_dir)
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
    weights)."""
    folder = Path(init_from)
    if not folder.is_dir() or (folder / "config.json").is_file():
        return
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


def resolve_stage(stage: int | None, model_args: ModelArguments) -> Stage:
    """The stage `--stage` asks for (`STAGE_OPTIONS`), or by default `Stage.ONE` with a pretrained encoder and
    `Stage.JOINT` with a randomly initialised one."""
    pretrained = model_args.encoder_name_or_path is not None or model_args.init_from is not None
    if stage is None:
        return Stage.ONE if pretrained else Stage.JOINT
    chosen = STAGE_OPTIONS[stage]
    if chosen is Stage.TWO and not pretrained:
        raise UsageError(
            "Stage 2 fine-tunes a trained encoder with self-distillation towards its starting copy, so it needs a "
            "start model: pass --init_from (e.g. the output folder of stage 1) or --encoder_name_or_path."
        )
    if chosen is Stage.ONE and not pretrained:
        logger.warning("Stage 1 with a randomly initialised encoder: the encoder stays frozen at its random weights.")
    return chosen


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
    resume = None if command is None else resume_command(command, os.environ)
    with _torch_threads(args.torch_num_threads):
        stage = resolve_stage(args.stage, model_args)
        accelerator = _accelerator(args)
        resume_path = resolve_resume_everywhere(accelerator, args.resume_from_checkpoint, args.output_dir)
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
        loss_fn = _build_loss(args, model, stage).to(accelerator.device)
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
        state = build_training_state(model, loss_fn, args, accelerator, stage)
        _log_start(state, stage, model_args, image_size)
        metrics_path = os.path.join(args.output_dir, METRICS_FILE)
        if resume_path is not None:
            _resume(state, data, resume_path, data_args.streaming)
        if accelerator.is_main_process:
            truncate_metrics(metrics_path, state.step)
            _write_run_config(os.path.join(args.output_dir, TRAINING_CONFIG_FILE), options, args, saved, state.step)
        if args.report_to != "none":
            accelerator.init_trackers("vqrae", config=_tracker_config(options))

        batches = batch_iterator(data, args, data_args.dataloader_num_workers, state.step)
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
        log = MetricsLog(metrics_path, accelerator, per_step, state.unwrapped.codebook_size)
        show = not accelerator.is_main_process or args.disable_tqdm
        progress = tqdm(
            total=args.max_steps, initial=state.step, desc=f"vqrae {stage.value}", disable=show, dynamic_ncols=True
        )
        last_saved = state.step if resume_path is not None else None
        try:
            while state.step < args.max_steps:
                log.add(train_step(state, loss_fn, batches))
                step = state.step
                progress.update(1)
                if step % args.logging_steps == 0 or step == args.max_steps:
                    means = log.flush(step, state.scheduler.get_last_lr()[0])
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


@contextlib.contextmanager
def _torch_threads(count: int | None):
    """torch's CPU threads set to `count` (`--torch_num_threads`; unchanged when None) for the run, then restored."""
    threads = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _refuse_unsupported_engines() -> None:
    """Refuse a DeepSpeed or FSDP1 launch (as the launcher or an accelerate config sets it) before any work.
    DeepSpeed refuses two models (tokenizer, critic) in one `Accelerator`, without a prepared dataloader or
    `accelerator.accumulate`. FSDP1's flat parameters refuse stage 1's frozen encoder beside trainable weights, and
    the EMA, evaluation and saving gather FSDP2's sharded weights only."""
    supported = "launch with DDP (--multi_gpu), FSDP2 (--use_fsdp --fsdp_version 2) or as a single process."
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise UsageError(
            "DeepSpeed is not supported (ACCELERATE_USE_DEEPSPEED=true, from `accelerate launch --use_deepspeed` or "
            f"a DeepSpeed accelerate config): {supported}"
        )
    version = os.environ.get("FSDP_VERSION", "1")  # accelerate's own default
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and version != "2":
        raise UsageError(
            f"FSDP version {version} is not supported (FSDP_VERSION={version}, from `accelerate launch --use_fsdp` "
            f"or an FSDP accelerate config): {supported}"
        )


def _accelerator(args: VQRAETrainingArguments):
    _refuse_unsupported_engines()  # the run's first use of accelerate: before the output folder, model and data
    return Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, TRACKER_DIR)
        ),
        # No buffer needs DDP's broadcast before every forward (a 16384 x D copy for SimVQ's frozen codebook): the
        # constant ones never change, and the VQ's codebook rows and usage counts change only in its restart and
        # usage-count code, which broadcasts and all-reduces them itself.
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=False, broadcast_buffers=False),
            InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout)),
        ],
    )


def _resume(state: TrainingState, data: TrainingData, resume_path: str, streaming: bool) -> None:
    """The run's state at its checkpoint `resume_path`: weights, optimisers, schedule, EMA, step and a stream's
    position."""
    state.step, data_state = load_checkpoint(state.accelerator, resume_path, scheduler=state.scheduler, ema=state.ema)
    if streaming and data_state.get("examples_read") is not None:
        data.batches.start_example = data_state["examples_read"]
    logger.info("Resumed from %s at step %d.", resume_path, state.step)


def _run_schedule(args: VQRAETrainingArguments, saved: dict | None) -> VQRAETrainingArguments:
    """`args` with the warm-up the run trains with. A new run: from --warmup_steps and --max_steps
    (`resolve_warmup`). A resume keeps the warm-up of its checkpoint, also when a larger --max_steps extends the
    run: the schedule is then rebuilt for the new max_steps with that warm-up (`load_checkpoint` takes the
    learning rate of the resumed step from it), so the decay stretches to the new end."""
    if saved is None:
        return resolve_warmup(args)
    return dataclasses.replace(args, warmup_steps=saved["warmup_steps_used"])


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


def _build_loss(args: VQRAETrainingArguments, model, stage: Stage) -> VQRAELoss:
    """The loss of the run: its terms and weights, stage 2's teacher (a frozen copy of `model`'s encoder as it is
    now) and, with a GAN, the critic and its optimiser."""
    image_processor = model.get_image_processor()
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
        distillation_weight=args.distillation_weight,
        teacher=model.encoder if stage is Stage.TWO else None,
        gan_weight=args.gan_weight,
        gan_start_step=args.gan_start_step,
        discriminator_channels=args.discriminator_channels,
        discriminator_layers=args.discriminator_layers,
        discriminator_learning_rate=args.discriminator_learning_rate or args.learning_rate,
    )


def _log_start(state: TrainingState, stage: Stage, model_args: ModelArguments, image_size: int) -> None:
    model = state.unwrapped
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(
        "Training %s: %s, %.2fM trainable of %.2fM parameters, %d-px images, %dx%d tokens, codebook %d.",
        stage.value,
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


def _evaluate(
    state: TrainingState, validation: ValidationImages, args: VQRAETrainingArguments, log: MetricsLog, model=None
):
    """Evaluate `model` (by default `state.model_to_evaluate`) on every process and log the result."""
    result = evaluate_model(
        state.model_to_evaluate if model is None else model,
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
    accelerator = state.accelerator
    unreadable_train = log.unreadable_count()
    # Summed: the processes' validation shares differ.
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
    model = state.model_to_evaluate  # gathered on every process when FSDP shards the model
    result = _evaluate(state, data.validation, args, log, model)
    # The other processes need nothing of what the main one writes now (saving can copy the checkpoints, publishing
    # can take long): they end here instead of waiting in a barrier that --ddp_timeout would abort.
    if accelerator.is_main_process:
        _write_outputs(args, model, result, log.path)
    accelerator.end_training()
    return result.metrics


def _write_outputs(args: VQRAETrainingArguments, model, result, metrics_path: str) -> None:
    output_dir = args.output_dir
    save_pretrained_atomic(model, output_dir, model.get_image_processor())
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
        hub.push_to_hub(
            output_dir, repo_id=args.hub_model_id, private=args.hub_private_repo, revision=args.hub_revision
        )
