"""What a training run carries from step to step and the step itself: the model with its optimiser, schedule and
EMA (`TrainingState`, built by `build_training_state`), one optimiser step (`train_step`), and the exponential moving
average of the weights (`ExponentialMovingAverage`). The loss (`losses.VQRAELoss`) owns the rest: the stage-2
teacher and the GAN critic with its optimiser."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from transformers import get_scheduler

from .args import Stage, VQRAETrainingArguments
from .losses import VQRAELoss
from .sharding import check_shardable, full_state_dict, gathered_copy, is_sharded

__all__ = ["ExponentialMovingAverage", "StepResult", "TrainingState", "build_training_state", "train_step"]

# Parameters that weight decay would pull towards zero for no gain: the position embeddings and a VQ codebook (decay
# shrinks the codes no batch chooses, which then fall further out of reach: a cause of codebook collapse).
NO_DECAY_SUFFIXES = (
    "position_embedding",
    "position_embedding.weight",
    "quantizer.embedding.weight",
    "quantizer.codebook_transform.weight",
)


class ExponentialMovingAverage:
    """An exponential moving average of a model's floating-point parameters and buffers, kept in a copy of the
    model (`self.model`) that can be evaluated and saved. The decay warms up as `min(decay, (1 + n) / (10 + n))`.
    Integer buffers (such as a VQ codebook's usage counts) are copied as they are: they cannot be averaged, and the
    saved model must carry the trained model's. A model sharded by FSDP2 is averaged from its gathered weights into
    a whole copy on every process (collective: every process updates)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        shadow = gathered_copy(model) if is_sharded(model) else copy.deepcopy(model)
        self.model = shadow.eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        source = full_state_dict(model)
        for name, shadow in self.model.state_dict().items():
            if shadow.dtype.is_floating_point:
                shadow.lerp_(source[name].to(shadow.dtype), 1 - decay)
            else:
                shadow.copy_(source[name])


@dataclass
class TrainingState:
    """The parts of a run the training step updates besides the loss. `model` and `optimizer` are as
    `accelerator.prepare` returned them (possibly wrapped); `unwrapped` is the `VQRAEModel` itself."""

    accelerator: object
    model: torch.nn.Module
    unwrapped: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    gradient_accumulation_steps: int
    max_grad_norm: float
    ema: ExponentialMovingAverage | None = None
    step: int = 0

    def __post_init__(self):
        check_shardable(self.unwrapped)  # before the first step: what FSDP would train wrongly is refused

    @property
    def model_to_evaluate(self) -> torch.nn.Module:
        """What is evaluated and saved: the EMA weights when they are kept, else the trained weights; whole weights
        on every process when FSDP shards the model (then collective: every process asks)."""
        if self.ema is not None:
            return self.ema.model
        return gathered_copy(self.unwrapped) if is_sharded(self.unwrapped) else self.unwrapped


@dataclass
class StepResult:
    """What one optimiser step reports: the mean of each loss term over its micro-batches (and `grad_norm`), as
    float64 tensors on the device (read back only when a logging window is written: no host sync per step), the
    codes its batches chose (flat indices), and the names of the training images its batches found unreadable."""

    terms: dict[str, torch.Tensor]
    codes: torch.Tensor
    unreadable: list[str]


def _optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_vector = parameter.ndim <= 1 or name.endswith(NO_DECAY_SUFFIXES)
        (no_decay if is_vector else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_training_state(
    model, loss_fn: VQRAELoss, args: VQRAETrainingArguments, accelerator, stage: Stage
) -> TrainingState:
    """Freeze the encoder in stage 1, build the optimiser, schedule and EMA, and prepare the model and its optimiser
    with accelerate, then the loss's critic and its optimiser (the order of their files in a checkpoint)."""
    if stage is Stage.ONE:
        model.freeze_encoder(True)
    # The batches are checked as they are made, on the CPU (`to_pixel_values`); checking them again on the device
    # would read the answer back, a host sync per micro-batch.
    model.check_finite_pixels = False
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
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_fn.prepare(accelerator)
    unwrapped = accelerator.unwrap_model(model)
    return TrainingState(
        accelerator=accelerator,
        model=model,
        unwrapped=unwrapped,
        optimizer=optimizer,
        scheduler=scheduler,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm,
        ema=ExponentialMovingAverage(unwrapped, args.ema_decay) if args.ema_decay is not None else None,
    )


def train_step(state: TrainingState, loss_fn: VQRAELoss, batches) -> StepResult:
    """One optimiser step of the model and of the loss's critic over `gradient_accumulation_steps` micro-batches
    from `batches`."""
    accelerator, accumulation, step = state.accelerator, state.gradient_accumulation_steps, state.step
    means: dict[str, torch.Tensor] = {}
    codes, unreadable = [], []
    for micro in range(accumulation):
        batch = next(batches)
        unreadable += batch["unreadable"]
        pixel_values = batch["pixel_values"].to(accelerator.device)
        with contextlib.ExitStack() as no_sync:
            if micro < accumulation - 1:  # gradients are reduced across processes once, on the last micro-batch
                no_sync.enter_context(accelerator.no_sync(state.model))
                no_sync.enter_context(loss_fn.no_sync(accelerator, step))
            with accelerator.autocast():
                output = state.model(pixel_values)
                last_layer = state.unwrapped.get_last_layer()
                loss, terms = loss_fn.generator_loss(output, pixel_values, step=step, last_layer=last_layer)
            accelerator.backward(loss / accumulation)
            critic = loss_fn.critic_backward(
                accelerator, pixel_values, output.reconstruction, step=step, accumulation=accumulation
            )
        codes.append(output.indices.flatten())
        for name, value in {**terms, **critic}.items():
            # In float64, as Python's floats summed these before: the logged means stay the same to the bit.
            means[name] = means.get(name, 0.0) + value.detach().double() / accumulation
    if state.max_grad_norm > 0:
        means["grad_norm"] = accelerator.clip_grad_norm_(state.model.parameters(), state.max_grad_norm).double()
    loss_fn.critic_step(step)  # before the model's step, whose fp16 scaler update ends the step for both
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    if state.ema is not None:
        state.ema.update(state.unwrapped)
    state.step += 1
    return StepResult(terms=means, codes=torch.cat(codes), unreadable=unreadable)
