"""Training under FSDP2 on two CPU processes over gloo.

accelerate shards only on GPUs (`accelerate launch --use_fsdp` on a machine without CUDA runs every process alone),
so this drives torch's `fully_shard` directly, the way accelerate's `fsdp_version: 2` applies it: each
`_no_split_modules` block, then the root, with bf16 parameters (`MixedPrecisionPolicy(param_dtype=torch.bfloat16)`).
The run's own pieces do the rest: `train_step` with the loss (GAN and its adaptive weight from step 0), the EMA,
`TrainingState.model_to_evaluate`, `evaluate_model` and `save_pretrained_atomic`.
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
        trained = full_state_dict(model)
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
        after_resume = full_state_dict(resumed)
        resumed_terms = train_step(resumed_state, loss_fn, batches).terms
        report[name] = {
            "terms": terms,
            "resumed_terms": resumed_terms,
            "psnr": metrics["psnr"],
            "moved": any(not torch.equal(start[key], trained[key]) for key in start),
            "trained": {key: value.cpu() for key, value in trained.items()},
            "evaluated": {key: value.cpu() for key, value in evaluated.state_dict().items()},
            "saved": saved,
            "after_resume": {key: value.cpu() for key, value in after_resume.items()},
            "ema": ema_decay is not None,
        }
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


VQ_UNRESOLVED = pytest.mark.xfail(
    strict=True,
    reason="VQ under FSDP2: process 0's gathered copy holds steps_unused counted one pass more than process 1's "
    "(not yet explained); the codebook itself now agrees",
)


@pytest.mark.parametrize("name", ["fsq", pytest.param("vq", marks=VQ_UNRESOLVED)])
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
