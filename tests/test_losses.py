"""The loss module: every term computed in float32 outside autocast, with the weights it was given; the networks it
owns (the stage-2 teacher, the GAN critic and its optimiser) and the critic's steps."""

import pytest
import torch
from accelerate import Accelerator
from transformers.utils import ModelOutput

from conftest import tiny_model
from vqrae.training.losses import VQRAELoss, VQRAEPatchDiscriminator, reconstruction_losses


def _output(seed=0):
    generator = torch.Generator().manual_seed(seed)
    reconstruction = (torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1).requires_grad_(True)
    features = torch.randn(2, 16, 8, generator=generator).requires_grad_(True)
    return ModelOutput(reconstruction=reconstruction, last_hidden_state=features, quantizer_loss=torch.tensor(0.3))


def _loss(**weights):
    return VQRAELoss(image_mean=[0.5] * 3, image_std=[0.5] * 3, **weights)


class _FixedTeacher(torch.nn.Module):
    """A teacher whose features do not depend on autocast, so that only the loss's own arithmetic is compared."""

    def __init__(self, features):
        super().__init__()
        self.register_buffer("features", features)

    def forward(self, pixel_values):
        return ModelOutput(last_hidden_state=self.features)


def test_terms_are_float32_and_equal_under_bf16_autocast():
    torch.manual_seed(0)
    teacher = _FixedTeacher(torch.randn(2, 16, 8))
    loss_fn = _loss(
        l1_weight=1.0,
        mse_weight=0.5,
        ssim_weight=0.2,
        distillation_weight=0.7,
        teacher=teacher,
        gan_weight=0.1,
        discriminator_channels=8,
        discriminator_layers=2,
    )
    critic = loss_fn.discriminator
    last_layer = torch.randn(5, 5, requires_grad=True)
    output = _output()
    # A generator loss whose gradient reaches `last_layer`, as the decoder's does.
    output["reconstruction"] = output.reconstruction + last_layer.sum() * 1e-3
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    kwargs = dict(step=0, last_layer=last_layer)
    loss, terms = loss_fn.generator_loss(output, pixels, **kwargs)
    critic_loss = loss_fn.discriminator_loss(pixels, output.reconstruction)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_bf16, terms_bf16 = loss_fn.generator_loss(output, pixels, **kwargs)
        critic_loss_bf16 = loss_fn.discriminator_loss(pixels, output.reconstruction)
        # What the terms would be if autocast reached them: SSIM's convolutions in bf16. The critic computes in
        # float32 even called straight under autocast (and behind accelerate's wrapper: test_mixed_precision.py).
        unguarded = reconstruction_losses(
            loss_fn.to_unit(output.reconstruction), loss_fn.to_unit(pixels), ssim_weight=1
        )
        unguarded_logits = critic(loss_fn.to_unit(pixels))
    assert set(terms) >= {"l1", "mse", "ssim", "quantizer", "distillation", "generator", "gan_weight", "loss"}
    for name, value in terms.items():
        assert value.dtype == torch.float32 and terms_bf16[name].dtype == torch.float32, name
        assert torch.equal(value, terms_bf16[name]), name
    assert torch.equal(loss, loss_bf16) and torch.equal(critic_loss, critic_loss_bf16)
    assert unguarded_logits.dtype == torch.float32
    assert not torch.equal(unguarded["ssim"], terms["ssim"])


def test_weights_and_schedule():
    loss_fn = _loss(l1_weight=2.0, mse_weight=0.0, quantizer_weight=3.0, gan_weight=0.5, gan_start_step=10)
    output, pixels = _output(), torch.rand(2, 3, 32, 32) * 2 - 1
    loss, terms = loss_fn.generator_loss(output, pixels, step=0)
    assert "mse" not in terms and "generator" not in terms and "distillation" not in terms
    expected = 2.0 * (loss_fn.to_unit(output.reconstruction) - loss_fn.to_unit(pixels)).abs().mean() + 3.0 * 0.3
    torch.testing.assert_close(loss, expected)
    assert not loss_fn.uses_gan(9) and loss_fn.uses_gan(10)
    with pytest.raises(ValueError, match="perceptual"):
        reconstruction_losses(pixels, pixels, perceptual_weight=1.0)


