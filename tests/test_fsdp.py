"""Training under FSDP2 on two CPU processes over gloo.

accelerate shards only on GPUs (`accelerate launch --use_fsdp` on a machine without CUDA runs every process alone),
so this drives torch's `fully_shard` directly, the way accelerate's `fsdp_version: 2` applies it: each
`_no_split_modules` block, then the root, with bf16 parameters (`MixedPrecisionPolicy(param_dtype=torch.bfloat16)`).
The run's own pieces do the rest: `train_step` with the loss (GAN and its adaptive weight from step 0), the EMA,
`TrainingState.model_to_evaluate`, `evaluate_model` and `save_pretrained_atomic`; a checkpoint is written and
resumed with the functions `accelerator.save_state`/`load_state` call under FSDP2 (`save_fsdp_model`,
`save_fsdp_optimizer` and their loaders: sharded state dicts through torch.distributed.checkpoint).
"""

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from safetensors.torch import load_file

from conftest import tiny_model

VARIANTS = {
    # FSQ with an EMA (evaluated and saved from the EMA's whole copy).
    "fsq": ({"use_fsq": True}, 0.8),
    # VQ (SimVQ, restarts on) without one: the sharded model itself is gathered to evaluate and save.
    "vq": ({"use_fsq": False, "num_embeddings": 64, "codebook_dim": 8, "use_simvq": True}, None),
}


def _shard(model):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    for module in model.modules():
        if type(module).__name__ in model._no_split_modules:
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def _state(model, accelerator, ema_decay):
    from transformers import get_scheduler

    from vqrae.training.state import ExponentialMovingAverage, TrainingState, _optimizer_groups

    optimizer = torch.optim.AdamW(_optimizer_groups(model, 0.0), lr=1e-3)
    return TrainingState(
        accelerator=accelerator,
        model=model,
        unwrapped=model,
        optimizer=optimizer,
        scheduler=get_scheduler("constant", optimizer),
        gradient_accumulation_steps=1,
        max_grad_norm=1.0,
        ema=ExponentialMovingAverage(model, ema_decay) if ema_decay is not None else None,
    )


def _batches(rank):
    generator = torch.Generator().manual_seed(rank)
    while True:
        yield {"pixel_values": torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1, "unreadable": []}


