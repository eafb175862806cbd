"""Models sharded by FSDP2 (torch's `fully_shard`, as accelerate's `fsdp_version: 2` applies it): each process holds
a slice of every parameter, so whatever needs whole weights (the EMA, evaluation, saving) works on weights gathered
from every process. These calls are collective under FSDP: every process makes them, in the same order. For a model
that is not sharded they hand back the model's own weights and do no communication."""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule

from ..errors import UsageError

__all__ = ["check_shardable", "full_state_dict", "gathered_copy", "is_sharded"]


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `fully_shard` has sharded `model` or any of its submodules."""
    return any(isinstance(module, FSDPModule) for module in model.modules())


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s state dict with whole tensors on every process (gathered when sharded; collective), in the
    parameters' own dtype (FSDP2 keeps float32 shards whatever its mixed-precision policy computes in)."""
    if not is_sharded(model):
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def gathered_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An unsharded copy of the FSDP2-sharded `model` on every process, built from its gathered weights (collective).
    `fully_shard` turns the model's class into a subclass of `FSDPModule`; the copy is of the model's own class,
    built from its config without drawing from the random generators (so a run's random draws stay as they are)."""
    model_class = next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))
    weights = full_state_dict(model)
    with torch.random.fork_rng(devices=[]):
        copy = model_class(model.config)
    copy.load_state_dict(weights)
    return copy.to(next(iter(weights.values())).device)


def check_shardable(model: torch.nn.Module) -> None:
    """Refuse a sharded model that FSDP would train wrongly without a word: a learned VQ codebook with restarts of
    unused codes. The restarts write codebook rows during the forward, where FSDP2 holds a gathered (bf16) copy of
    the weights that it discards afterwards: the rows would never change while their usage counts were reset."""
    if not is_sharded(model):
        return
    config = model.config
    if not config.use_fsq and not config.use_simvq and config.vq_restart_unused_steps > 0:
        raise UsageError(
            f"vq_restart_unused_steps={config.vq_restart_unused_steps} with a learned codebook (use_simvq=False) "
            "cannot train under FSDP: the restarts write codebook rows inside the forward, where FSDP holds a "
            "temporary gathered copy. Use --use_simvq (its codebook is a buffer, restarted on every process), "
            "--vq_restart_unused_steps 0, or DDP (--multi_gpu)."
        )