def test_gradient_loss_compares_neighbouring_pixel_differences():
    target = torch.zeros(1, 1, 2, 3)
    target[..., 1:] = 0.5  # a step between columns 0 and 1
    shifted = target + 0.2  # the same changes from pixel to pixel, a constant offset
    terms = reconstruction_losses(shifted, target, l1_weight=0.0, gradient_weight=1.0)
    assert terms["gradient"] == 0 and terms["reconstruction"] == 0
    flat = torch.full_like(target, 0.25)  # the step smoothed away: horizontal differences 0.5 and 0 are lost
    terms = reconstruction_losses(flat, target, l1_weight=1.0, gradient_weight=2.0)
    horizontal = (0.5 + 0.0) / 2  # mean |difference| over the 2 x 2 horizontal pairs: one column of 0.5s, one of 0s
    vertical = 0.0
    assert float(terms["gradient"]) == pytest.approx((horizontal + vertical) / 2)
    assert float(terms["reconstruction"]) == pytest.approx(0.25 + 2 * (horizontal + vertical) / 2)


def test_the_teacher_is_a_frozen_copy_of_the_encoder_as_it_was_given():
    model = tiny_model(seed=1)
    loss_fn = _loss(distillation_weight=1.0, teacher=model.encoder)
    assert not loss_fn.teacher.training and not any(p.requires_grad for p in loss_fn.teacher.parameters())
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    _, terms = loss_fn.generator_loss(model(pixels), pixels, step=0)
    assert terms["distillation"] == 0  # the student starts as its teacher
    with torch.no_grad():  # the model's weights change afterwards, as when a resume loads its checkpoint
        for parameter in model.encoder.parameters():
            parameter.add_(0.01)
    _, terms = loss_fn.generator_loss(model(pixels), pixels, step=0)
    assert terms["distillation"] > 0
    assert "distillation" not in _loss(distillation_weight=1.0).generator_loss(model(pixels), pixels, step=0)[1]


def test_the_loss_steps_its_critic_from_gan_start_step_and_checkpoints_it(tmp_path):
    accelerator = Accelerator(cpu=True)
    loss_fn = _loss(
        gan_weight=0.5,
        gan_start_step=1,
        discriminator_channels=8,
        discriminator_layers=2,
        discriminator_learning_rate=0.1,
    )
    assert isinstance(loss_fn.discriminator, VQRAEPatchDiscriminator)
    assert _loss(gan_weight=0.0).discriminator is None  # no GAN, no critic
    loss_fn.prepare(accelerator)
    start = {k: v.clone() for k, v in loss_fn.discriminator.state_dict().items()}
    pixels, reconstruction = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1

    def critic_step(step):
        terms = loss_fn.critic_backward(accelerator, pixels, reconstruction, step=step, accumulation=2)
        loss_fn.critic_step(step)
        return terms

    assert critic_step(0) == {}  # before gan_start_step: no critic loss, no update
    assert all(torch.equal(start[k], v) for k, v in loss_fn.discriminator.state_dict().items())
    assert set(critic_step(1)) == {"discriminator"}
    assert not all(torch.equal(start[k], v) for k, v in loss_fn.discriminator.state_dict().items())
    assert all(p.grad is None for p in loss_fn.discriminator.parameters())  # zeroed after its step
    # accelerate's checkpoint holds the critic and its optimiser: loading it undoes later steps.
    accelerator.save_state(str(tmp_path), safe_serialization=True)
    saved = {k: v.clone() for k, v in loss_fn.discriminator.state_dict().items()}
    critic_step(2)
    accelerator.load_state(str(tmp_path))
    assert all(torch.equal(saved[k], v) for k, v in loss_fn.discriminator.state_dict().items())
    assert set(loss_fn.discriminator_optimizer.state_dict()["state"]) == set(range(len(saved)))