def _checkpoint_resume(accelerator, model, state, overrides, batches, folder):
    """Save the sharded model and optimiser the way `accelerator.save_state` does under FSDP2 (accelerate's own
    `save_fsdp_model`/`save_fsdp_optimizer`, sharded state dicts through torch.distributed.checkpoint), take one more
    step, then load the checkpoint into a freshly built sharded model and optimiser and take the same step again.
    Returns the gathered weights after each (a resume loses and repeats nothing: they are equal), and the fresh
    model's weights before loading (which must differ, or the check proves nothing)."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils import load_fsdp_model, load_fsdp_optimizer, save_fsdp_model, save_fsdp_optimizer

    from vqrae.training.losses import VQRAELoss
    from vqrae.training.sharding import full_state_dict
    from vqrae.training.state import train_step

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
    save_fsdp_model(plugin, accelerator, model, folder)
    save_fsdp_optimizer(plugin, accelerator, state.optimizer, model, folder)
    batch, rng = next(batches), torch.get_rng_state()
    processor = model.get_image_processor()
    loss_fn = VQRAELoss(image_mean=processor.image_mean, image_std=processor.image_std)  # no critic to carry over
    state.ema = None
    train_step(state, loss_fn, iter([batch]))
    continued = {key: value.detach().clone() for key, value in full_state_dict(model).items()}

    fresh = _shard(tiny_model(seed=1, **overrides).train())
    fresh_state = _state(fresh, accelerator, None)
    before = {key: value.detach().clone() for key, value in full_state_dict(fresh).items()}
    load_fsdp_model(plugin, accelerator, fresh, folder)
    load_fsdp_optimizer(plugin, accelerator, fresh_state.optimizer, fresh, folder)
    torch.set_rng_state(rng)
    train_step(fresh_state, loss_fn, iter([batch]))
    resumed = {key: value.detach().clone() for key, value in full_state_dict(fresh).items()}
    return continued, resumed, before


def _refusals(accelerator, overrides):
    """What a training state says of a learned VQ codebook with restarts, before and after sharding, and of the
    same sharded without restarts (None: accepted)."""
    from vqrae.errors import UsageError

    said = {}
    for name, model in {
        "not sharded": tiny_model(**overrides),
        "sharded": _shard(tiny_model(**overrides)),
        "sharded, no restarts": _shard(tiny_model(**overrides, vq_restart_unused_steps=0)),
    }.items():
        try:
            _state(model, accelerator, None)
            said[name] = None
        except UsageError as error:
            said[name] = str(error)
    return said


def _worker(rank, port, folder):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2"
    )
    torch.set_num_threads(1)
    from accelerate import Accelerator

    from vqrae import VQRAEModel
    from vqrae.atomic_io import save_pretrained_atomic
    from vqrae.image_data import ValidationImages
    from vqrae.training.losses import VQRAELoss
    from vqrae.training.metrics import evaluate_model
    from vqrae.training.sharding import full_state_dict, is_sharded
    from vqrae.training.state import train_step

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    pixels = np.random.default_rng(rank).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    validation = ValidationImages([Image.fromarray(p) for p in pixels], [rank, 2 + rank], 0, "toy", "val", 32)
    report = {}
    for name, (overrides, ema_decay) in VARIANTS.items():
        model = _shard(tiny_model(**overrides).train())
        processor = model.get_image_processor()
        loss_fn = VQRAELoss(image_mean=processor.image_mean, image_std=processor.image_std, gan_weight=0.1)
        loss_fn.prepare(accelerator)
        state = _state(model, accelerator, ema_decay)
        start = {key: value.clone() for key, value in full_state_dict(model).items()}
        batches = _batches(rank)
        terms = [train_step(state, loss_fn, batches).terms for _ in range(2)]
        trained = {key: value.detach().clone() for key, value in full_state_dict(model).items()}
        evaluated = state.model_to_evaluate
        assert not is_sharded(evaluated)
        metrics = evaluate_model(evaluated, validation, accelerator=accelerator, compute_rfid=False).metrics
        output = os.path.join(folder, name)
        if accelerator.is_main_process:
            save_pretrained_atomic(evaluated, output, processor)
        accelerator.wait_for_everyone()
        saved = load_file(os.path.join(output, "model.safetensors"))
        resumed = _shard(VQRAEModel.from_pretrained(output).train())
        resumed_state = _state(resumed, accelerator, None)
        # Copied now: a state dict hands back the buffers themselves (steps_unused), and the step below counts on.
        after_resume = {key: value.detach().clone() for key, value in full_state_dict(resumed).items()}
        resumed_terms = train_step(resumed_state, loss_fn, batches).terms
        continued, checkpoint_resumed, fresh = _checkpoint_resume(
            accelerator, model, state, overrides, batches, os.path.join(folder, f"{name}-checkpoint")
        )
        report[name] = {
            "terms": terms,
            "resumed_terms": resumed_terms,
            "psnr": metrics["psnr"],
            "moved": any(not torch.equal(start[key], trained[key]) for key in start),
            "trained": trained,
            "evaluated": {key: value.cpu() for key, value in evaluated.state_dict().items()},
            "saved": saved,
            "after_resume": after_resume,
            "ema": ema_decay is not None,
            "continued": continued,
            "checkpoint_resumed": checkpoint_resumed,
            "fresh": fresh,
        }
    report["refusals"] = _refusals(accelerator, overrides={"use_fsq": False, "num_embeddings": 64, "codebook_dim": 8})
    torch.save(report, os.path.join(folder, f"{rank}.pt"))
    accelerator.end_training()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(port, str(folder)), nprocs=2)
    return [torch.load(folder / f"{rank}.pt") for rank in range(2)]


@pytest.mark.parametrize("name", ["fsq", "vq"])
def test_fsdp2_bf16_trains_evaluates_saves_and_resumes(two_processes, name):
    first, second = (report[name] for report in two_processes)
    for report in (first, second):
        for terms in [*report["terms"], report["resumed_terms"]]:
            assert all(np.isfinite(value) for value in terms.values()), terms
        # The adaptive GAN weight took its gradients through the sharded decoder's last layer.
        assert report["terms"][0]["gan_weight"] > 0
        assert report["moved"]
    assert first["psnr"] == second["psnr"]  # gathered metrics, one result
    # The saved model is the gathered weights (the EMA's whole copy when kept), the same on every process.
    expected = first["evaluated"] if first["ema"] else first["trained"]
    assert first["saved"].keys() == expected.keys()
    for key in expected:
        assert torch.equal(first["saved"][key], expected[key]), key
        assert torch.equal(second["evaluated"][key], first["evaluated"][key]), key
        assert torch.equal(first["after_resume"][key], first["saved"][key]), key


@pytest.mark.parametrize("name", ["fsq", "vq"])
def test_fsdp2_checkpoint_resume_loses_and_repeats_nothing(two_processes, name):
    """A sharded checkpoint (model and optimiser, as accelerate saves them under FSDP2) resumed into a fresh model
    takes the very step the uninterrupted run took: every weight and buffer (the VQ usage counts too) equal."""
    for report in two_processes:
        continued, resumed, fresh = (
            report[name]["continued"],
            report[name]["checkpoint_resumed"],
            report[name]["fresh"],
        )
        assert continued.keys() == resumed.keys()
        assert any(not torch.equal(fresh[key], continued[key]) for key in continued)
        for key in continued:
            assert torch.equal(resumed[key], continued[key]), key


def test_a_learned_codebook_with_restarts_is_refused_sharded(two_processes):
    """Its restarts would write into FSDP's temporary gathered copy: the codebook would silently never restart."""
    for report in two_processes:
        said = report["refusals"]
        assert said["not sharded"] is None and said["sharded, no restarts"] is None
        assert said["sharded"].startswith("vq_restart_unused_steps=20 with a learned codebook"), said["sharded"]
        assert "--use_simvq" in said["sharded"]
