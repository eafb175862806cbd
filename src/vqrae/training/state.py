"""What a training run carries from step to step: the model and its optimiser, schedule, EMA, stage-2 teacher and
GAN critic (`TrainingState`), and the exponential moving average of the weights (`ExponentialMovingAverage`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

__all__ = ["ExponentialMovingAverage", "TrainingState"]


class ExponentialMovingAverage:
    """An exponential moving average of a model's floating-point parameters and buffers, kept in a copy of the
    model (`self.model`) that can be evaluated and saved. The decay warms up as `min(decay, (1 + n) / (10 + n))`.
    Integer buffers (such as a VQ codebook's usage counts) are copied as they are: they cannot be averaged, and the
    saved model must carry the trained model's."""

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
            else:
                shadow.copy_(source[name])


@dataclass
class TrainingState:
    """The parts of a run the training step updates. `model`, `optimizer`, `discriminator` and
    `discriminator_optimizer` are as `accelerator.prepare` returned them (possibly wrapped); `unwrapped` is the
    `VQRAEModel` itself. `teacher` is stage 2's frozen copy of the starting encoder (never saved)."""

    accelerator: object
    model: torch.nn.Module
    unwrapped: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    gradient_accumulation_steps: int
    max_grad_norm: float
    teacher: torch.nn.Module | None = None
    discriminator: torch.nn.Module | None = None
    discriminator_optimizer: torch.optim.Optimizer | None = None
    ema: ExponentialMovingAverage | None = None
    step: int = 0
    # Which codes the training batches chose since the last logging window (bool, one per code).
    window_codes: torch.Tensor | None = None
    unreadable: set[str] = field(default_factory=set)  # the training images found unreadable, on this process

    @property
    def model_to_evaluate(self) -> torch.nn.Module:
        """What is evaluated and saved: the EMA weights when they are kept, else the trained weights."""
        return self.ema.model if self.ema is not None else self.unwrapped
