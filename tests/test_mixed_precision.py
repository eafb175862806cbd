"""Mixed precision with the GAN: under fp16 each optimiser's gradients (the model's and the critic's) are unscaled
exactly once per step, and under bf16 the critic computes in float32 as the losses do.

accelerate makes no gradient scaler on a machine without an accelerator, so the fp16 test gives its Accelerator
the scaler accelerate makes on a GPU (`torch.amp.GradScaler`, here on "cpu") before preparing: the training step
then runs as on a GPU, through accelerate's own `backward`, `clip_grad_norm_` and optimiser wrapper."""

import pytest
import torch
from accelerate import Accelerator
from transformers.utils import ModelOutput

from conftest import tiny_model
from vqrae.training.args import Stage, VQRAETrainingArguments
from vqrae.training.losses import VQRAELoss, adaptive_gan_weight
from vqrae.training.state import build_training_state, train_step

SCALE = 2.0**8  # a power of two: unscaling divides exactly, so gradients compare with torch.equal


def _gan_loss(model):
    processor = model.get_image_processor()
    return VQRAELoss(
        image_mean=processor.image_mean,
        image_std=processor.image_std,
        gan_weight=0.5,
        discriminator_channels=8,
        discriminator_layers=2,
    )


@pytest.mark.parametrize("max_grad_norm", [1e9, 0.0], ids=["clipped", "not-clipped"])
def test_fp16_unscales_each_optimizers_gradients_exactly_once(tmp_path, max_grad_norm):
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    accelerator.native_amp, accelerator.scaler = True, torch.amp.GradScaler("cpu", init_scale=SCALE)
    model = tiny_model()
    loss_fn = _gan_loss(model).to(accelerator.device)
    args = VQRAETrainingArguments(output_dir=str(tmp_path), max_grad_norm=max_grad_norm)
    state = build_training_state(model, loss_fn, args, accelerator, Stage.JOINT)
    optimizers = {"model": state.optimizer.optimizer, "critic": loss_fn.discriminator_optimizer.optimizer}
    # The gradients as backward left them (scaled), and as each optimiser steps with them.
    scaled, stepped = {}, {}
    for name, optimizer in optimizers.items():
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        for parameter in parameters:
            parameter.register_post_accumulate_grad_hook(lambda p, s=scaled: s.__setitem__(p, p.grad.clone()))

        def record(optimizer, *_, params=parameters, name=name):
            stepped[name] = [(p, p.grad.clone()) for p in params if p.grad is not None]

        optimizer.register_step_pre_hook(record)
    generator = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1, "unreadable": []}
    result = train_step(state, loss_fn, iter([batch]))

    assert set(stepped) == {"model", "critic"}  # both stepped: no inf at this scale
    assert "discriminator" in result.terms and torch.isfinite(torch.tensor(result.terms["gan_weight"]))
    for name, gradients in stepped.items():
        assert gradients, name
        for parameter, gradient in gradients:
            assert torch.equal(gradient, scaled[parameter] / SCALE), name


def test_adaptive_gan_weight_with_the_loss_scale_does_not_underflow_in_fp16():
    # A last layer whose output is fp16 under autocast, and losses whose gradients at that output are ~1e-10: below
    # fp16's smallest subnormal, they vanish unless taken of the scaled losses.
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 64)
    inputs = torch.randn(256, 16)
    with torch.autocast("cpu", dtype=torch.float16):
        output = layer(inputs)
    assert output.dtype == torch.float16
    reconstruction = 1e-5 * output.float().square().mean()
    gan = -1e-5 * output.float().mean()
    exact_rec = torch.autograd.grad(1e-5 * (layer(inputs) ** 2).mean(), layer.weight)[0].norm()
    exact_gan = torch.autograd.grad(-1e-5 * layer(inputs).mean(), layer.weight)[0].norm()
    expected = exact_rec / (exact_gan + 1e-4)
    scaled = adaptive_gan_weight(reconstruction, gan, layer.weight, scale=torch.tensor(2.0**16))
    assert torch.allclose(scaled, expected, rtol=0.05)
    assert not torch.allclose(adaptive_gan_weight(reconstruction, gan, layer.weight), expected, rtol=0.05)


def test_the_critic_runs_in_float32_under_bf16_mixed_precision():
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model = tiny_model()
    loss_fn = _gan_loss(model)
    loss_fn.prepare(accelerator)
    dtypes = []
    convolutions = [layer for layer in loss_fn.discriminator.modules() if isinstance(layer, torch.nn.Conv2d)]
    for layer in convolutions:
        layer.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    scale = torch.ones(1, requires_grad=True)  # stands for the decoder's last layer
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    output = ModelOutput(
        reconstruction=torch.rand(2, 3, 32, 32) * scale, last_hidden_state=None, quantizer_loss=torch.tensor(0.0)
    )
    with accelerator.autocast():
        assert torch.is_autocast_enabled("cpu")  # the critic is called from inside the model's bf16 region
        loss_fn.generator_loss(output, pixels, step=0, last_layer=scale)
        loss_fn.critic_backward(accelerator, pixels, output.reconstruction, step=0, accumulation=1)
    assert len(dtypes) == 3 * len(convolutions)  # the generator's pass, then the critic's on real and fake images
    assert set(dtypes) == {torch.float32}
